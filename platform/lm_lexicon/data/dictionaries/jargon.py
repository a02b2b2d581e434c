"""The Jargon File (hacker slang, version 4.4.7), as Debian's ``dict-jargon`` formats it.

An article::

    hack                                           <- headword
     /hak/, n.                                     <- pronunciation and part of speech (optional)
                                                   <- paragraphs indented by four spaces
        [very common]                              <- usage / etymology notes in brackets
        1. n. Originally, a quick job that produces what is needed, but not well.
        3. vt. To bear emotionally or physically. “I can't hack this heat!”

Numbered paragraphs are senses (their own part of speech first); without them the first paragraph with text
outside brackets and parentheses is the only sense. The definition is the first sentence without the leading
``[notes]``, part of speech and cross-reference braces. The Jargon File quotes usage in curly quotes: the first
quotation of the sense that contains the term is its context.
"""
from __future__ import annotations

import re

from lm_lexicon.data.dictionaries.text import Entry, Sense, drop_brackets, drop_leading_parens, paragraphs, \
    quoted_spans, squash

NAME = "jargon"

_NUMBERED = re.compile(r"^\s*(\d+)\.\s+")
_POS_WORD = r"(?:n|v|vt|vi|adj|adv|interj|excl|prep|pron|conj|pl|abbrev|obs|var)\."
_POS = re.compile(r"^\s*(" + _POS_WORD + r"(?:\s*(?:,|and|&|or)?\s*" + _POS_WORD + r")*)\s*,?\s*")
_POS_CODE = {"n": "n", "v": "v", "vt": "v", "vi": "v", "adj": "a", "adv": "r"}


def _pos_code(tags: str) -> str | None:
    first = tags.split(".", 1)[0].strip()
    return _POS_CODE.get(first)


def _defining_text(paragraph: list[str]) -> tuple[str, str | None]:
    """``(text without number, notes and part of speech, pos code)``."""
    text = _NUMBERED.sub("", squash(" ".join(paragraph)), count=1)
    text = squash(drop_leading_parens(drop_brackets(text)))
    m = _POS.match(text)
    pos = None
    if m:
        pos, text = _pos_code(m.group(1)), text[m.end():]
    return squash(drop_leading_parens(text)), pos


def parse(text: str) -> Entry:
    """Parse one dict-jargon article into an :class:`Entry`."""
    paras = paragraphs(text)
    if not paras or paras[0][0].startswith(" "):
        return Entry(rejected="malformed head")
    head, body = paras[0], paras[1:]
    entry = Entry(term=head[0].strip())
    if len(head) > 1:  # " /pron/, n." under the headword
        m = _POS.match(head[1].split("/")[-1].lstrip(" ,"))
        entry.pos = _pos_code(m.group(1)) if m else None
    numbered = [p for p in body if _NUMBERED.match(p[0])]
    if numbered:
        for p in numbered:
            defining, pos = _defining_text(p)
            entry.senses.append(Sense(number=_NUMBERED.match(p[0]).group(1), text=defining,
                                      examples=quoted_spans(" ".join(p)), pos=pos or entry.pos))
    else:
        for i, p in enumerate(body):
            defining, pos = _defining_text(p)
            if any(ch.isalpha() for ch in defining):
                everything = " ".join(" ".join(q) for q in body[i:])
                entry.senses.append(Sense(number="", text=defining, examples=quoted_spans(everything),
                                          pos=pos or entry.pos))
                break
    if not entry.senses:
        entry.rejected = "no sense found"
    return entry
