"""FOLDOC, the Free On-line Dictionary of Computing, as Debian's ``dict-foldoc`` formats it.

An article::

    cache                                          <- the headword, then its aliases, one a line
    cache memory
                                                   <- paragraphs indented by three spaces
       <memory management> /kash/ A small fast memory holding recently accessed data, ...
       When data is read from, or written to, {main memory} ...   <- elaboration
       (1997-06-25)                                <- date of the last edit

Numbered paragraphs (``1. <subject> ...``) are separate senses; without them the first paragraph with defining text
is the only sense. The definition is that paragraph's first sentence without the ``<subject>`` tags, the
pronunciation (``/kash/``), leading parentheses (abbreviations: ``(IMS, IMS/VS)``) and cross-reference braces.
A sense's context is a quoted example in its paragraphs that contains the term (FOLDOC seldom gives one).

FOLDOC includes most of the Jargon File (articles marked ``[{Jargon File}]``); those are rejected ("from the Jargon
File"), so slang stays in the ``jargon`` source and this one stays technical.
"""
from __future__ import annotations

import re

from lm_lexicon.data.dictionaries.text import Entry, Sense, paragraphs, quoted_spans

NAME = "foldoc"
FROM_JARGON = "from the Jargon File"

_NUMBERED = re.compile(r"^\s*(\d+)\.\s+")
_SUBJECTS = re.compile(r"^\s*(?:<[^<>]*>\s*)+")
_PRONUNCIATION = re.compile(r"^\s*/[^/\s][^/]*/\s*,?\s*")
_DATE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")


def _defining_text(paragraph: list[str]) -> str:
    text = " ".join(line.strip() for line in paragraph)
    text = _NUMBERED.sub("", text, count=1)
    text = _SUBJECTS.sub("", text, count=1)
    return _PRONUNCIATION.sub("", text, count=1)


def parse(text: str) -> Entry:
    """Parse one dict-foldoc article into an :class:`Entry`."""
    paras = paragraphs(text)
    if not paras:
        return Entry(rejected="empty article")
    head, body = paras[0], paras[1:]
    if head[0].startswith(" ") or not head[0].strip():
        return Entry(rejected="malformed head")
    if "%%%" in head[0]:
        return Entry(rejected="database info")  # FOLDOC's own introduction, indexed under its many names
    if any("[{Jargon File}]" in line for p in body for line in p):
        return Entry(rejected=FROM_JARGON)  # the jargon source has it: counting it twice would blur the genres
    entry = Entry(term=head[0].strip())
    body = [p for p in body if not _DATE.match(" ".join(p).strip())]
    numbered = [i for i, p in enumerate(body) if _NUMBERED.match(p[0])]
    if numbered:
        bounds = numbered + [len(body)]
        for start, end in zip(bounds, bounds[1:]):
            number = _NUMBERED.match(body[start][0]).group(1)
            own = " ".join(" ".join(p) for p in body[start:end])
            entry.senses.append(Sense(number=number, text=_defining_text(body[start]), examples=quoted_spans(own)))
    elif body:
        everything = " ".join(" ".join(p) for p in body)
        entry.senses.append(Sense(number="", text=_defining_text(body[0]), examples=quoted_spans(everything)))
    if not entry.senses:
        entry.rejected = "no sense found"
    return entry
