"""Ambrose Bierce's *The Devil's Dictionary* (1911), as Debian's ``dict-devil`` formats it.

An article::

    ALONE, adj.  In bad company.                   <- HEADWORD[, VARIANT | or VARIANT], part of speech, definition

        In contact, lo! the flint and steel,       <- an illustrative verse (indented), its author far right
        ...
                                        Booley Fito

Every entry has one sense. The definition is the first sentence after the part of speech; Bierce's later sentences
extend the joke. An entry that is only a verse (``DEAD, adj.`` then a poem) has no prose definition and is
rejected ("verse only"). Contexts: a quotation (``"..."``) or a verse sentence that contains the term. Headwords are
upper-case by typographic convention and become lower-case terms.
"""
from __future__ import annotations

import re

from lm_lexicon.data.dictionaries.text import Entry, Sense, paragraphs, quoted_spans, sentences, squash, unitalic

NAME = "devil"

_POS_WORD = r"(?:v\.\s?t|v\.\s?i|n|v|adj|adv|pp|p|pl|prep|conj|interj|pron|pro|x)\."
# "BABE or BABY, n.", "TZETZE (or TSETSE) FLY, n.", "INFERIAE,n.": upper-case headwords, then the part of speech.
_HEADWORDS = r"(?P<head>[^a-z(]+?(?:(?:\s+or\s+|\s*\(or\s+[^a-z)]+\)\s*)[^a-z(]+?)*)"
_HEAD = re.compile(r"^" + _HEADWORDS + r"(?:,|\.)?\s*(?P<pos>" + _POS_WORD + r"(?:\s*(?:,|and|&|or)?\s*" + _POS_WORD +
                   r")*)\s*(?P<rest>.*)$", re.DOTALL)
_BARE_HEAD = re.compile(r"^(?P<head>[^a-z]+?)(?:[.?!]|\s{2,}|\s+\[)(?P<rest>.*)$", re.DOTALL)
_POS_CODE = {"n": "n", "v": "v", "adj": "a", "adv": "r"}
_AUTHOR_COLUMN = 20


def _head(first: str) -> tuple[str, str | None, str]:
    """``(term, pos code, definition text)`` of the first paragraph; term "" if it has no head."""
    m = _HEAD.match(first)
    pos = None
    if m:
        pos = _POS_CODE.get(m.group("pos").split(".", 1)[0].strip())
    else:
        m = _BARE_HEAD.match(first)
        if not m:
            return "", None, ""
    headword = re.split(r",|\s+or\s+", m.group("head"))[0].strip(" .?!")
    rest = m.group("rest").strip()
    rest = re.sub(r"^\[[^\]]*\]\s*", "", rest)  # "CUI BONO?  [Latin]  What good ..."
    return headword.lower(), pos, rest


def parse(text: str) -> Entry:
    """Parse one dict-devil article into an :class:`Entry`."""
    paras = paragraphs(text)
    if not paras or paras[0][0].startswith(" "):
        return Entry(rejected="malformed head")
    term, pos, rest = _head(squash(" ".join(paras[0])))
    if not term:
        return Entry(rejected="malformed head")
    if not any(ch.isalpha() for ch in rest):
        return Entry(term=term, pos=pos, rejected="verse only")
    examples = quoted_spans(" ".join(" ".join(p) for p in paras))
    for p in paras[1:]:
        if p[0].startswith(" "):  # a verse; its author is the line far to the right
            verse = " ".join(line.strip() for line in p if len(line) - len(line.lstrip()) < _AUTHOR_COLUMN)
            examples += [verse] + sentences(verse)
    return Entry(term=term, pos=pos, senses=[Sense(number="", text=unitalic(rest), examples=examples, pos=pos)])
