"""Small helpers shared across the library (kept dependency-free)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional


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


@contextlib.contextmanager
def written_atomically(target: str | Path, scratch_suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of the directory ``target`` to fill; when the block succeeds the sibling
    replaces ``target`` (a symlink there is unlinked, not followed), so a crash never leaves a half-written ``target``.

    ``scratch_suffix`` (``.partial``, ``.tmp``): the sibling is ``target`` + suffix, cleared by the next writer and
    left behind by a failure (resume logic knows the name and skips it). None: a unique hidden sibling, removed on
    failure, so concurrent writers never share one.
    """
    target = Path(target)
    if scratch_suffix is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-", dir=target.parent))
    else:
        scratch = target.with_name(target.name + scratch_suffix)
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
    try:
        yield scratch
    except BaseException:
        if scratch_suffix is None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.rename(scratch, target)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 file through a sibling named by this process, renamed over ``path``: a reader sees the old file
    or the new one, never half of one, and concurrent writers never share the sibling."""
    path = Path(path)
    scratch = path.with_name(path.name + f".tmp{os.getpid()}")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)
    return path
