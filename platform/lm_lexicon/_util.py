"""Small helpers shared across the library (kept dependency-free)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def as_str_list(texts, what: str = "text") -> list[str]:
    """A list, tuple or numpy array of strings as a list; a lone string or a non-string item is a TypeError
    (a None would otherwise be embedded or generated from as the text 'None')."""
    if isinstance(texts, str):
        raise TypeError(f"expected a sequence of {what}s, not a single string")
    items = list(texts.tolist() if hasattr(texts, "tolist") else texts)
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"{what} {i} is {type(t).__name__}, not str: {t!r}")
    return items


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
