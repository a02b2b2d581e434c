"""The record every loader produces, and the report every loader returns beside its rows."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid", "development": "valid",
    "test": "test", "testing": "test",
}


def normalize_split(value: Any) -> Optional[str]:
    """The canonical split name (train/valid/test) for a spelling datasets use, or None if unrecognised."""
    if not isinstance(value, str):
        return None
    return _SPLIT_ALIASES.get(value.strip().lower())


def split_argument(split: Optional[str]) -> str:
    """Validate a caller's ``split`` argument: a typo there is a programming error, not a bad row."""
    if split is None:
        return "train"
    name = normalize_split(split)
    if name is None:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} (or validation/dev)")
    return name


@dataclass
class Record:
    """One definition-modeling example: a term, the context it is used in, and its definition.

    ``context`` may be empty (term-only definition modeling, e.g. the multilingual dictionaries).
    ``source`` names the dictionary/corpus the row came from (``wordnet``, ``3dex:Urban``, ...); ``genre`` the
    kind of dictionary (``general``, ``technical``, ``slang``, ``satire``) when the loader or the recipe says.
    """

    term: str
    context: str
    definition: str
    source: str
    lang: str = "en"
    split: str = "train"
    pos: Optional[str] = None
    sense_id: Optional[str] = None
    genre: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["genre"] is None:
            del d["genre"]  # rows without a genre are written as before the field existed (same bytes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class LoadError(ValueError):
    """Input that cannot be read at all (as opposed to single rows that are rejected and counted)."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass
class LoadReport:
    """What a loader read, kept and rejected (by reason), so that no row disappears unaccounted for."""

    source: str
    read: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first offending location, for the error message
    details: dict = field(default_factory=dict)   # loader-specific counts (e.g. dictd articles, rows with context)

    def keep(self, n: int = 1) -> None:
        self.read += n
        self.kept += n

    def reject(self, reason: str, where: str | None = None) -> None:
        self.read += 1
        self.rejected[reason] += 1
        if where is not None and reason not in self.examples:
            self.examples[reason] = where

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    def check(self) -> None:
        if self.read != self.kept + self.n_rejected:
            raise AssertionError(f"{self.source}: read {self.read} != kept {self.kept} + rejected {self.n_rejected}")

    def merge(self, other: "LoadReport") -> "LoadReport":
        out = LoadReport(source=f"{self.source}+{other.source}", read=self.read + other.read,
                         kept=self.kept + other.kept, rejected=self.rejected + other.rejected,
                         examples={**other.examples, **self.examples})
        return out

    def to_dict(self) -> dict:
        out = {"source": self.source, "read": self.read, "kept": self.kept,
               "rejected": dict(self.rejected), "examples": self.examples}
        if self.details:
            out["details"] = self.details
        return out

    def summary(self) -> str:
        parts = [f"{self.source}: read {self.read}, kept {self.kept}, rejected {self.n_rejected}"]
        for reason, n in self.rejected.most_common():
            ex = self.examples.get(reason)
            parts.append(f"  - {reason}: {n}" + (f" (first at {ex})" if ex else ""))
        return "\n".join(parts)


def write_jsonl(records: Iterable[Record], path: str | Path) -> int:
    """Write records as JSON lines (gzip when the name ends in .gz). Returns the count written."""
    import gzip

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    n = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Record]:
    """Read records written by :func:`write_jsonl`; a malformed line raises :class:`LoadError` naming it."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise LoadError(path, f"not a record: {e}", line=i) from e


def write_parquet(records: Iterable[Record], domains: Iterable[int], path: str | Path) -> None:
    """Write records with the domain of each (a ``domain`` column beside the record fields): the partition's files."""
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame([r.to_dict() for r in records])
    frame["domain"] = np.asarray(domains).astype(np.int64)
    frame.to_parquet(path, index=False)


def records_from_parquet(files: Iterable[str | Path], domain: Optional[int] = None) -> tuple[list[Record], list[int]]:
    """The records of files written by :func:`write_parquet`, in file order, and their domains; ``domain``: only
    that domain's rows. A missing value (NaN in pandas, e.g. an absent ``pos``) becomes None."""
    import pandas as pd

    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if domain is not None:
        frame = frame[frame["domain"] == domain]
    records = [Record.from_dict({k: (None if v != v else v) for k, v in row.items()})  # NaN != NaN
               for row in frame.drop(columns=["domain"]).to_dict("records")]
    return records, frame["domain"].astype(int).tolist()
