"""The rows the evaluate stage works on: a seeded sample of a split, read from the partition stage's files, and the
prediction rows it writes."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional


def sample_rows(records: list, domains: list[int], n: int | None, seed: int):
    if n is None or n >= len(records):
        return records, domains
    idx = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in idx], [domains[i] for i in idx]


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def partition_rows(partition_dir: Path, split: str, n: Optional[int], seed: int):
    """A seeded sample of ``n`` rows of a split: (records, domains, references), the references of a record being
    every definition of its headword in the split (Protocol A's grouping)."""
    from lm_lexicon.data.records import records_from_parquet
    from lm_lexicon.metrics.bleu import headword_key, headword_references
    from lm_lexicon.partition.stage import split_files

    rows, row_domains = records_from_parquet(split_files(partition_dir, split))
    groups = headword_references(rows)
    records, domains = sample_rows(rows, row_domains, n, seed)
    return records, domains, [groups[headword_key(vars(r))] for r in records]
