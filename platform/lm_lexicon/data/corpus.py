"""The dataset a pipeline run sees: configured sources loaded, split, subsampled, checked and summarised."""
from __future__ import annotations

import json
import random
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lm_lexicon.data.records import SPLITS, LoadReport, Record, read_jsonl, write_jsonl


@dataclass
class Corpus:
    """Rows by split plus the loaders' reports (what was read, kept and rejected, per source)."""

    splits: dict[str, list[Record]]
    reports: list[LoadReport] = field(default_factory=list)
    subsampled: dict[str, dict] = field(default_factory=dict)
    capped: dict[str, dict] = field(default_factory=dict)   # source -> per-source cap applied (max_rows)
    mix: Optional[dict] = None                               # the split across sources, when dictd rows needed one

    def __getitem__(self, split: str) -> list[Record]:
        return self.splits[split]

    @property
    def n_rows(self) -> int:
        return sum(len(v) for v in self.splits.values())


def _subsample(rows: list[Record], n: int | None, seed: int) -> list[Record]:
    if n is None or n >= len(rows):
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def loader_arguments(spec) -> dict:
    """A config :class:`~lm_lexicon.config.SourceSpec` -> the arguments of its loader (see ``loaders.load_any``)."""
    if spec.format == "wordnet":
        return {"format": "wordnet"}
    if spec.format == "dictd":
        # GCIDE takes ~10 s to parse: a progress bar (cleared when done) says the stage is working
        args = {"format": "dictd", "dictionary": spec.dictionary, "dictd_dir": spec.dictd_dir, "progress": True}
        return {**args, "source": spec.name} if spec.name else args
    args: dict = {"format": spec.format, "path": spec.path}
    if spec.format == "ishiwatari" and spec.name:
        args["name"] = spec.name
    if spec.format == "multilingual":
        args["lang"] = spec.lang
    if spec.format in ("table", "hf"):
        args.update(columns=dict(spec.columns), lang=spec.lang)
        if spec.name:
            args["source"] = spec.name
    return args


def load_corpus(data_cfg) -> Corpus:
    """Load every configured source and group rows by split; capping and subsampling are seeded and reported,
    never silent.

    Per source: the recipe's ``genre`` is set on its rows, then its ``max_rows`` cap applies. Rows of ``dictd``
    sources without a forced ``split`` get a split that is leak-free across all sources (:mod:`lm_lexicon.data.mix`);
    the other sources keep theirs. Rows stay in recipe order within a split.
    """
    from lm_lexicon.data.loaders import load_any
    from lm_lexicon.data.mix import assign_mixed_splits, cap_rows

    reports: list[LoadReport] = []
    loaded: list[list[Record]] = []
    capped: dict[str, dict] = {}
    pinned: list[Record] = []
    free: list[Record] = []
    for spec in data_cfg.sources:
        rows, report = load_any(loader_arguments(spec))
        reports.append(report)
        for r in rows:
            if spec.genre is not None:
                r.genre = spec.genre
            if spec.split is not None:
                r.split = spec.split
            elif r.split not in SPLITS:
                raise ValueError(f"{report.source}: row with unknown split {r.split!r}; expected one of {SPLITS}")
        rows, cap = cap_rows(rows, spec.max_rows, data_cfg.seed, report.source)
        if cap is not None:
            capped[report.source] = cap
        (free if spec.format == "dictd" and spec.split is None else pinned).extend(rows)
        loaded.append(rows)
    mix = assign_mixed_splits(pinned, free, seed=data_cfg.seed) if free else None
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for rows in loaded:
        for r in rows:
            splits[r.split].append(r)
    limits = {"train": data_cfg.max_train_rows, "valid": data_cfg.max_valid_rows, "test": data_cfg.max_test_rows}
    subsampled = {}
    for split, limit in limits.items():
        before = len(splits[split])
        splits[split] = _subsample(splits[split], limit, data_cfg.seed)
        if len(splits[split]) != before:
            subsampled[split] = {"available": before, "kept": len(splits[split]), "seed": data_cfg.seed}
    return Corpus(splits=splits, reports=reports, subsampled=subsampled, capped=capped, mix=mix)


def corpus_stats(splits: dict[str, list[Record]]) -> dict:
    """Counts per split and source, definition length distribution, and cross-split overlap checks."""
    out: dict = {"splits": {}, "overlap": {}}
    terms: dict[str, set] = {}
    definitions: dict[str, set] = {}
    for split, rows in splits.items():
        lengths = [len(r.definition.split()) for r in rows]
        terms[split] = {r.term.lower() for r in rows}
        definitions[split] = {r.definition for r in rows}
        qs = statistics.quantiles(lengths, n=20) if len(lengths) >= 2 else [float(lengths[0])] * 19 if lengths else []
        out["splits"][split] = {
            "rows": len(rows),
            "terms": len(terms[split]),
            "definitions": len(definitions[split]),
            "with_context": sum(1 for r in rows if r.context),
            "sources": dict(Counter(r.source for r in rows).most_common()),
            "genres": dict(Counter(r.genre for r in rows if r.genre is not None).most_common()),
            "langs": dict(Counter(r.lang for r in rows).most_common()),
            "definition_words": {
                "mean": round(statistics.fmean(lengths), 2) if lengths else 0.0,
                "p05": qs[0] if qs else 0, "median": statistics.median(lengths) if lengths else 0,
                "p95": qs[-1] if qs else 0, "max": max(lengths) if lengths else 0,
            },
        }
    out["by_source"] = _by_source(splits)
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out["overlap"][f"{a}/{b}"] = {
                "shared_terms": len(terms[a] & terms[b]),
                "shared_definitions": len(definitions[a] & definitions[b]),
            }
    return out


def _by_source(splits: dict[str, list[Record]]) -> dict:
    """Per source: rows per split, rows with a context, distinct terms, genre(s)."""
    out: dict = {}
    for split, rows in splits.items():
        for r in rows:
            entry = out.setdefault(r.source, {"rows": {s: 0 for s in splits}, "with_context": 0, "terms": set(),
                                              "genres": set()})
            entry["rows"][split] += 1
            entry["with_context"] += bool(r.context)
            entry["terms"].add(r.term.casefold())
            if r.genre is not None:
                entry["genres"].add(r.genre)
    for entry in out.values():
        entry["terms"] = len(entry["terms"])
        entry["genres"] = sorted(entry["genres"])
    return out


def length_histogram(splits: dict[str, list[Record]], bins: int = 10) -> dict[str, list[tuple[str, int]]]:
    """Definition length (words) histogram per split, for the terminal summary."""
    edges = [1, 3, 5, 8, 12, 16, 20, 30, 50, 10**9][:bins]
    hist: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for split, rows in splits.items():
        counts = Counter()
        for r in rows:
            n = len(r.definition.split())
            lo = 0
            for e in edges:
                if n <= e:
                    counts[(lo, e)] += 1
                    break
                lo = e + 1
        lo = 0
        for e in edges:
            label = f"{lo}-{e}" if e < 10**9 else f">{lo - 1}"
            hist[split].append((label, counts[(lo, e)]))
            lo = e + 1
    return dict(hist)


def save_corpus(corpus: Corpus, out_dir: str | Path, config_dump: dict | None = None) -> Path:
    """Write ``{split}.jsonl`` and a ``data.json`` manifest (reports, stats, subsampling, config)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in corpus.splits.items():
        write_jsonl(rows, out / f"{split}.jsonl")
    from lm_lexicon.data.dictionaries import licence_of

    sources = sorted({r.source for rows in corpus.splits.values() for r in rows})
    manifest = {
        "reports": [r.to_dict() for r in corpus.reports],
        "licences": {s: licence_of(s) for s in sources},
        "capped": corpus.capped,
        "mix": corpus.mix,
        "subsampled": corpus.subsampled,
        "stats": corpus_stats(corpus.splits),
        "config": config_dump,
    }
    (out / "data.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def read_saved_corpus(out_dir: str | Path) -> dict[str, list[Record]]:
    out = Path(out_dir)
    return {s: list(read_jsonl(out / f"{s}.jsonl")) for s in SPLITS if (out / f"{s}.jsonl").exists()}
