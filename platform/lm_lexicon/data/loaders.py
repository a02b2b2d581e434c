"""Loaders: every dataset format of DESIGN.md section 2, turned into :class:`Record` lists.

Every loader returns ``(records, report)``. The report accounts for every candidate row: ``read == kept +
rejected``, rejections are counted by reason and the first offending ``file:line`` of each reason is kept, so a
dataset that loses rows says so instead of shrinking silently. Input that cannot be read at all (missing file,
undecodable bytes, missing header or columns) raises :class:`LoadError` naming the file and, where it applies,
the line.

All loaders share one row check (:class:`_Rows`): values are stripped, an empty or missing term or definition is
rejected, non-string values are rejected rather than coerced (a float ``nan`` is what pandas makes of the word
"null"). Blank lines in line-based files are not rows and are not counted.

``split`` arguments mean the same everywhere: the split given to rows that do not carry their own (a ``SPLIT_TYPE``
or mapped split column wins); with neither, records get ``"train"``. Accepted spellings: train/training,
valid/validation/val/dev/development, test/testing (any case).
"""
from __future__ import annotations

import ast
import csv
import gzip
import inspect
import json
import math
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from lm_lexicon.data.dictionaries import load_dictd
from lm_lexicon.data.records import SPLITS, LoadError, LoadReport, Record, normalize_split, split_argument

__all__ = [
    "EXCLUDED_3DEX_SOURCES",
    "MULTILINGUAL_LANGS",
    "FORMATS",
    "normalize_split",
    "load_3dex",
    "load_ishiwatari",
    "load_multilingual",
    "load_table",
    "load_hf",
    "load_any",
]

# Removed by the LM-Lexicon preprocessing of 3D-EX (compared after casefolding and straightening apostrophes).
EXCLUDED_3DEX_SOURCES: tuple[str, ...] = ("Hei++", "MultiRD", "Webster's Unabridged")
MULTILINGUAL_LANGS: tuple[str, ...] = ("en", "es", "fr", "pt", "de")
FORMATS: tuple[str, ...] = ("wordnet", "3dex", "ishiwatari", "multilingual", "table", "hf", "dictd")

# Record fields a table column may feed; term and definition are the ones a row cannot do without.
_MAPPABLE_FIELDS = ("term", "definition", "context", "split", "pos", "lang", "source", "sense_id")
_REQUIRED_FIELDS = ("term", "definition")
_TRG = "<TRG>"


# --------------------------------------------------------------------------------------------------------------
# Shared row validation


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, field: str) -> tuple[Optional[str], Optional[str]]:
    """``(stripped text, None)`` or ``(None, rejection reason)``; a missing value reads as empty text."""
    if _is_missing(value):
        return "", None
    if not isinstance(value, str):
        return None, f"non-string {field}"
    return value.strip(), None


def _optional_text(value: Any) -> Optional[str]:
    """Metadata (pos, sense id) is informative only, so it is stringified rather than a reason to reject a row."""
    if _is_missing(value):
        return None
    text = str(value).strip()
    return text or None


class _Rows:
    """Collects the records of one load and accounts for every row offered to it.

    ``validate`` is the one place where a row's text fields are checked (``offer`` = validate + keep);
    ``dedupe`` (3D-EX) rejects a record whose (term, definition, context) was already kept.
    """

    def __init__(self, report_source: str, dedupe: bool = False):
        self.report = LoadReport(source=report_source)
        self.records: list[Record] = []
        self._seen: Optional[set] = set() if dedupe else None

    def reject(self, reason: str, where: str) -> None:
        self.report.reject(reason, where)

    def validate(self, where: str, *, term: Any, definition: Any, context: Any = "",
                 empty_context: Optional[str] = None) -> Optional[tuple[str, str, str]]:
        """``(term, definition, context)`` stripped, or None after rejecting the row with the reason.

        ``empty_context`` is the rejection reason for an empty context, for formats where one is required
        (None: term-only rows are fine)."""
        values = []
        for name, value in (("term", term), ("definition", definition), ("context", context)):
            text, problem = _text(value, name)
            if problem:
                self.reject(problem, where)
                return None
            values.append(text)
        term, definition, context = values
        problem = ("empty term" if not term else "empty definition" if not definition
                   else empty_context if not context else None)
        if problem:
            self.reject(problem, where)
            return None
        return term, definition, context

    def offer(self, where: str, *, term: Any, definition: Any, source: str, split: str, context: Any = "",
              lang: str = "en", pos: Any = None, sense_id: Any = None,
              empty_context: Optional[str] = None) -> Optional[Record]:
        """Keep the row as a record, or reject it with a reason (see :meth:`validate`)."""
        clean = self.validate(where, term=term, definition=definition, context=context, empty_context=empty_context)
        if clean is None:
            return None
        if self._seen is not None:
            if clean in self._seen:
                self.reject("duplicate", where)
                return None
            self._seen.add(clean)
        term, definition, context = clean
        record = Record(term=term, context=context, definition=definition, source=source, lang=lang, split=split,
                        pos=_optional_text(pos), sense_id=_optional_text(sense_id))
        self.records.append(record)
        self.report.keep()
        return record

    def finish(self) -> tuple[list[Record], LoadReport]:
        self.report.check()
        return self.records, self.report


# --------------------------------------------------------------------------------------------------------------
# Reading files


def _open_binary(path: Path):
    """Open a (possibly gzipped) file, turning "cannot open" into a LoadError that names it."""
    if not path.exists():
        raise LoadError(path, "file not found")
    if path.is_dir():
        raise LoadError(path, "is a directory, expected a file")
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise LoadError(path, f"cannot open: {e}") from e


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text with its line ending)`` of a UTF-8 file.

    Decoding line by line (rather than letting ``open`` decode blocks) is what lets an encoding error name its
    line. Line endings are kept because the csv module needs them to read quoted fields that span lines.
    """
    with _open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise LoadError(path, f"not UTF-8 text ({e.reason} at byte {e.start} of the line)",
                                    line=lineno) from e
                if lineno == 1:
                    text = text.removeprefix("\ufeff")
                yield lineno, text
        except (OSError, EOFError) as e:  # e.g. a truncated or corrupt gzip stream
            raise LoadError(path, f"cannot read: {e}") from e


def _iter_csv(path: Path, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """Yield ``(first line number, fields)`` per CSV record, the header included; blank lines are skipped."""
    lines = _iter_lines(path)
    last_line = 0

    def texts() -> Iterator[str]:
        nonlocal last_line
        for lineno, text in lines:
            last_line = lineno
            yield text

    previous_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # 3D-EX example lists exceed the 128 KiB default
    try:
        reader = csv.reader(texts(), delimiter=delimiter)
        start = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise LoadError(path, f"CSV error: {e}", line=last_line or start) from e
            if fields:
                yield start, fields
            start = last_line + 1
    finally:
        csv.field_size_limit(previous_limit)


def _csv_header(path: Path, rows: Iterator[tuple[int, list[str]]]) -> list[str]:
    first = next(rows, None)
    if first is None:
        raise LoadError(path, "empty file: no header line", line=1)
    return [name.strip() for name in first[1]]


# --------------------------------------------------------------------------------------------------------------
# 3D-EX


def _source_key(name: str) -> str:
    return name.replace("\u2019", "'").strip().casefold()


_EXCLUDED_3DEX_KEYS = frozenset(_source_key(s) for s in EXCLUDED_3DEX_SOURCES)


def _is_excluded_source(name: str) -> bool:
    return _source_key(name) in _EXCLUDED_3DEX_KEYS


def _literal_list(cell: str) -> Optional[list]:
    """Parse a stringified Python list safely (literal_eval evaluates literals only, never code)."""
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return list(value) if isinstance(value, (list, tuple)) else None


def _as_group(entry: Any) -> Optional[list]:
    """One element of an EXAMPLE / DATASET_NAME list as a list: a bare string is a group of one."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, (list, tuple)):
        return list(entry)
    return None


def load_3dex(path: str | Path, split: Optional[str] = None) -> tuple[list[Record], LoadReport]:
    """Load the 3D-EX CSV with the LM-Lexicon preprocessing.

    Columns (header names are matched case-insensitively): ``WORD`` or ``TERM``, ``DEFINITION``, ``EXAMPLE``,
    ``DATASET_NAME``, optional ``SPLIT_TYPE``; other columns (e.g. a pandas index) are ignored.

    Alignment of the nested lists: ``EXAMPLE`` and ``DATASET_NAME`` are parallel lists, and example group ``i``
    comes from source group ``i``. A group is either a list or a bare string (a group of one), so both
    ``[['e1', 'e2'], ['e3']]`` / ``[['WordNet'], ['Urban']]`` and the flat ``['e1', 'e3']`` / ``['WordNet',
    'Urban']`` read the same way. When a source group names several dictionaries, the examples are credited to
    its first non-excluded name (they are attested there, so the exclusion does not remove them); when every name
    in the group is excluded, its examples are rejected as "excluded source".

    Rules and rejection reasons:

    - the term and definition must be non-empty strings ("empty term", "empty definition");
    - both lists must parse with ``ast.literal_eval`` ("malformed list"), have the same length ("misaligned
      lists"), hold at least one example ("empty example") and one source name ("empty source");
    - one record per (term, definition, example), ``source=f"3dex:{name}"``; a blank example is "empty example";
      a (term, definition, example) already kept, in any split, is a "duplicate" (first occurrence wins);
    - ``SPLIT_TYPE`` values map to train/valid/test; an unrecognised one is "unknown split"; an empty cell or a
      missing column falls back to ``split``.

    Counting: ``report.read`` counts candidate records, i.e. one per example for rows whose lists parse and one
    per row rejected as a whole, so ``read == kept + rejected`` holds at the granularity records are made.
    """
    path = Path(path)
    default_split = split_argument(split)
    rows = _Rows(f"3dex:{path}", dedupe=True)
    csv_rows = _iter_csv(path)
    header = [name.upper() for name in _csv_header(path, csv_rows)]
    term_column = "WORD" if "WORD" in header else "TERM"
    required = (term_column, "DEFINITION", "EXAMPLE", "DATASET_NAME")
    missing = [("WORD/TERM" if c == term_column else c) for c in required if c not in header]
    if missing:
        raise LoadError(path, f"missing column(s) {', '.join(missing)}; header has {header}", line=1)
    index = {name: i for i, name in reversed(list(enumerate(header)))}  # first occurrence of a repeated name
    split_index = index.get("SPLIT_TYPE")

    for lineno, fields in csv_rows:
        where = f"{path}:{lineno}"
        if len(fields) != len(header):
            rows.reject("malformed line", where)
            continue
        # Checked once per row, so a row without a term is one rejection, not one per example.
        clean = rows.validate(where, term=fields[index[term_column]], definition=fields[index["DEFINITION"]])
        if clean is None:
            continue
        term, definition, _ = clean
        row_split = default_split
        if split_index is not None and fields[split_index].strip():
            row_split = normalize_split(fields[split_index])
            if row_split is None:
                rows.reject("unknown split", where)
                continue

        examples = _literal_list(fields[index["EXAMPLE"]])
        sources = _literal_list(fields[index["DATASET_NAME"]])
        example_groups = None if examples is None else [_as_group(e) for e in examples]
        source_groups = None if sources is None else [_as_group(s) for s in sources]
        if example_groups is None or source_groups is None or None in example_groups or None in source_groups:
            rows.reject("malformed list", where)
            continue
        if not any(example_groups):
            rows.reject("empty example", where)
            continue
        if not any(isinstance(n, str) and n.strip() for group in source_groups for n in group):
            rows.reject("empty source", where)
            continue
        if len(example_groups) != len(source_groups):
            rows.reject("misaligned lists", where)
            continue

        for group_examples, group_sources in zip(example_groups, source_groups):
            names = [n.strip() for n in group_sources if isinstance(n, str) and n.strip()]
            kept_names = [n for n in names if not _is_excluded_source(n)]
            for example in group_examples:
                if not kept_names:
                    rows.reject("excluded source" if names else "empty source", where)
                    continue
                rows.offer(where, term=term, definition=definition, context=example,
                           source=f"3dex:{kept_names[0]}", split=row_split, empty_context="empty example")
    return rows.finish()


# --------------------------------------------------------------------------------------------------------------
# Ishiwatari et al. 2019


def load_ishiwatari(directory: str | Path, splits: Iterable[str] = ("train", "valid", "test"),
                    name: Optional[str] = None) -> tuple[list[Record], LoadReport]:
    """Load an Ishiwatari et al. (2019) benchmark directory (WordNet, Oxford, Wikipedia, Urban).

    For each split, ``{split}.txt`` holds ``word%sense \\t POS \\t source \\t definition [\\t ...]`` and
    ``{split}.eg`` holds ``word%sense \\t context`` with ``<TRG>`` standing for the term. Lines are paired by sense
    id (the first column); term = ``word.split('%')[0].replace('_', ' ')``; ``<TRG>`` is replaced by the term.

    Repeated sense ids are paired by order of occurrence: the k-th definition line of an id takes the k-th
    example line of that id. With unique ids this is plain pairing by id; with repeated ids (one sense, several
    usage examples) it reproduces the files' line alignment instead of a cross product, and surplus lines on
    either side are rejected. Rows are not deduplicated: these are published benchmarks, and their test sets
    must keep the size the reported scores were computed on.

    Rejection reasons: "malformed line" (too few tab-separated columns, in either file), "no context" (a
    definition without an example line, or with a blank context), "example without definition", "term not in
    context" (no ``<TRG>`` and the term does not occur in the context, case-insensitively), "empty term",
    "empty definition". ``report.read`` = definition lines + example lines left unpaired.

    ``source`` of the records is ``name`` or the directory's name; ``pos`` is the POS column and ``sense_id`` the
    first column.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LoadError(directory, "benchmark directory not found" if not directory.exists() else
                        "not a directory")
    source = name or directory.name
    split_names = list(splits)
    canonical = [split_argument(s) for s in split_names]
    rows = _Rows(f"ishiwatari:{directory}")
    for file_split, split in zip(split_names, canonical):
        _load_ishiwatari_split(directory / f"{file_split}.txt", directory / f"{file_split}.eg", split, source,
                               rows)
    return rows.finish()


def _load_ishiwatari_split(txt_path: Path, eg_path: Path, split: str, source: str, rows: _Rows) -> None:
    for required in (txt_path, eg_path):
        if not required.is_file():
            raise LoadError(required, "file not found")

    # Read the definition side first so a bad .txt is reported before any pairing work.
    definitions: list[tuple[str, list[str]]] = []
    for lineno, line in _iter_lines(txt_path):
        if not line.strip():
            continue
        where = f"{txt_path}:{lineno}"
        columns = line.rstrip("\r\n").split("\t")
        if len(columns) < 4:
            rows.reject("malformed line", where)
            continue
        definitions.append((where, columns))

    contexts: dict[str, deque] = defaultdict(deque)
    for lineno, line in _iter_lines(eg_path):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t", 1)
        if len(parts) < 2:
            rows.reject("malformed line", f"{eg_path}:{lineno}")
            continue
        contexts[parts[0].strip()].append((lineno, parts[1]))

    for where, columns in definitions:
        sense_id = columns[0].strip()
        pending = contexts.get(sense_id)
        if not pending:
            rows.reject("no context", where)
            continue
        _, context = pending.popleft()
        word = sense_id.split("%")[0]
        term = word.replace("_", " ").strip()
        context = context.strip()
        if term and context:
            if _TRG in context:
                context = context.replace(_TRG, term)
            elif term.lower() not in context.lower() and word.lower() not in context.lower():
                rows.reject("term not in context", where)
                continue
        rows.offer(where, term=term, definition=columns[3], context=context, source=source, split=split,
                   pos=columns[1], sense_id=sense_id, empty_context="no context")

    # Surplus example lines, reported in file order so report.examples names the first one.
    leftovers = sorted(lineno for pending in contexts.values() for lineno, _ in pending)
    for lineno in leftovers:
        rows.reject("example without definition", f"{eg_path}:{lineno}")


# --------------------------------------------------------------------------------------------------------------
# Multilingual dictionaries


def _multilingual_split_files(directory: Path) -> list[tuple[Path, str]]:
    """``(file, split)`` for every ``{split}.jsonl`` / ``{split}.jsonl.gz`` of a directory (split spellings as in
    :func:`normalize_split`: train, valid / validation / dev, test), in train, valid, test order."""
    found: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(directory.iterdir()):
        name = f.name
        stem = name[:-len(".jsonl.gz")] if name.endswith(".jsonl.gz") else \
            name[:-len(".jsonl")] if name.endswith(".jsonl") else None
        split = normalize_split(stem) if stem is not None and f.is_file() else None
        if split is not None:
            found[split].append(f)
    for split, files in found.items():
        if len(files) > 1:
            raise LoadError(directory, f"several files for the {split} split: {[f.name for f in files]}")
    if not found:
        raise LoadError(directory, "no {train,valid,test}.jsonl file in the directory")
    return [(found[s][0], s) for s in SPLITS if s in found]


def load_multilingual(path: str | Path, lang: str, split: Optional[str] = None) -> tuple[list[Record], LoadReport]:
    """Load a monosemic dictionary: JSONL lines ``{"id", "translation": {"word", "definition"}}``.

    There is no usage context (``context=""``: term-only definition modeling). The language is the dataset's, so
    the caller states it (en/es/fr/pt/de; anything else is a ValueError). ``source`` is ``multilingual:{lang}``
    and ``sense_id`` the ``id`` (optional: a row without an id is still a usable definition).

    ``path`` is one JSONL file (its rows get ``split``, default train) or a directory of per-split files
    ``train.jsonl``, ``valid.jsonl`` (or ``validation`` / ``dev``), ``test.jsonl`` (optionally ``.gz``), whose rows
    get the split of their file name (as rows that carry their own split, they ignore ``split``).

    Rejection reasons: "malformed json" (not JSON, or not an object), "missing field" (no ``translation`` object
    or no ``word`` / ``definition`` in it), then the shared checks ("empty term", "empty definition", ...).
    """
    code = lang.strip().lower() if isinstance(lang, str) else lang
    if code not in MULTILINGUAL_LANGS:
        raise ValueError(f"unsupported language {lang!r}; expected one of {MULTILINGUAL_LANGS}")
    path = Path(path)
    split_name = split_argument(split)
    source = f"multilingual:{code}"
    rows = _Rows(f"multilingual:{path}")
    files = _multilingual_split_files(path) if path.is_dir() else [(path, split_name)]
    for file, file_split in files:
        _read_multilingual_file(rows, file, code, source, file_split)
    return rows.finish()


def _read_multilingual_file(rows: "_Rows", path: Path, code: str, source: str, split_name: str) -> None:
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            rows.reject("malformed json", where)
            continue
        if not isinstance(obj, dict):
            rows.reject("malformed json", where)
            continue
        translation = obj.get("translation")
        if not isinstance(translation, dict) or "word" not in translation or "definition" not in translation:
            rows.reject("missing field", where)
            continue
        rows.offer(where, term=translation["word"], definition=translation["definition"], context="",
                   source=source, lang=code, split=split_name, sense_id=obj.get("id"))


# --------------------------------------------------------------------------------------------------------------
# Generic tables and Hugging Face datasets

# A table row as the converters see it: where it came from, its values (None when the row could not be parsed)
# and the rejection reason in that case.
_TableRow = tuple[str, Optional[Mapping[str, Any]], Optional[str]]


def _check_column_map(columns: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(columns, Mapping):
        raise ValueError(f"columns must map Record fields to column names, got {type(columns).__name__}")
    unknown = sorted(set(columns) - set(_MAPPABLE_FIELDS))
    if unknown:
        raise ValueError(f"unknown Record field(s) {unknown} in columns; mappable: {_MAPPABLE_FIELDS}")
    absent = [f for f in _REQUIRED_FIELDS if f not in columns]
    if absent:
        raise ValueError(f"columns must map {absent}: a record needs a term and a definition")
    return dict(columns)


def _require_columns(where: str | Path, columns: Mapping[str, str], available: Iterable[str],
                     line: Optional[int] = None) -> None:
    available = list(available)
    missing = [f"{field}->{column!r}" for field, column in columns.items() if column not in available]
    if missing:
        raise LoadError(where, f"mapped column(s) not found: {', '.join(missing)}; available columns: {available}",
                        line=line)


def _offer_mapped(rows: _Rows, where: str, row: Mapping[str, Any], columns: Mapping[str, str], *,
                  source: str, lang: str, split: str) -> None:
    """Turn one table / dataset row into a record through the column map (shared by load_table and load_hf)."""
    def value(field: str) -> Any:
        return row.get(columns[field]) if field in columns else None

    row_split = split
    if "split" in columns and not _is_missing(value("split")) and str(value("split")).strip():
        row_split = normalize_split(str(value("split")))
        if row_split is None:
            rows.reject("unknown split", where)
            return
    rows.offer(where, term=value("term"), definition=value("definition"), context=value("context"),
               source=_optional_text(value("source")) or source, lang=_optional_text(value("lang")) or lang,
               split=row_split, pos=value("pos"), sense_id=value("sense_id"))


def _table_kind(path: Path) -> tuple[str, str]:
    """``(extension, stem)`` of a table file, looking through a trailing ``.gz``."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    stem, dot, ext = name.rpartition(".")
    kind = f".{ext.lower()}" if dot else ""
    if kind not in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        raise LoadError(path, f"unsupported table extension {kind or '(none)'!r}; "
                              "expected .jsonl, .json, .csv, .tsv or .parquet (optionally .gz, except parquet)")
    return kind, stem


def _read_json_table(path: Path, kind: str) -> tuple[list[str], list[_TableRow]]:
    """JSON lines, or (for a ``.json`` whose first character is ``[``) one JSON array of objects."""
    lines = list(_iter_lines(path))
    first = next((text for _, text in lines if text.strip()), "")
    out: list[_TableRow] = []
    if kind == ".json" and first.lstrip().startswith("["):
        try:
            items = json.loads("".join(text for _, text in lines))
        except json.JSONDecodeError as e:
            raise LoadError(path, f"invalid JSON array: {e.msg}", line=e.lineno) from e
        if not isinstance(items, list):
            raise LoadError(path, "expected a JSON array of objects")
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            out.append((where, item, None) if isinstance(item, dict) else (where, None, "malformed json"))
    else:
        for lineno, text in lines:
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                out.append((where, None, "malformed json"))
                continue
            out.append((where, obj, None) if isinstance(obj, dict) else (where, None, "malformed json"))
    # JSON rows have no header: a column exists if any row has it (rows lacking it read it as missing).
    available: dict[str, None] = {}
    for _, obj, _ in out:
        if obj is not None:
            available.update(dict.fromkeys(obj))
    return list(available), out


def _read_csv_table(path: Path, delimiter: str, columns: Mapping[str, str]) -> Iterator[_TableRow]:
    csv_rows = _iter_csv(path, delimiter)
    header = _csv_header(path, csv_rows)
    _require_columns(path, columns, header, line=1)
    for lineno, fields in csv_rows:
        where = f"{path}:{lineno}"
        if len(fields) != len(header):
            yield where, None, "malformed line"
        else:
            yield where, dict(zip(header, fields)), None


def _read_parquet_table(path: Path, columns: Mapping[str, str]) -> Iterator[_TableRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise LoadError(path, "file not found" if not path.exists() else "is a directory, expected a file")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LoadError(path, f"not a readable Parquet file: {e}") from e
    _require_columns(path, columns, parquet.schema_arrow.names)
    wanted = sorted(set(columns.values()))
    index = 0
    for batch in parquet.iter_batches(columns=wanted):
        for row in batch.to_pylist():
            index += 1
            yield f"{path}:row {index}", row, None


def load_table(path: str | Path, columns: Mapping[str, str], source: Optional[str] = None, lang: str = "en",
               split: Optional[str] = None) -> tuple[list[Record], LoadReport]:
    """Load a generic JSONL / JSON / CSV / TSV / Parquet table (chosen by extension) through a column map.

    ``columns`` maps Record fields to column names: ``term`` and ``definition`` are required; ``context``,
    ``split``, ``pos``, ``lang``, ``source`` and ``sense_id`` are optional. A mapped column absent from the file
    is a LoadError naming it and the available columns. Row values win over the ``source`` (default: the file
    stem), ``lang`` and ``split`` arguments when present and non-empty; an unrecognised split value is rejected
    ("unknown split"). Unparsable rows are "malformed json" (JSON) or "malformed line" (a CSV row whose field
    count differs from the header's). Locations are ``file:line``, except ``file:row N`` (Parquet, 1-based) and
    ``file[i]`` (JSON array).
    """
    path = Path(path)
    columns = _check_column_map(columns)
    default_split = split_argument(split)
    kind, stem = _table_kind(path)
    rows = _Rows(f"table:{path}")
    if kind in (".jsonl", ".json"):
        available, table_rows = _read_json_table(path, kind)
        _require_columns(path, columns, available)
    elif kind == ".parquet":
        table_rows = _read_parquet_table(path, columns)
    else:
        table_rows = _read_csv_table(path, "\t" if kind == ".tsv" else ",", columns)
    defaults = dict(source=source or stem, lang=lang, split=default_split)
    for where, row, problem in table_rows:
        if row is None:
            rows.reject(problem or "malformed line", where)
        else:
            _offer_mapped(rows, where, row, columns, **defaults)
    return rows.finish()


def load_hf(dataset_id_or_path: str, columns: Mapping[str, str], split_map: Optional[Mapping[str, str]] = None,
            source: Optional[str] = None, lang: str = "en", revision: Optional[str] = None,
            **kwargs: Any) -> tuple[list[Record], LoadReport]:
    """Load a Hugging Face dataset (a Hub id, a local data directory, a builder such as ``"json"`` with
    ``data_files=``, or a ``save_to_disk`` directory) and convert every split through the column map, with the
    same row checks as :func:`load_table`.

    ``split_map`` maps the dataset's split names to ours (e.g. ``{"validation": "valid"}``) and selects them:
    splits it does not name are not loaded at all (a choice of the caller, so nothing is counted for them).
    Without it every split is loaded and its name must be a recognised spelling, else ValueError. ``kwargs`` go
    to ``datasets.load_dataset`` (``data_files``, ``cache_dir``, ``split``, ``streaming``, ...). Dataset loading
    scripts are never executed: ``trust_remote_code`` is forced off. Locations are ``id[split][row index]``.
    """
    columns = _check_column_map(columns)
    if kwargs.get("trust_remote_code"):
        raise ValueError("trust_remote_code is not allowed: dataset scripts would run arbitrary code")
    kwargs["trust_remote_code"] = False
    if split_map is not None:
        split_map = {hf_name: split_argument(ours) for hf_name, ours in split_map.items()}

    import datasets

    label = str(dataset_id_or_path)
    local = Path(dataset_id_or_path)
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(dataset_id_or_path, revision=revision, **kwargs)
    except FileNotFoundError as e:
        raise LoadError(label, f"dataset not found: {e}") from e

    requested = kwargs.get("split")
    if isinstance(loaded, Mapping):  # DatasetDict / IterableDatasetDict
        parts = list(loaded.items())
    elif isinstance(loaded, list):  # split=[...] returns one dataset per requested split
        parts = [(str(name), ds) for name, ds in zip(requested, loaded)]
    else:
        parts = [(str(requested) if requested is not None else "train", loaded)]

    rows = _Rows(f"hf:{label}")
    default_source = source or label.rstrip("/").split("/")[-1]
    for hf_split, dataset in parts:
        if split_map is not None:
            if hf_split not in split_map:
                continue
            split = split_map[hf_split]
        else:
            split = normalize_split(hf_split)
            if split is None:
                raise ValueError(f"{label}: split {hf_split!r} is not train/valid/test; pass split_map to name it "
                                 "(or to leave it out)")
        available = getattr(dataset, "column_names", None)
        if available is not None:
            _require_columns(f"{label}[{hf_split}]", columns, available)
        for i, row in enumerate(dataset):
            _offer_mapped(rows, f"{label}[{hf_split}][{i}]", row, columns, source=default_source, lang=lang,
                          split=split)
    return rows.finish()


# --------------------------------------------------------------------------------------------------------------
# Dispatch


def _load_wordnet(**kwargs: Any) -> tuple[list[Record], LoadReport]:
    # Imported on use: the embedded corpus module is independent of the file formats above.
    from lm_lexicon.data.wordnet import load_packaged_corpus

    result = load_packaged_corpus(**kwargs)
    if isinstance(result, tuple):
        return result
    # A bare record list: the shipped corpus was filtered when it was built, so every row read is kept.
    records = list(result)
    report = LoadReport(source="wordnet")
    report.keep(len(records))
    return records, report


_LOADERS: dict[str, Callable[..., tuple[list[Record], LoadReport]]] = {
    "3dex": load_3dex,
    "ishiwatari": load_ishiwatari,
    "multilingual": load_multilingual,
    "table": load_table,
    "hf": load_hf,
    "dictd": load_dictd,
}


def load_any(spec: Mapping[str, Any]) -> tuple[list[Record], LoadReport]:
    """Load a dataset described by a config entry: ``{"format": ..., **arguments of that format's loader}``.

    Formats: wordnet (``split`` only), 3dex, ishiwatari, multilingual, table, hf, dictd (``dictionary``,
    ``dictd_dir``, ...: :func:`lm_lexicon.data.dictionaries.load_dictd`). ``path`` is accepted as the first
    argument of every file loader (``directory`` for ishiwatari, ``dataset_id_or_path`` for hf), so configs can say
    ``path`` throughout. A wrong argument is a ValueError naming the format.
    """
    spec = dict(spec)
    fmt = spec.pop("format", None)
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")
    if fmt == "wordnet":
        unexpected = sorted(set(spec) - {"split"})
        if unexpected:
            raise ValueError(f"format 'wordnet' takes only 'split', got {unexpected}")
        return _load_wordnet(**spec)
    loader = _LOADERS[fmt]
    if fmt == "dictd" and "path" in spec:
        raise ValueError("format 'dictd' takes 'dictd_dir' (the directory of NAME.index), not 'path'")
    first = next(iter(inspect.signature(loader).parameters))
    if "path" in spec and first != "path":
        if first in spec:
            raise ValueError(f"format {fmt!r}: give either 'path' or {first!r}, not both")
        spec[first] = spec.pop("path")
    try:
        inspect.signature(loader).bind(**spec)
    except TypeError as e:
        raise ValueError(f"format {fmt!r}: {e}") from e
    return loader(**spec)
