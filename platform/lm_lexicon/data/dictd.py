"""Reading dictd dictionaries: ``NAME.index`` (headword, base64 offset, base64 length) plus ``NAME.dict.dz``.

Debian's ``dict-*`` packages install them under /usr/share/dictd. The data file is dictzip, which is gzip with a
random-access table in an extra header field, so ``gzip`` reads it whole; a plain ``NAME.dict`` works too.

One article can be reached from several index lines: GCIDE indexes inflections and variant spellings ("Retreated"
-> the article of "Retreat"), FOLDOC every alias of an entry. :func:`read_articles` therefore yields each article
once, at its first index line, and accounts for every index line in the caller's :class:`LoadReport`: an index line
that adds no article (another headword of an article already read, a ``00-database-*`` line, a malformed line) is
one rejected item with its reason and ``file:line``. The articles themselves are counted by whoever parses them.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from lm_lexicon.data.records import LoadError, LoadReport

DEFAULT_DICTD_DIR = "/usr/share/dictd"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}

# Index lines that describe the database rather than a headword (dictfmt writes both spellings).
_INFO_PREFIXES = ("00-database", "00database")

ALIAS = "alias of an article already read"
INFO = "database info"
MALFORMED_INDEX = "malformed index line"
PAST_END = "index points past the end of the data"


class DictdNotFound(LoadError):
    """A dictionary's index or data file is missing; the message names the Debian package that installs it."""


@dataclass
class Article:
    """One dictd article, with where it came from."""

    headword: str      # the index headword of its first index line
    text: str
    index_path: Path
    line: int          # line of that index line (1-based)
    offset: int
    length: int

    @property
    def where(self) -> str:
        return f"{self.index_path}:{self.line}"


def decode_number(field: str) -> int:
    """dictd's base64 number: most significant digit first, alphabet ``A-Za-z0-9+/``. ValueError if not one."""
    if not field:
        raise ValueError("empty number")
    value = 0
    for ch in field:
        digit = _B64_VALUE.get(ch)
        if digit is None:
            raise ValueError(f"{ch!r} is not a base64 digit")
        value = value * 64 + digit
    return value


def encode_number(value: int) -> str:
    """The inverse of :func:`decode_number` (used to write fixtures)."""
    if value < 0:
        raise ValueError("negative number")
    digits = []
    while True:
        value, digit = divmod(value, 64)
        digits.append(_B64[digit])
        if value == 0:
            return "".join(reversed(digits))


def dictionary_files(dictd_dir: str | Path, name: str, package: Optional[str] = None) -> tuple[Path, Path]:
    """``(index, data)`` paths of dictionary ``name``; :class:`DictdNotFound` naming the package when missing."""
    root = Path(dictd_dir).expanduser()
    index = root / f"{name}.index"
    data = next((p for p in (root / f"{name}.dict.dz", root / f"{name}.dict") if p.is_file()), None)
    if index.is_file() and data is not None:
        return index, data
    missing = [str(p) for p, ok in ((index, index.is_file()),
                                    (root / f"{name}.dict.dz", data is not None)) if not ok]
    hint = (f"install it with `apt-get install {package}` (Debian/Ubuntu), or set dictd_dir to the directory "
            "that holds it") if package else "set dictd_dir to the directory that holds it"
    raise DictdNotFound(root, f"dictionary {name!r} not found (missing {', '.join(missing)}); {hint}")


def _read_data(path: Path) -> bytes:
    try:
        if path.suffix == ".dz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt dictzip stream
        raise LoadError(path, f"cannot read: {e}") from e


def _index_lines(path: Path) -> list[tuple[int, Optional[str]]]:
    """``(line number, text)``; text is None for a line that is not UTF-8 (counted as malformed, not fatal)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LoadError(path, f"cannot read: {e.strerror or e}") from e
    out: list[tuple[int, Optional[str]]] = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        try:
            out.append((lineno, line.decode("utf-8")))
        except UnicodeDecodeError:
            out.append((lineno, None))
    return out


def read_articles(index_path: Path, data_path: Path, report: LoadReport,
                  progress: bool = False) -> Iterator[Article]:
    """Yield every article of a dictionary once, in index order, counting the index lines that add none.

    Rejection reasons (each with ``index:line``): "malformed index line" (not three tab-separated fields, a field
    that is not base64, not UTF-8), "index points past the end of the data", "database info" (``00-database-*``),
    "alias of an article already read". An article whose bytes are not UTF-8 is rejected as "article not UTF-8".
    """
    data = _read_data(data_path)
    seen: set[tuple[int, int]] = set()
    lines: Iterable = _index_lines(index_path)
    if progress:
        from tqdm.auto import tqdm

        lines = tqdm(lines, desc=f"parse {index_path.stem}", unit=" entries", leave=False)
    for lineno, text in lines:
        where = f"{index_path}:{lineno}"
        if text is None:
            report.reject(MALFORMED_INDEX, where)
            continue
        if not text.strip():
            continue  # a blank line is not an entry
        fields = text.split("\t")
        if len(fields) != 3 or not fields[0].strip():
            report.reject(MALFORMED_INDEX, where)
            continue
        headword, offset_field, length_field = fields
        try:
            offset, length = decode_number(offset_field.strip()), decode_number(length_field.strip())
        except ValueError:
            report.reject(MALFORMED_INDEX, where)
            continue
        if headword.startswith(_INFO_PREFIXES):
            report.reject(INFO, where)
            continue
        if offset + length > len(data) or length == 0:
            report.reject(PAST_END, where)
            continue
        if (offset, length) in seen:
            report.reject(ALIAS, where)
            continue
        seen.add((offset, length))
        try:
            body = data[offset:offset + length].decode("utf-8")
        except UnicodeDecodeError:
            report.reject("article not UTF-8", where)
            continue
        yield Article(headword=headword, text=body, index_path=index_path, line=lineno, offset=offset,
                      length=length)


def write_dictd(directory: str | Path, name: str, articles: Iterable[tuple[list[str], str]],
                compress: bool = True) -> tuple[Path, Path]:
    """Write a dictd dictionary from ``(headwords, text)`` pairs (every headword indexes its article).

    Index lines are sorted by headword as dictfmt sorts them (case-insensitively). Used to turn hand-written
    fixtures into real dictd files; ``compress`` writes ``NAME.dict.dz`` (plain gzip), else ``NAME.dict``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = bytearray()
    index: list[tuple[str, int, int]] = []
    for headwords, text in articles:
        raw = text.encode("utf-8")
        for hw in headwords:
            index.append((hw, len(blob), len(raw)))
        blob += raw
    index.sort(key=lambda e: (e[0].casefold(), e[1]))
    index_path = directory / f"{name}.index"
    index_path.write_text("".join(f"{hw}\t{encode_number(o)}\t{encode_number(n)}\n" for hw, o, n in index),
                          encoding="utf-8")
    if compress:
        data_path = directory / f"{name}.dict.dz"
        data_path.write_bytes(gzip.compress(bytes(blob), mtime=0))
    else:
        data_path = directory / f"{name}.dict"
        data_path.write_bytes(bytes(blob))
    return index_path, data_path
