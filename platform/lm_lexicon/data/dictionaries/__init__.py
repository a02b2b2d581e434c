"""Offline dictionaries of different genres (Debian's ``dict-*`` packages), turned into definition-modeling rows.

One parser per dictionary (:mod:`.gcide`, :mod:`.foldoc`, :mod:`.jargon`, :mod:`.devil`) turns an article into
senses; :func:`load_dictd` turns senses into records -- one per sense -- and accounts for everything it read:

* every index line that adds no article (aliases, ``00-database-*`` lines, malformed lines; see
  :func:`lm_lexicon.data.dictd.read_articles`),
* every article that yields no sense (its reason),
* every sense, kept or rejected (cross-reference only, empty, too long, a WordNet gloss in GCIDE, a duplicate),

each rejection with ``index file:line`` (and the sense number), so ``read == kept + rejected``.

Licences decide what may ship: WordNet, the Jargon File and the Devil's Dictionary may be redistributed inside the
package; GCIDE (GPL) and FOLDOC (GFDL) are only ever read from local files the user installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lm_lexicon.data.dictd import DEFAULT_DICTD_DIR, dictionary_files, read_articles
from lm_lexicon.data.dictionaries import devil, foldoc, gcide, jargon
from lm_lexicon.data.dictionaries.text import Entry, TermMatcher, finish_definition, lowercase_initials, pick_context
from lm_lexicon.data.records import LoadReport, Record, split_argument


@dataclass(frozen=True)
class Dictionary:
    """What the loader and the manifest need to know about one dictionary."""

    name: str
    title: str
    package: str          # the Debian package that installs it
    licence: str
    shippable: bool       # may its text go inside the lm-lexicon package?
    genre: str
    parse: Callable[[str], Entry]


DICTIONARIES: dict[str, Dictionary] = {d.name: d for d in (
    Dictionary("gcide", "GCIDE: Webster's Revised Unabridged Dictionary (1913) plus additions", "dict-gcide",
               "GPL-2.0-or-later", False, "general", gcide.parse),
    Dictionary("foldoc", "FOLDOC: the Free On-line Dictionary of Computing", "dict-foldoc",
               "GFDL-1.1-or-later", False, "technical", foldoc.parse),
    Dictionary("jargon", "The Jargon File 4.4.7 (hacker slang)", "dict-jargon", "public domain", True, "slang",
               jargon.parse),
    Dictionary("devil", "The Devil's Dictionary (Ambrose Bierce, 1911)", "dict-devil", "public domain", True,
               "satire", devil.parse),
)}

# Every source a corpus can hold, for the licence table of data.json and docs/DATA.md.
LICENCES: dict[str, dict] = {
    "wordnet": {"title": "WordNet 3.0 (Princeton University)", "licence": "WordNet 3.0 license (BSD-like)",
                "shippable": True, "genre": "general"},
    **{d.name: {"title": d.title, "licence": d.licence, "shippable": d.shippable, "genre": d.genre,
                "debian_package": d.package} for d in DICTIONARIES.values()},
}


def licence_of(source: str) -> dict:
    """The licence entry of a source name; a dataset we do not know is under its own terms."""
    return LICENCES.get(source, {"licence": "see the dataset's own terms", "shippable": None})


def load_dictd(dictionary: str, dictd_dir: str | Path | None = None, source: Optional[str] = None,
               genre: Optional[str] = None, split: Optional[str] = None,
               progress: bool = False) -> tuple[list[Record], LoadReport]:
    """Load one dictd dictionary (``gcide``, ``foldoc``, ``jargon``, ``devil``) as records, one per sense.

    ``dictd_dir`` defaults to /usr/share/dictd; a missing dictionary is a :class:`~lm_lexicon.data.dictd.DictdNotFound`
    naming the Debian package to install. Records carry ``source`` (default: the dictionary's name), ``genre``
    (default: the dictionary's), ``pos`` where the dictionary gives one and ``sense_id`` =
    ``{dictionary}:{index line}:{sense}``. ``split`` is given to every row (default train); the data stage
    instead assigns leak-free splits across sources (:mod:`lm_lexicon.data.mix`).
    """
    info = DICTIONARIES.get(dictionary)
    if info is None:
        raise ValueError(f"unknown dictionary {dictionary!r}; expected one of {sorted(DICTIONARIES)}")
    split_name = split_argument(split)
    index, data = dictionary_files(dictd_dir or DEFAULT_DICTD_DIR, dictionary, info.package)
    report = LoadReport(source=f"dictd:{dictionary}")
    records: list[Record] = []
    seen: set[tuple[str, str]] = set()
    matcher = TermMatcher()
    articles = 0
    for article in read_articles(index, data, report, progress=progress):
        articles += 1
        entry = info.parse(article.text)
        if entry.rejected:
            report.reject(entry.rejected, article.where)
            continue
        for sense in entry.senses:
            where = f"{article.where} (sense {sense.number})" if sense.number else article.where
            term = sense.term or entry.term
            definition, problem = finish_definition(sense.text)
            problem = sense.rejected or ("empty term" if not term else problem)
            if problem:
                report.reject(problem, where)
                continue
            key = (term.casefold(), definition.casefold())
            if key in seen:
                report.reject("duplicate", where)
                continue
            seen.add(key)
            pos = sense.pos or (entry.pos if sense.term is None else None)
            records.append(Record(term=term, context=pick_context(term, pos, sense.examples, matcher),
                                  definition=definition, source=source or dictionary, split=split_name, pos=pos,
                                  sense_id=f"{dictionary}:{article.line}:{sense.number or 0}",
                                  genre=genre or info.genre))
            report.keep()
    lowercase_initials(records)
    report.details = {"articles": articles, "with_context": sum(1 for r in records if r.context),
                      "licence": info.licence, "debian_package": info.package}
    report.check()
    return records, report
