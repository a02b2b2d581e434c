"""What the dictionary parsers share: the parsed-entry types and the text clean-up that turns a sense's defining
text into a definition and its usage examples into a context.

The definition of a sense is the **first sentence of its defining text**, with markup removed (cross-reference
braces, bracketed labels and source tags, leading subject labels) and WordNet's surface style (no final period).
Why the first sentence: every dictionary here states the definition first and elaborates after (FOLDOC and the
Jargon File run on for paragraphs of history and anecdotes, Bierce adds a second joke); a generator cannot be asked
to reproduce an essay, and the first sentence is what a reference definition looks like in the other sources.
A first sentence over :data:`MAX_DEFINITION_WORDS` is cut after its last ``;`` within the limit (dictionaries
chain paraphrases with semicolons, so the cut keeps whole paraphrases) or rejected when it has none.

A context is a usage example or quotation of the sense that contains the term (with a regular inflection, as for
WordNet) and has 3 to :data:`MAX_CONTEXT_WORDS` words; without one the row is term-only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from lm_lexicon.data.wordnet import lemma_forms

MAX_DEFINITION_WORDS = 40
MAX_CONTEXT_WORDS = 40
MIN_CONTEXT_WORDS = 3

# Sense-level rejection reasons shared by the parsers.
EMPTY_DEFINITION = "empty definition"
CROSS_REFERENCE = "cross-reference only"
TOO_LONG = "definition too long"


@dataclass
class Sense:
    """One sense as a parser found it: its defining text and its candidate contexts, in order of preference."""

    number: str                         # "1", "3b", "c2" (a GCIDE compound), "" for an entry's only sense
    text: str                           # the defining text, markup still in
    examples: list[str] = field(default_factory=list)
    term: Optional[str] = None          # a sense that defines another term (GCIDE compounds); None: the entry's
    pos: Optional[str] = None           # n, v, a, r when known
    rejected: Optional[str] = None      # set by the parser when the sense cannot give a row (reason)


@dataclass
class Entry:
    """A parsed article: its term and senses, or the reason it yields none."""

    term: str = ""
    pos: Optional[str] = None
    senses: list[Sense] = field(default_factory=list)
    rejected: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------- text

_SPACE = re.compile(r"\s+")
_BRACES = re.compile(r"\{([^{}]*)\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_UNDERSCORES = re.compile(r"(?<!\w)_([^_]+)_(?!\w)")  # _italic_ (the Devil's Dictionary)

# Words after which a period does not end a sentence (compared lower-case, without the period). Abbreviations that
# are also words ("arch.", "no.", "bot.") are left out: a sentence that ends with the word is commoner.
_ABBREVIATIONS = frozenset("""
    cf eg esp etc ie viz vs mr mrs ms dr st mt jr sr co corp inc ltd dept approx ca al ed eds vol pp sq ft lb oz
    gr lat fr ger prob obs orig usu hist naut zool chem anat geom astron theol eccl
""".split())
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)]*(?=\s+[\"'\u201c\u2018(]*[A-Z0-9])")

# A definition that only sends the reader elsewhere: "See X", "Same as X", or a grammatical form of another word
# ("pret. of X", "3d sing. pres. of X", "imp. & p. p. of X", "pl. of X", "Alt. of X").
_REFERENCE_ONLY = re.compile(
    r"^(?:see(?:\s+also|\s+under)?\b|same\s+as\b|another\s+(?:name|spelling)\s+(?:for|of)\b|"
    r"(?:a\s+)?(?:variant|obsolete|archaic)\s+(?:spelling|form)\s+of\b|plural\s+of\b|"
    r"(?:(?:\d+[a-z]*|[a-z]+\.|&)\s*)+of\b)",
    re.IGNORECASE)


def squash(text: str) -> str:
    """Collapse runs of whitespace (dictionary text is wrapped at ~70 columns) and strip."""
    return _SPACE.sub(" ", text).strip()


def strip_braces(text: str) -> str:
    """``{cross reference}`` -> ``cross reference`` (nested or unbalanced braces are dropped)."""
    previous = None
    while previous != text:
        previous, text = text, _BRACES.sub(r"\1", text)
    return text.replace("{", "").replace("}", "")


def drop_brackets(text: str) -> str:
    """Remove ``[...]`` groups: usage labels ([Obs.], [Colloq.]), notes ([Written also ...]) and source tags."""
    previous = None
    while previous != text:
        previous, text = text, _BRACKETS.sub(" ", text)
    return text


def drop_leading_parens(text: str) -> str:
    """Remove leading ``(...)`` groups, nested ones too: subject labels ("(Bot.)"), abbreviations ("(IMS, IMS/VS)"),
    asides ("(Named after Isaac Newton (1642-1727))")."""
    text = text.lstrip()
    while text.startswith("("):
        depth = 0
        for i, ch in enumerate(text):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        else:
            return text  # unbalanced: leave it, the sentence rule decides
        text = text[i + 1:].lstrip(" ,;:.")
    return text


def unitalic(text: str) -> str:
    return _UNDERSCORES.sub(r"\1", text)


def first_sentence(text: str) -> str:
    """The text up to the first sentence end that is not an abbreviation ("e.g.", "U. S.", "Gr.")."""
    for m in _SENTENCE_END.finditer(text):
        if text[m.start()] == ".":
            word = text[:m.start()].rsplit(None, 1)[-1] if text[:m.start()].strip() else ""
            bare = word.strip("(\"'").lower()
            if len(bare) == 1 or bare in _ABBREVIATIONS or "." in bare:
                continue
        return text[:m.end()]
    return text


def cap_words(text: str, limit: int = MAX_DEFINITION_WORDS) -> Optional[str]:
    """``text`` if it has at most ``limit`` words, else its longest prefix ending at a ``;`` within the limit, else
    None."""
    words = text.split()
    if len(words) <= limit:
        return text
    head = " ".join(words[:limit])
    cut = head.rfind(";")
    return head[:cut].rstrip() if cut > 0 else None


def finish_definition(text: str, limit: int = MAX_DEFINITION_WORDS) -> tuple[Optional[str], Optional[str]]:
    """Defining text (labels, brackets and braces still in) -> ``(definition, None)`` or ``(None, reason)``."""
    text = squash(strip_braces(drop_brackets(text)))
    text = squash(drop_leading_parens(text)).lstrip(".,;:- ")
    if _REFERENCE_ONLY.match(text):
        return None, CROSS_REFERENCE
    text = first_sentence(text).strip()
    text = text.rstrip(" ;,:-").rstrip(".").strip()
    if not any(ch.isalnum() for ch in text):
        return None, EMPTY_DEFINITION
    capped = cap_words(text, limit)
    if capped is None:
        return None, TOO_LONG
    return capped.rstrip(" ;,"), None


def clean_context(text: str) -> str:
    """A usage example or quotation as a context: markup removed, ``[inserted words]`` kept, one line."""
    text = strip_braces(text)
    text = re.sub(r"\[([^\[\]]*)\]", r"\1", text)
    return squash(unitalic(text))


# ------------------------------------------------------------------------------------------------ term matching

_POS_ANY = ("n", "v", "a", "r")
_PUNCT = ".,;:!?()[]\"'\u201c\u201d\u2018\u2019"
_TOKEN_SPLIT = re.compile(r"[\s\-\u2014]+")


class TermMatcher:
    """Does a text contain the term, allowing regular inflections? The forms are WordNet's (:func:`lemma_forms`,
    without ``.exc`` tables: words of a multi-word term joined by spaces or hyphens), compared as whole lower-case
    words -- a token comparison rather than WordNet's regular expression, which is ~100x slower to build for each
    of GCIDE's 100k terms."""

    def __init__(self) -> None:
        self._forms: dict[tuple[str, Optional[str]], tuple[set, list]] = {}

    def _forms_of(self, term: str, pos: Optional[str]) -> tuple[set, list]:
        key = (term.lower(), pos)
        if key not in self._forms:
            forms: set[tuple[str, ...]] = set()
            for p in ((pos,) if pos in _POS_ANY else _POS_ANY):
                forms |= lemma_forms(term, p, {})
            cleaned = {tuple(w.strip(_PUNCT) for w in f) for f in forms}
            self._forms[key] = ({f[0] for f in cleaned if len(f) == 1}, [f for f in cleaned if len(f) > 1])
        return self._forms[key]

    def __call__(self, term: str, pos: Optional[str], text: str) -> bool:
        single, multi = self._forms_of(term, pos)
        tokens = [t.strip(_PUNCT) for t in _TOKEN_SPLIT.split(text.lower())]
        if single.intersection(tokens):
            return True
        return any(tuple(tokens[i:i + len(f)]) == f for f in multi for i in range(len(tokens) - len(f) + 1))


def pick_context(term: str, pos: Optional[str], examples: list[str], matcher: TermMatcher) -> str:
    """The first example that contains the term and has a sensible length, cleaned; "" when none does."""
    for raw in examples:
        text = clean_context(raw)
        n = len(text.split())
        if (MIN_CONTEXT_WORDS <= n <= MAX_CONTEXT_WORDS and text.casefold() != term.casefold()
                and matcher(term, pos, text)):
            return text
    return ""


_QUOTED = re.compile(r"\u201c([^\u201c\u201d]+)\u201d|\"([^\"]+)\"")
_ENDS_SENTENCE = re.compile(r"[.!?\u2026][)'\u2019]*$")


def quoted_spans(text: str) -> list[str]:
    """Quoted sentences (straight or curly double quotes): where FOLDOC, the Jargon File and Bierce put usage
    examples. Only quotations that end like a sentence count: quoted titles of papers and quoted mentions of
    words ("a {cache line} or "cache block"") are not usage examples."""
    spans = (squash(a or b) for a, b in _QUOTED.findall(text))
    return [s for s in spans if _ENDS_SENTENCE.search(s)]


def plain_term(headword: str) -> str:
    """A headword as a term: capitalised-only-because-it-is-a-headword words are lower-cased ("Retreat" ->
    "retreat", "Cascara buckthorn" -> "cascara buckthorn"); anything with another capital stays ("Kuro-Siwo",
    "ALGOL 60", "McIntosh")."""
    term = squash(headword)
    if term[:1].isupper() and not any(ch.isupper() for ch in term[1:]):
        return term[0].lower() + term[1:]
    return term


def paragraphs(text: str) -> list[list[str]]:
    """The text's blank-line-separated paragraphs, each a list of its lines (indentation kept)."""
    out: list[list[str]] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            current.append(line.rstrip())
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def sentences(text: str) -> list[str]:
    """Split a text into sentences with the rule of :func:`first_sentence`."""
    out = []
    rest = squash(text)
    while rest:
        head = first_sentence(rest)
        out.append(head.strip())
        rest = rest[len(head):].strip()
    return out


def lowercase_initials(records: list) -> int:
    """Give definitions WordNet's style: the first word lower-cased when it is an ordinary word ("A mound" -> "a
    mound"), kept when the same dictionary writes it capitalised mid-sentence at least as often as not (a name:
    "Unix", "Microsoft") or the next word is capitalised too ("Computer Definition Language"). Decided per
    dictionary from its own text, so no word list is needed. Returns how many definitions changed."""
    from collections import Counter

    strip = ".,;:()\"'"
    firsts = {r.definition.split(" ", 1)[0].strip(strip) for r in records}
    watched = firsts | {w.lower() for w in firsts}
    seen = Counter(w for r in records for w in (t.strip(strip) for t in r.definition.split()[1:]) if w in watched)
    changed = 0
    for r in records:
        words = r.definition.split(" ", 2)
        w = words[0].strip(strip)
        next_capital = len(words) > 1 and words[1][:1].isupper()  # "Computer Definition Language": a name
        ordinary = w in ("A", "An", "The") or (
            len(w) > 1 and w[0].isupper() and not any(ch.isupper() for ch in w[1:]) and not next_capital
            and (seen[w] == 0 or seen[w.lower()] > seen[w]))
        if ordinary and r.definition[:1].isupper():
            r.definition = r.definition[0].lower() + r.definition[1:]
            changed += 1
    return changed
