"""GCIDE (Webster's Revised Unabridged 1913 plus additions), as Debian's ``dict-gcide`` formats it.

An article::

    Retreat \\Re*treat"\\, n. [F. retraite, fr. retraire to withdraw, ...]      <- head: headword(s) with
       1. The act of retiring or withdrawing one's self, ...                     pronunciation, part of speech,
          [1913 Webster]                                                          etymology / inflections
                                                                                 <- a source tag closes a sense
                In a retreat he outruns any lackey.   --Shak.                    <- a quotation (deeper indent)
          [1913 Webster]
       3. (Mil. & Naval.)
          (a) The retiring of an army ...                                        <- lettered sub-senses
       Note: ...   Syn: ...                                                      <- skipped
       {Bank swallow}, a small American and European swallow ...                <- a compound: its own term

Senses are the numbered ones, their lettered sub-senses (a sense made only of labels and sub-senses is not a sense
itself), an unnumbered article's text, and compounds (``{Phrase}, definition``), which become rows of the phrase.
The defining text of a sense is cut at its first ``; as,`` (Webster's usage examples, which become contexts) and at
the first ``--Author`` citation. Contexts, in order of preference: the ``as,`` examples, then quotations (indented
blocks and inline ``"..."``). The head (pronunciation, inflections, etymology), ``Note:``/``Syn:``/``Usage:``
paragraphs and source tags never reach a row.

GCIDE also holds WordNet 1.5 glosses: senses tagged ``[WordNet ...]`` without a Webster tag are rejected ("WordNet
gloss"), so a mix with the ``wordnet`` source does not count WordNet twice and this source stays Webster's. A sense
without its own tag takes the next tag of the article (Webster tags groups of compounds once).
"""
from __future__ import annotations

import re
import unicodedata
from typing import Optional

from lm_lexicon.data.dictionaries.text import Entry, Sense, drop_leading_parens, plain_term, squash

NAME = "gcide"
WORDNET_GLOSS = "WordNet gloss"

# ---------------------------------------------------------------------------------------------------- characters
# GCIDE's ASCII notation for accented letters and symbols, as dict-gcide writes it: [a^] (breve), [=a] (macron),
# ['e] (acute), ["o] (diaeresis) ... and named symbols ([deg], [ae], [alpha]).
_MARKS_AFTER = {"^": "\u0306"}  # [a^]: breve
_MARKS_BEFORE = {"=": "\u0304", "-": "\u0304", "'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303",
                 ".": "\u0307", "^": "\u0302", ",": "\u0327", "*": "\u030a"}
_NAMED = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "deg": "°", "sect": "§", "pounds": "£", "para": "¶", "eth": "ð",
    "thorn": "þ", "yogh": "ȝ", "times": "×", "divby": "÷", "middot": "·", "root": "√", "cuberoot": "∛",
    "min": "′", "sec": "″", "prime": "′", "bprime": "″", "dagger": "†", "dag": "†", "flat": "♭", "sharp": "♯",
    "natural": "♮", "ng": "ŋ", "imac": "ī", "nbsp": " ", "ldquo": "“", "rdquo": "”", "ldqo": "“", "rdqo": "”",
    "lsquo": "‘", "rsquo": "’", "rarr": "→", "frac12": "½", "frac14": "¼", "frac34": "¾", "schwa": "ə",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ", "eta": "η", "theta": "θ",
    "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν", "xi": "ξ", "omicron": "ο", "pi": "π",
    "rho": "ρ", "sigma": "σ", "sigmat": "ς", "tau": "τ", "upsilon": "υ", "phi": "φ", "chi": "χ", "psi": "ψ",
    "omega": "ω", "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Pi": "Π", "Sigma": "Σ",
    "Upsilon": "Υ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
}
_CODE = re.compile(r"\[([^\[\]\s]{1,8})\]")


def _character(code: str) -> Optional[str]:
    if code in _NAMED:
        return _NAMED[code]
    if len(code) == 2 and code[0] in _MARKS_BEFORE and code[1].isalpha():
        return code[1] + _MARKS_BEFORE[code[0]]
    if len(code) in (2, 3) and code[-1] in _MARKS_AFTER and code[:-1].isalpha():  # [a^], [oo^]
        return code[:-1] + _MARKS_AFTER[code[-1]]
    return None


def decode_characters(text: str) -> str:
    """Replace GCIDE's character codes by Unicode (NFC); other bracket groups ([Obs.], [1]) are left alone."""
    out = _CODE.sub(lambda m: _character(m.group(1)) or m.group(0), text)
    return unicodedata.normalize("NFC", out)


# ---------------------------------------------------------------------------------------------------------- head

_POS_TAGS = [  # longest first: "v. t." before "v."
    ("n. pl.", "n"), ("v. t.", "v"), ("v. i.", "v"), ("p. p.", "a"), ("p. a.", "a"), ("p. pr.", "a"),
    ("adv.", "r"), ("adj.", "a"), ("a.", "a"), ("n.", "n"), ("v.", "v"), ("prep.", None), ("conj.", None),
    ("interj.", None), ("pron.", None), ("imp.", "v"), ("pl.", "n"),
]
_POS_AFTER_HEAD = re.compile(r"^[\s,]*(?:\([^()]*\)\s*,?\s*)?(" + "|".join(re.escape(t) for t, _ in _POS_TAGS) +
                             r")(?=[\s,;\[(]|$)")


# A line that starts with a source tag ends the senses above it: [1913 Webster], [WordNet 1.5], [PJC], ...
_TAG = re.compile(r"^ *\[([^\[\]]*)\]")
_PROVENANCE = re.compile(r"Webster|WordNet|PJC|Century|RDH|RHUD|MW\d|\bAS\b|Suppl", re.IGNORECASE)


def _is_source_tag(line: str) -> bool:
    tag = _TAG.match(line)
    return tag is not None and _PROVENANCE.search(tag.group(1)) is not None


def split_head(lines: list[str]) -> tuple[list[str], list[str]]:
    """``(head lines, body lines)``: the head runs until its square brackets (etymology, inflections) balance at a
    line end, unless the next line carries on with inflections (``{...}``) or another bracketed group that is not
    a source tag. Parentheses are not counted: etymologies leave them open ("(or Ar. ...]")."""
    depth = 0
    for i, line in enumerate(lines):
        depth += line.count("[") - line.count("]")
        if depth > 0:
            continue
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if not (following.startswith("{") or (following.startswith("[") and not _is_source_tag(following))):
            return lines[:i + 1], lines[i + 1:]
    return lines, []


def parse_head(head: str) -> tuple[str, Optional[str]]:
    """``(headword, pos)`` from ``Headword \\Pron\\, [Other \\Pron\\,] pos. [etymology]``; headword "" if none."""
    if "\\" not in head:
        return "", None
    headword = head.split("\\", 1)[0].strip().rstrip(",").strip()
    after = head.rsplit("\\", 1)[1]
    m = _POS_AFTER_HEAD.match(after)
    pos = dict(_POS_TAGS).get(m.group(1)) if m else None
    return headword, pos


# ---------------------------------------------------------------------------------------------------------- body

_NUMBERED = re.compile(r"^( *)(\d+)\.\s+(.*)$")
_LETTERED = re.compile(r"^( *)\(([a-z])\)\s*(.*)$")
_COMPOUND = re.compile(r"^( {1,4})\{")
_SKIPPED = re.compile(r"^ *(?:Note|Syn|Usage)\s*:")
_CITATION = re.compile(r"(?<!\S)--(?=[A-Z0-9])")
_AS_EXAMPLE = re.compile(r"[;,:]\s*as,\s+")
_INLINE_QUOTE = re.compile(r"\"([^\"]+)\"")
_EXAMPLE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])|\s--|\s\[")  # next sentence, usage note, label
_USAGE_NOTE = re.compile(r"[;,]?\s+--\s")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


class _Block:
    """The lines of one sense while the article is read: its text, its quotations, its source tag."""

    def __init__(self, number: str, text: str, text_col: int, term: Optional[str] = None,
                 compound: bool = False):
        self.number, self.term, self.compound = number, term, compound
        self.lines = [text]
        self.quotes: list[list[str]] = []
        self.text_col = text_col          # where its text lines start; deeper lines are quotations
        self.tag: Optional[str] = None
        self.has_subsenses = False
        self.in_quote = False


class _BlockReader:
    """Groups the body lines of an article into sense blocks (the shapes are in the module docstring)."""

    def __init__(self) -> None:
        self.blocks: list[_Block] = []
        self.current: Optional[_Block] = None
        self.parent: Optional[_Block] = None   # the numbered sense or compound that lettered sub-senses belong to
        self.untagged: list[_Block] = []
        self.skipping = False                  # inside a Note: / Syn: / Usage: paragraph
        self.paragraph_start = True
        self.compounds = 0

    def _start(self, block: _Block) -> None:
        self.blocks.append(block)
        self.untagged.append(block)
        self.current = block
        self.skipping = False

    def _end_paragraph(self, tag: Optional[str]) -> None:
        if tag is not None:
            for b in self.untagged:  # a tag closes every sense since the previous tag
                b.tag = tag
            self.untagged.clear()
        self.skipping = False
        self.paragraph_start = True
        if self.current is not None:
            self.current.in_quote = False

    def feed(self, line: str) -> None:
        if not line.strip() or _is_source_tag(line):
            # text after a tag on the same line belongs to no sense (dict-gcide conversion debris)
            self._end_paragraph(_TAG.match(line).group(1) if line.strip() else None)
            return
        col = _indent(line)
        at_start, self.paragraph_start = self.paragraph_start, False
        numbered, lettered, compound = _NUMBERED.match(line), _LETTERED.match(line), _COMPOUND.match(line)
        current = self.current
        if numbered and col <= 4 and (at_start or current is None):
            number = numbered.group(2)
            self._start(_Block(number, numbered.group(3), col + len(number) + 2))
            self.parent = self.current
        elif lettered and current is not None and col <= current.text_col + 1 and not current.in_quote:
            parent = self.parent
            if parent is not None:
                parent.has_subsenses = True
            self._start(_Block((parent.number if parent else "") + lettered.group(2), lettered.group(3), col + 4,
                               term=parent.term if parent else None))
        elif compound and col <= 4 and at_start:
            self.compounds += 1
            text = line.strip()
            term = re.match(r"\{([^{}]*)\}", text)
            self._start(_Block(f"c{self.compounds}", text, col + 3, term=squash(term.group(1)) if term else "",
                               compound=True))
            self.parent = self.current
        elif _SKIPPED.match(line) or self.skipping:
            self.skipping = True
        elif current is None:
            self._start(_Block("", line.strip(), col))
        elif col >= current.text_col + 4 or current.in_quote:
            if not current.in_quote:
                current.quotes.append([])
                current.in_quote = True
            current.quotes[-1].append(line.strip())
        else:
            current.lines.append(line.strip())


def _after_compound_term(text: str) -> str:
    """``{Bank swallow}, a small ...`` -> "a small ..."; variants (``{In banco}``) and labels (``(Zool.)``) between
    the term and its definition go too."""
    previous = None
    while previous != text:
        previous, text = text, re.sub(r"^\s*(?:,|\{[^{}]*\}|\([^()]*\))", "", text, count=1)
    return text.strip()


def _examples(text: str) -> tuple[str, list[str]]:
    """Cut a sense's text at its citation, its ``as,`` examples and its `` -- `` usage note ("-- called also X",
    "-- used with *of*"): ``(defining text, examples)``."""
    citation = _CITATION.search(text)
    if citation:
        text = text[:citation.start()]
    examples: list[str] = []
    as_example = _AS_EXAMPLE.search(text)
    if as_example:
        tail = _EXAMPLE_END.split(text[as_example.end():], maxsplit=1)[0]
        text = text[:as_example.start()]
        examples += [e.strip().rstrip(".") for e in tail.split(";") if e.strip()]
    note = _USAGE_NOTE.search(text)
    if note and len(text[:note.start()].split()) >= 2:
        text = text[:note.start()]
    return text, examples


def _quotation(lines: list[str]) -> str:
    text = " ".join(lines)
    citation = _CITATION.search(text)
    return squash(text[:citation.start()] if citation else text)


def parse(text: str) -> Entry:
    """Parse one dict-gcide article into an :class:`Entry` (its term, part of speech and senses)."""
    lines = decode_characters(text).split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return Entry(rejected="empty article")
    head, body = split_head(lines)
    headword, pos = parse_head(" ".join(head))
    if not headword:
        return Entry(rejected="malformed head")
    entry = Entry(term=plain_term(headword), pos=pos)
    reader = _BlockReader()
    for line in body:
        reader.feed(line)
    for block in reader.blocks:
        if block.has_subsenses and not _has_own_text(block):
            continue  # "3. (Mil. & Naval.)" followed by (a), (b), (c): the label belongs to the sub-senses
        entry.senses.append(_sense(block, pos))
    if not entry.senses:
        entry.rejected = "no sense found"
    return entry


def _sense(block: _Block, pos: Optional[str]) -> Sense:
    raw = squash(" ".join(block.lines))
    if block.compound:
        raw = _after_compound_term(raw)
    defining, examples = _examples(raw)
    quotes = [_quotation(q) for q in block.quotes]
    inline = _INLINE_QUOTE.findall(raw)
    term = plain_term(block.term) if block.term else block.term
    sense = Sense(number=block.number, text=defining, examples=examples + quotes + inline, term=term,
                  pos=pos if block.term is None else None)
    if block.tag and "wordnet" in block.tag.lower() and "webster" not in block.tag.lower():
        sense.rejected = WORDNET_GLOSS
    elif term == "":
        sense.rejected = "malformed compound"
    return sense


def _has_own_text(block: _Block) -> bool:
    text = squash(" ".join(block.lines))
    if block.compound:
        text = _after_compound_term(text)
    return any(ch.isalpha() for ch in drop_leading_parens(text))
