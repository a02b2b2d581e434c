"""The embedded default corpus: WordNet 3.0 definition-modeling triples, and the builder that makes them.

Why this exists: a ``pip install`` must be able to train and evaluate with nothing else downloaded, so a small
(term, usage example, definition) set is shipped as package data (``lm_lexicon/resources/wordnet_dm.jsonl.gz``).
This module is also the reproducible recipe for that file: it reads a WordNet dict directory (Debian's
``wordnet-base`` installs one at /usr/share/wordnet) with a self-contained parser -- no nltk corpus reader, no
downloads -- so the packaged file can be rebuilt byte for byte on any machine that has the dict files.

A triple comes from a synset with quoted examples: for each lemma of the synset that occurs in an example (allowing
regular inflections and WordNet's irregular ``*.exc`` forms) we emit ``(lemma, example, definition)``.

The split is by connected components of the bipartite term--synset graph. Splitting by term alone is not enough:
synonyms share a definition, so a test term's definition would be seen in training under its synonym
(DESIGN.md measured 26.7% of test definitions leaking that way). Components guarantee that no term and no synset
appears in two splits.

Accounting: the builder's :class:`LoadReport` counts candidate items. Every kept triple is one ``kept``; every item
that yields no triple is one ``rejected`` with a reason -- a malformed line, a synset without examples, an example
in which no lemma of its synset occurs, a duplicate triple, a malformed ``.exc`` line. So ``read == kept + rejected``
holds and nothing disappears silently; line-level totals (lines per file, licence header lines) are in the stats.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Optional

from lm_lexicon.data.records import SPLITS, LoadError, LoadReport, Record, read_jsonl

SOURCE = "wordnet"
RESOURCE_PACKAGE = "lm_lexicon"
RESOURCE_DIR = "resources"
CORPUS_FILE = "wordnet_dm.jsonl.gz"
COUNTS_FILE = "wordnet_dm.counts.json"

#: WordNet file suffix per part of speech; ``s`` (adjective satellite) lives in data.adj.
POS_FILES: dict[str, str] = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
#: Fractions of triples aimed at per split.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "valid": 0.1, "test": 0.1}

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic position markers on adjective lemmas, e.g. "ready(p)"
_QUOTED = re.compile(r'"([^"]*)"')
_VERSION = re.compile(r"WordNet\s+(\d+(?:\.\d+)*)")
_VOWELS = set("aeiou")


# --------------------------------------------------------------------------------------------------------------
# Locating the dict directory
# --------------------------------------------------------------------------------------------------------------

def _candidate_dirs() -> list[Path]:
    """Places a WordNet dict directory is commonly found, in the order they are tried."""
    out: list[Path] = [Path("/usr/share/wordnet"), Path("/usr/local/share/wordnet"),
                       Path("/usr/share/wordnet/dict")]
    nltk_roots: list[Path] = []
    for root in os.environ.get("NLTK_DATA", "").split(os.pathsep):
        if root:
            nltk_roots.append(Path(root))
    nltk_roots += [Path.home() / "nltk_data", Path(sys.prefix) / "nltk_data", Path(sys.prefix) / "share" / "nltk_data",
                   Path(sys.prefix) / "lib" / "nltk_data", Path("/usr/share/nltk_data"),
                   Path("/usr/local/share/nltk_data"), Path("/usr/lib/nltk_data"), Path("/usr/local/lib/nltk_data")]
    for root in nltk_roots:
        out.append(root / "corpora" / "wordnet")
    return out


def _is_wordnet_dir(path: Path) -> bool:
    return (path / "data.noun").is_file()


def find_wordnet_dir(path: str | Path | None = None) -> Path:
    """Return a WordNet dict directory (one holding ``data.noun`` etc.).

    With ``path`` given it must be such a directory. Otherwise /usr/share/wordnet and the usual NLTK data
    locations (``$NLTK_DATA``, ``~/nltk_data`` ...) are tried; an unzipped ``corpora/wordnet`` is needed, since
    we read the plain files rather than going through nltk. Raises :class:`FileNotFoundError` listing every
    place looked, so the user knows where to put the files (or to ``apt-get install wordnet-base``).
    """
    if path is not None:
        p = Path(path).expanduser()
        if _is_wordnet_dir(p):
            return p
        raise FileNotFoundError(f"{p} is not a WordNet dict directory (no data.noun there)")
    tried = _candidate_dirs()
    for p in tried:
        if _is_wordnet_dir(p):
            return p
    listing = "\n  ".join(str(p) for p in tried)
    raise FileNotFoundError(
        "No WordNet dict directory found (a directory with data.noun, data.verb, data.adj, data.adv). "
        f"Looked in:\n  {listing}\n"
        "Install Debian/Ubuntu's `wordnet-base`, or pass the directory explicitly.")


# --------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Synset:
    """One line of a WordNet ``data.*`` file, reduced to what definition modeling needs."""

    offset: str          # 8-digit byte offset, unique within its data file
    pos: str             # file part of speech: n, v, a, r (satellites folded into a)
    ss_type: str         # as written in the line: n, v, a, s, r
    lemmas: list[str]    # surface forms with underscores replaced by spaces, adjective markers removed
    definition: str
    examples: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Unique synset id across the four data files."""
        return f"{self.pos}{self.offset}"


class MalformedLine(ValueError):
    """A data line that does not follow the ``wndb`` layout."""


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a gloss into (definition, examples).

    The definition is the text before the first double quote, with the ``; `` separator trimmed; the examples are
    the quoted strings. A handful of WordNet 3.0 glosses have unbalanced quotes; pairing quotes left to right keeps
    what is recoverable and never crashes.
    """
    gloss = gloss.strip()
    q = gloss.find('"')
    definition = (gloss if q < 0 else gloss[:q]).strip().rstrip(";").strip()
    examples = [m.strip() for m in _QUOTED.findall(gloss[q:])] if q >= 0 else []
    return definition, [e for e in examples if e]


def parse_data_line(line: str, file_pos: str) -> Synset:
    """Parse one synset line: ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt ptr... [frames] | gloss``.

    Raises :class:`MalformedLine` with the reason when the layout is violated.
    """
    head, sep, gloss = line.partition(" | ")
    if not sep:
        # a gloss is mandatory in wndb; "|" at the very end (empty gloss) still has the separator
        head, sep, gloss = line.rstrip().partition(" |")
        if not sep:
            raise MalformedLine("no gloss separator '|'")
    fields = head.split()
    if len(fields) < 6:
        raise MalformedLine("too few fields")
    offset, _lex_filenum, ss_type, w_cnt_hex = fields[:4]
    if not (len(offset) == 8 and offset.isdigit()):
        raise MalformedLine(f"bad offset {offset!r}")
    if ss_type not in ("n", "v", "a", "s", "r"):
        raise MalformedLine(f"bad synset type {ss_type!r}")
    pos = "a" if ss_type == "s" else ss_type
    if pos != file_pos:
        raise MalformedLine(f"synset type {ss_type!r} in the {POS_FILES[file_pos]} file")
    try:
        w_cnt = int(w_cnt_hex, 16)
    except ValueError:
        raise MalformedLine(f"bad word count {w_cnt_hex!r}") from None
    words = fields[4:4 + 2 * w_cnt:2]
    if w_cnt == 0 or len(fields) < 4 + 2 * w_cnt + 1:
        raise MalformedLine("word list shorter than its count")
    lemmas: list[str] = []
    for w in words:
        w = _ADJ_MARKER.sub("", w).replace("_", " ").strip()
        if w and w not in lemmas:
            lemmas.append(w)
    p_field = fields[4 + 2 * w_cnt]
    if not p_field.isdigit():
        raise MalformedLine(f"bad pointer count {p_field!r}")
    definition, examples = parse_gloss(gloss)
    return Synset(offset=offset, pos=pos, ss_type=ss_type, lemmas=lemmas, definition=definition, examples=examples)


def _read_lines(path: Path) -> list[str]:
    """All lines of a dict file, decoded; an unreadable file raises :class:`LoadError` naming file and line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LoadError(path, f"cannot read: {e.strerror or e}") from e
    lines = []
    for i, b in enumerate(raw.splitlines(), 1):
        try:
            lines.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise LoadError(path, f"not UTF-8 text ({e.reason} at byte {e.start})", line=i) from e
    return lines


def read_exceptions(wordnet_dir: Path, report: Optional[LoadReport] = None) -> dict[str, dict[str, set[str]]]:
    """Irregular forms from ``{noun,verb,adj,adv}.exc``, inverted: ``{pos: {base: {inflected, ...}}}``.

    Keys and forms are lower-cased with ``_`` kept as the word separator. A missing .exc file only means fewer
    irregular forms (some NLTK packagings drop adv.exc), so it is tolerated; malformed lines are counted.
    """
    out: dict[str, dict[str, set[str]]] = {p: defaultdict(set) for p in POS_FILES}
    for pos, name in POS_FILES.items():
        path = wordnet_dir / f"{name}.exc"
        if not path.is_file():
            continue
        for i, line in enumerate(_read_lines(path), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                if report is not None:
                    report.reject("malformed exc line", f"{path.name}:{i}")
                continue
            inflected = parts[0].lower()
            for base in parts[1:]:
                out[pos][base.lower()].add(inflected)
    return {p: dict(d) for p, d in out.items()}


# --------------------------------------------------------------------------------------------------------------
# Matching a lemma in an example
# --------------------------------------------------------------------------------------------------------------

def _is_cvc(w: str) -> bool:
    """Consonant-vowel-consonant ending: the shape that doubles its last letter (stop -> stopped, big -> bigger)."""
    return (len(w) >= 3 and w[-1] not in _VOWELS and w[-1] not in "wxy" and w[-2] in _VOWELS
            and w[-3] not in _VOWELS)


def regular_inflections(word: str, pos: str) -> set[str]:
    """Regular inflected forms of one (lower-case) word for a part of speech, the base form included.

    Over-generation (e.g. doubling in unstressed syllables, "visitted") is harmless: an impossible form never
    occurs in an example, while a missing form loses a triple.
    """
    w = word
    forms = {w}
    ends_cons_y = len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS
    if pos in ("n", "v"):
        forms |= {w + "s", w + "es"}
        if ends_cons_y:
            forms.add(w[:-1] + "ies")
    if pos == "v":
        forms |= {w + "ed", w + "ing"}
        if w.endswith("e"):
            forms |= {w + "d", w[:-1] + "ing"}
        if w.endswith("ie"):
            forms.add(w[:-2] + "ying")  # die -> dying
        if ends_cons_y:
            forms.add(w[:-1] + "ied")
        if _is_cvc(w):
            forms |= {w + w[-1] + "ed", w + w[-1] + "ing"}
        if w.endswith("c"):
            forms |= {w + "ked", w + "king"}  # panic -> panicked
    if pos in ("a", "r"):
        forms |= {w + "er", w + "est"}
        if w.endswith("e"):
            forms |= {w + "r", w + "st"}
        if ends_cons_y:
            forms |= {w[:-1] + "ier", w[:-1] + "iest"}
        if _is_cvc(w):
            forms |= {w + w[-1] + "er", w + w[-1] + "est"}
    return forms


_SPLIT_WORDS = re.compile(r"[ _\-]+")


def lemma_forms(lemma: str, pos: str, exceptions: dict[str, dict[str, set[str]]]) -> set[tuple[str, ...]]:
    """All surface forms of a lemma, each as a tuple of lower-case words.

    Multi-word lemmas inflect their head: the last word for nouns/adjectives ("attorney generals"), the first for
    verbs ("looked up"); we try both ends for every POS, which costs nothing and catches the odd compound.
    Irregular forms come from the ``.exc`` table of the lemma's POS, whole-lemma entries ("looked_up") and
    single-word entries for the inflected word alike.
    """
    words = tuple(w for w in _SPLIT_WORDS.split(lemma.lower()) if w)
    if not words:
        return set()
    exc = exceptions.get(pos, {})

    def word_forms(w: str) -> set[str]:
        return regular_inflections(w, pos) | exc.get(w, set())

    forms: set[tuple[str, ...]] = {words}
    for f in word_forms(words[-1]):
        forms.add(words[:-1] + (f,))
    if len(words) > 1:
        for f in word_forms(words[0]):
            forms.add((f,) + words[1:])
    for inflected in exc.get("_".join(words), set()):
        forms.add(tuple(w for w in _SPLIT_WORDS.split(inflected) if w))
    return {f for f in forms if f}


def compile_lemma_pattern(lemma: str, pos: str, exceptions: dict[str, dict[str, set[str]]]) -> re.Pattern:
    """A case-insensitive pattern matching any form of ``lemma`` as whole words.

    Words of a multi-word lemma may be joined by a space or a hyphen ("ice cream" / "ice-cream"). Boundaries are
    look-arounds on word characters rather than ``\\b`` so lemmas ending in punctuation ("A.D.", "C++") work.
    """
    alts = sorted({r"[ \-]".join(re.escape(w) for w in f) for f in lemma_forms(lemma, pos, exceptions)},
                  key=lambda s: (-len(s), s))
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


class LemmaMatcher:
    """Caches one compiled pattern per (lemma, POS): common lemmas recur across many synsets."""

    def __init__(self, exceptions: dict[str, dict[str, set[str]]]):
        self.exceptions = exceptions
        self._cache: dict[tuple[str, str], re.Pattern] = {}

    def __call__(self, lemma: str, pos: str, text: str) -> bool:
        key = (lemma.lower(), pos)
        pat = self._cache.get(key)
        if pat is None:
            pat = self._cache[key] = compile_lemma_pattern(lemma, pos, self.exceptions)
        return pat.search(text) is not None


# --------------------------------------------------------------------------------------------------------------
# Building the triples
# --------------------------------------------------------------------------------------------------------------

def sense_id(lemma: str, synset: Synset) -> str:
    """``lemma%{pos}{offset}``: unique per (lemma, synset), and readable (``dog%n02084071``)."""
    return f"{lemma.lower().replace(' ', '_')}%{synset.key}"


def _progress(iterable, progress: bool, **kw):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def read_synsets(wordnet_dir: Path, report: LoadReport, stats: dict, progress: bool = False) -> Iterator[Synset]:
    """Yield the synsets of the four data files in file order, counting malformed lines in ``report``.

    A missing data file raises :class:`LoadError`: a corpus silently built from three parts of speech would be
    a different corpus under the same name.
    """
    versions: set[str] = set()
    lines_per_file: dict[str, int] = {}
    header_lines = 0
    for pos, name in POS_FILES.items():
        path = wordnet_dir / f"data.{name}"
        if not path.is_file():
            raise LoadError(path, "missing WordNet data file")
        lines = _read_lines(path)
        lines_per_file[path.name] = len(lines)
        for i, line in enumerate(_progress(lines, progress, desc=f"parse data.{name}", unit="line",
                                           leave=False), 1):
            if line.startswith("  "):
                # the licence header: numbered lines starting with two spaces
                header_lines += 1
                m = _VERSION.search(line)
                if m:
                    versions.add(m.group(1))
                continue
            if not line.strip():
                report.reject("blank data line", f"{path.name}:{i}")
                continue
            try:
                yield parse_data_line(line, pos)
            except MalformedLine as e:
                report.reject("malformed data line", f"{path.name}:{i} ({e})")
    stats["lines_per_file"] = lines_per_file
    stats["header_lines"] = header_lines
    stats["wordnet_version"] = sorted(versions)[-1] if versions else "unknown"


def extract_triples(synsets: Iterable[Synset], matcher: LemmaMatcher, report: LoadReport,
                    stats: dict) -> list[Record]:
    """Turn synsets into (lemma, example, definition) records, counting everything that yields none."""
    records: list[Record] = []
    seen: set[tuple[str, str, str]] = set()
    n_synsets = n_with_examples = n_examples = 0
    for ss in synsets:
        n_synsets += 1
        if not ss.examples:
            report.reject("no examples", ss.key)
            continue
        if not ss.definition:
            report.reject("empty definition", ss.key)
            continue
        n_with_examples += 1
        for ex in ss.examples:
            n_examples += 1
            matched = [lemma for lemma in ss.lemmas if matcher(lemma, ss.pos, ex)]
            if not matched:
                report.reject("lemma not in example", ss.key)
                continue
            for lemma in matched:
                sid = sense_id(lemma, ss)
                key = (sid, ex, ss.definition)
                if key in seen:
                    report.reject("duplicate triple", sid)
                    continue
                seen.add(key)
                records.append(Record(term=lemma, context=ex, definition=ss.definition, source=SOURCE, lang="en",
                                      pos=ss.pos, sense_id=sid))
                report.keep()
    stats.update(synsets=n_synsets, synsets_with_examples=n_with_examples, examples=n_examples)
    return records


# --------------------------------------------------------------------------------------------------------------
# Leak-free split
# --------------------------------------------------------------------------------------------------------------

def synset_of(record: Record) -> str:
    """The synset key of a WordNet record (the part of its sense id after ``%``)."""
    return (record.sense_id or "").rsplit("%", 1)[-1]


def term_key(term: str) -> str:
    """Terms are compared case-insensitively: "Bush" in train and "bush" in test would still leak."""
    return term.lower()


class UnionFind:
    """Disjoint sets of string nodes (also used by :mod:`lm_lexicon.data.mix` for the split across sources)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        parent.setdefault(x, x)
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression keeps the big WordNet component cheap
            parent[x], x = root, parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # deterministic: the smaller id becomes the root, independent of insertion order
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def components(records: list[Record]) -> dict[str, list[int]]:
    """Connected components of the bipartite term--synset graph: ``{component id: [record indices]}``.

    The component id is its smallest node name, so ids (and everything derived from them) do not depend on
    record order.
    """
    uf = UnionFind()
    for r in records:
        uf.union("t:" + term_key(r.term), "s:" + synset_of(r))
    comps: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        comps[uf.find("s:" + synset_of(r))].append(i)
    return dict(comps)


def assign_splits(records: list[Record], seed: int = 0, fractions: dict[str, float] | None = None,
                  big_fraction: float = 0.005) -> dict:
    """Set ``record.split`` so whole components go to one split, aiming at ``fractions`` of triples.

    Components bigger than ``big_fraction`` of all triples go to train: one of them in valid or test would blow
    the target and make those splits one-topic. The rest are shuffled with ``random.Random(seed)`` (from an
    order fixed by component id, so the result only depends on the seed) and dealt out greedily: a component
    goes to test while it fits under the test target, else to valid while it fits there, else to train.
    Returns component statistics.
    """
    fractions = fractions or SPLIT_FRACTIONS
    comps = components(records)
    total = len(records)
    targets = {s: fractions.get(s, 0.0) * total for s in SPLITS}
    sizes = {cid: len(idx) for cid, idx in comps.items()}
    big_limit = max(1.0, big_fraction * total)
    big = sorted((cid for cid in comps if sizes[cid] > big_limit), key=lambda c: (-sizes[c], c))
    small = sorted(cid for cid in comps if sizes[cid] <= big_limit)
    random.Random(seed).shuffle(small)

    filled = Counter({s: 0 for s in SPLITS})
    split_of: dict[str, str] = {}
    for cid in big:
        split_of[cid] = "train"
        filled["train"] += sizes[cid]
    for cid in small:
        n = sizes[cid]
        for s in ("test", "valid"):
            if filled[s] + n <= targets[s]:
                break
        else:
            s = "train"
        split_of[cid] = s
        filled[s] += n
    for cid, idx in comps.items():
        for i in idx:
            records[i].split = split_of[cid]

    size_hist = Counter(sizes.values())
    by_size = sorted(sizes.values(), reverse=True)
    return {
        "components": len(comps),
        "largest": by_size[:5],
        "largest_fraction": round(by_size[0] / total, 4) if total else 0.0,
        "singletons": size_hist.get(1, 0),
        "big_to_train": len(big),
        "big_limit": big_limit,
        "size_histogram": {k: size_hist[k] for k in sorted(size_hist)[:10]},
        "components_per_split": dict(Counter(split_of.values())),
    }


def split_counts(records: list[Record]) -> dict:
    """Triples, distinct terms and distinct synsets per split and in total."""
    out: dict = {}
    for s in SPLITS:
        rs = [r for r in records if r.split == s]
        out[s] = {"triples": len(rs), "terms": len({r.term for r in rs}), "synsets": len({synset_of(r) for r in rs})}
    out["total"] = {"triples": len(records), "terms": len({r.term for r in records}),
                    "synsets": len({synset_of(r) for r in records})}
    return out


def check_leak_free(records: Iterable[Record]) -> None:
    """Raise :class:`AssertionError` if any term (case-insensitively) or synset is in more than one split."""
    term_splits: dict[str, set[str]] = defaultdict(set)
    synset_splits: dict[str, set[str]] = defaultdict(set)
    for r in records:
        term_splits[term_key(r.term)].add(r.split)
        synset_splits[synset_of(r)].add(r.split)
    bad_t = [t for t, s in term_splits.items() if len(s) > 1]
    bad_s = [t for t, s in synset_splits.items() if len(s) > 1]
    if bad_t or bad_s:
        raise AssertionError(f"split leaks: {len(bad_t)} terms (e.g. {bad_t[:3]}) and {len(bad_s)} synsets "
                             f"(e.g. {bad_s[:3]}) appear in more than one split")


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------

def _order_key(r: Record) -> tuple:
    return (SPLITS.index(r.split), r.pos or "", synset_of(r), r.sense_id or "", r.context)


def build_wordnet_corpus(wordnet_dir: str | Path | None = None, seed: int = 0,
                         progress: bool = True) -> tuple[list[Record], LoadReport, dict]:
    """Build the WordNet definition-modeling corpus from a dict directory.

    Returns ``(records, report, stats)``: records ordered by split, POS, synset, sense and example (so the output
    is a pure function of the input files and ``seed``); a report whose ``read == kept + rejected``; and stats
    (counts per split, component sizes, lines per file, WordNet version, seed, build seconds).
    """
    t0 = time.perf_counter()
    wn_dir = find_wordnet_dir(wordnet_dir)
    report = LoadReport(source=SOURCE)
    stats: dict = {"wordnet_dir": str(wn_dir), "seed": seed}
    matcher = LemmaMatcher(read_exceptions(wn_dir, report))
    records = extract_triples(read_synsets(wn_dir, report, stats, progress=progress), matcher, report, stats)
    stats["component_stats"] = assign_splits(records, seed=seed)
    records.sort(key=_order_key)
    check_leak_free(records)
    report.check()
    stats["counts"] = split_counts(records)
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    return records, report, stats


def _record_line(r: Record) -> str:
    # compact separators; Record.from_dict reads it back, so read_jsonl works on the packaged file unchanged
    return json.dumps(r.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"


def write_corpus_gz(records: Iterable[Record], path: str | Path) -> str:
    """Write records as gzip -9 JSON lines with a zero mtime and no embedded name, so identical input gives
    identical bytes. Returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for r in records:
            gz.write(_record_line(r).encode("utf-8"))
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def counts_document(records: list[Record], stats: dict, report: LoadReport, sha256: str | None = None) -> dict:
    """What ``wordnet_dm.counts.json`` holds: per-split counts plus enough provenance to rebuild and compare."""
    counts = split_counts(records)
    return {
        "source": SOURCE,
        "wordnet_version": stats.get("wordnet_version", "unknown"),
        "seed": stats.get("seed"),
        "builder": "python -m lm_lexicon.data.wordnet",
        "total": counts["total"],
        "splits": {s: counts[s] for s in SPLITS},
        "components": stats.get("component_stats", {}),
        "load_report": report.to_dict(),
        "sha256": sha256,
    }


def _resource(name: str):
    return resources.files(RESOURCE_PACKAGE).joinpath(RESOURCE_DIR, name)


def load_packaged_corpus(split: str | None = None) -> list[Record]:
    """The shipped WordNet corpus (``lm_lexicon/resources/wordnet_dm.jsonl.gz``), optionally one split only."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    res = _resource(CORPUS_FILE)
    if not res.is_file():
        raise FileNotFoundError(f"packaged corpus {CORPUS_FILE} missing from {RESOURCE_PACKAGE}/{RESOURCE_DIR}; "
                                "rebuild it with `python -m lm_lexicon.data.wordnet`")
    with resources.as_file(res) as path:
        records = list(read_jsonl(path))
    return records if split is None else [r for r in records if r.split == split]


def packaged_counts() -> dict:
    """The counts document shipped beside the corpus (see :func:`counts_document`)."""
    res = _resource(COUNTS_FILE)
    return json.loads(res.read_text(encoding="utf-8"))


def _default_out_dir() -> Path:
    return Path(__file__).resolve().parent.parent / RESOURCE_DIR


def write_packaged_corpus(wordnet_dir: str | Path | None = None, out_dir: str | Path | None = None, seed: int = 0,
                          progress: bool = True) -> tuple[Path, Path, dict]:
    """Build the corpus and write ``wordnet_dm.jsonl.gz`` and ``wordnet_dm.counts.json`` (default: the package's)."""
    records, report, stats = build_wordnet_corpus(wordnet_dir, seed=seed, progress=progress)
    out = Path(out_dir) if out_dir is not None else _default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    sha = write_corpus_gz(records, out / CORPUS_FILE)
    doc = counts_document(records, stats, report, sha256=sha)
    (out / COUNTS_FILE).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    print(report.summary())
    for s in (*SPLITS, "total"):
        c = doc["total"] if s == "total" else doc["splits"][s]
        print(f"{s:>6}: {c['triples']:>6} triples  {c['terms']:>6} terms  {c['synsets']:>6} synsets")
    cs = stats["component_stats"]
    print(f"components: {cs['components']} (largest {cs['largest']}, {cs['singletons']} singletons)")
    print(f"wrote {out / CORPUS_FILE} ({(out / CORPUS_FILE).stat().st_size / 1e6:.2f} MB) and {out / COUNTS_FILE} "
          f"in {stats['build_seconds']} s")
    return out / CORPUS_FILE, out / COUNTS_FILE, doc


def main(argv: list[str] | None = None) -> int:
    """Build the corpus and write ``wordnet_dm.jsonl.gz`` and ``wordnet_dm.counts.json``."""
    ap = argparse.ArgumentParser(prog="python -m lm_lexicon.data.wordnet", description=main.__doc__)
    ap.add_argument("--wordnet-dir", default=None, help="WordNet dict directory (default: auto-detect)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the component split")
    ap.add_argument("--out-dir", default=str(_default_out_dir()), help="where to write the two files")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    write_packaged_corpus(args.wordnet_dir, args.out_dir, seed=args.seed, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
