"""HTTP client of the served API: one call (:class:`LexiconClient`) or a whole file (:func:`define_file`).

    client = LexiconClient("http://127.0.0.1:8000")
    client.define([{"term": "bank", "context": "the bank of the river"}])[0]["definition"]

Batch mode (:func:`define_file`, ``lm-lexicon define -i in.jsonl -o out.jsonl``; CSV in and out too): rows
``{"term", "context"?, "lang"?, ...}`` are sent in chunks (a few chunks in flight, so the server's dynamic batching
has work to merge), and every input row ends up either in the output (in input order, its own fields plus ``definition``, ``domain``,
``score``, ``selection``) or in the rejected list with a reason: unreadable line, missing term, or the server's
validation message for that row (a chunk the server rejects for one bad row is re-sent without it).

503/502/504 answers (a replica restarting) are retried with the server's ``Retry-After``; 4xx are not.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (502, 503, 504)
SENT_FIELDS = ("term", "context", "lang")


class ApiClientError(Exception):
    """An error answer of the API (or no answer): ``status`` (0: connection failed), ``code``, ``message``,
    ``details`` (validation errors with their ``loc``)."""

    def __init__(self, status: int, code: str, message: str, details: Optional[list] = None):
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.details = list(details or [])

    @classmethod
    def from_response(cls, r: httpx.Response) -> "ApiClientError":
        try:
            err = r.json().get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        return cls(r.status_code, err.get("code") or "http_error",
                   err.get("message") or (r.text[:300] if r.text else r.reason_phrase), err.get("details"))


class LexiconClient:
    """Synchronous client (thread-safe: one connection pool). ``token``: bearer token when the server has auth on.
    ``retries``: extra attempts on 502/503/504 and connection errors."""

    def __init__(self, url: str = DEFAULT_URL, token: Optional[str] = None, timeout: float = 300.0,
                 retries: int = 3, transport: Optional[httpx.BaseTransport] = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.retries = int(retries)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LexiconClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                r = self._http.request(method, path, json=payload) if payload is not None else \
                    self._http.request(method, path)
            except httpx.TransportError as e:
                if attempt < self.retries:
                    attempt += 1
                    time.sleep(min(0.5 * 2 ** attempt, 5.0))
                    continue
                raise ApiClientError(0, "connection_error", f"cannot reach {self.url}: {e}") from e
            if r.status_code in RETRY_STATUSES and attempt < self.retries:
                attempt += 1
                retry_after = r.headers.get("retry-after", "")
                time.sleep(min(float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 2 ** attempt,
                               30.0))
                continue
            if r.status_code >= 400:
                raise ApiClientError.from_response(r)
            return r.json()

    # ---- endpoints ----
    def define(self, items: Sequence[dict], n: int = 1, return_scores: bool = False, seed: int = 0) -> list[dict]:
        """``POST /v1/definitions``: one result dict per item, in order."""
        body = {"items": [{k: it[k] for k in SENT_FIELDS if k in it and it[k] is not None} for it in items],
                "n": int(n), "return_scores": bool(return_scores), "seed": int(seed)}
        return self._request("POST", "/v1/definitions", body)["definitions"]

    def define_one(self, term: str, context: str = "", lang: str = "en", **kw) -> dict:
        return self.define([{"term": term, "context": context, "lang": lang}], **kw)[0]

    def score(self, items: Sequence[dict]) -> dict:
        """``POST /v1/score`` (items: term, context?, lang?, definition, reference?)."""
        return self._request("POST", "/v1/score", {"items": list(items)})

    def model(self) -> dict:
        return self._request("GET", "/v1/model")

    def health(self) -> dict:
        try:
            return self._request("GET", "/healthz")
        except ApiClientError as e:
            if e.status == 503:
                return {"status": "degraded", "message": e.message}
            raise


# =================================================================================================== batch mode
@dataclass
class Rejected:
    line: int
    reason: str
    row: Any = None

    def to_dict(self) -> dict:
        return {"line": self.line, "reason": self.reason, "row": self.row}


@dataclass
class BatchSummary:
    rows: int = 0
    defined: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    seconds: float = 0.0
    output: Optional[str] = None
    rejected_path: Optional[str] = None

    def reasons(self) -> dict[str, int]:
        """Rejected rows per reason, most frequent first."""
        counts: dict[str, int] = {}
        for r in self.rejected:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def read_rows(path: str | Path) -> tuple[list[tuple[int, dict]], list[Rejected]]:
    """``(line number, row)`` for every usable row, and the rejected ones (blank lines are skipped). A ``.csv``
    file needs a header with a ``term`` column (``context``, ``lang`` and any other columns are optional; an empty
    ``context`` / ``lang`` cell counts as absent); anything else is read as JSONL."""
    if Path(path).suffix.lower() == ".csv":
        return _read_csv_rows(path)
    rows: list[tuple[int, dict]] = []
    rejected: list[Rejected] = []
    with open(path, "rb") as f:
        for no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rejected.append(Rejected(no, f"not valid UTF-8 (byte {e.start})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rejected.append(Rejected(no, f"not valid JSON ({e.msg})", line.strip()[:200]))
                continue
            _check_row(no, row, rows, rejected)
    return rows, rejected


def _check_row(no: int, row: Any, rows: list, rejected: list) -> None:
    if not isinstance(row, dict):
        rejected.append(Rejected(no, "not a JSON object", row))
    elif not isinstance(row.get("term"), str) or not row["term"].strip():
        rejected.append(Rejected(no, "missing or empty 'term'", row))
    else:
        bad = next((k for k in ("context", "lang") if row.get(k) is not None and not isinstance(row[k], str)), None)
        if bad:
            rejected.append(Rejected(no, f"'{bad}' must be a string", row))
        else:
            rows.append((no, row))


def _read_csv_rows(path: str | Path) -> tuple[list[tuple[int, dict]], list[Rejected]]:
    import csv

    rows: list[tuple[int, dict]] = []
    rejected: list[Rejected] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if "term" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: a CSV needs a header row with a 'term' column (found: "
                                 f"{', '.join(reader.fieldnames or []) or 'nothing'})")
            for record in reader:
                row = {k: v for k, v in record.items() if k is not None and not (k in ("context", "lang") and not v)}
                if None in record:  # more cells than header columns
                    rejected.append(Rejected(reader.line_num, "more cells than header columns", row))
                elif any(v.strip() for v in record.values() if isinstance(v, str)):
                    _check_row(reader.line_num, row, rows, rejected)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start})") from e
    return rows, rejected


def write_rows(rows: Sequence[dict], path: str | Path, fmt: str = "jsonl") -> None:
    """``jsonl``: one object per line; ``csv``: the union of the rows' keys as columns (lists and dicts, e.g. the
    candidates, as JSON text)."""
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        if fmt != "csv":
            raise ValueError(f"unknown output format {fmt!r}; expected jsonl or csv")
        columns = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                             for k, v in row.items()})


def _item_errors(err: ApiClientError, n_items: int) -> dict[int, str]:
    """Validation messages per item index (from ``loc = ["items", i, ...]``)."""
    out: dict[int, str] = {}
    for d in err.details:
        loc = d.get("loc") or []
        if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int) and 0 <= loc[1] < n_items:
            field_name = ".".join(str(x) for x in loc[2:]) or "item"
            out.setdefault(loc[1], f"{field_name}: {d.get('msg')}")
    return out


def _define_chunk(client: LexiconClient, chunk: list[tuple[int, dict]], n: int, return_scores: bool,
                  seed: int) -> tuple[list[tuple[int, dict, dict]], list[Rejected]]:
    """Results ``(line, row, result)`` and rejections for one chunk; rows the server rejects are dropped and the
    rest re-sent (once per round, at most len(chunk) rounds)."""
    rejected: list[Rejected] = []
    pending = list(chunk)
    while pending:
        try:
            results = client.define([row for _, row in pending], n=n, return_scores=return_scores, seed=seed)
        except ApiClientError as e:
            if e.status == 401:
                raise
            bad = _item_errors(e, len(pending)) if e.status == 422 else {}
            if not bad:  # the whole chunk failed (server unavailable, a request-level limit, ...)
                rejected.extend(Rejected(no, f"server: {e}", row) for no, row in pending)
                return [], rejected
            rejected.extend(Rejected(pending[i][0], f"server: {msg}", pending[i][1]) for i, msg in sorted(bad.items()))
            pending = [p for i, p in enumerate(pending) if i not in bad]
            continue
        return [(no, row, res) for (no, row), res in zip(pending, results)], rejected
    return [], rejected


def output_row(row: dict, result: dict) -> dict:
    out = dict(row)
    for k in ("definition", "domain", "score", "selection"):
        out[k] = result.get(k)
    if result.get("candidates") is not None:
        out["candidates"] = result["candidates"]
    return out


def define_file(client: LexiconClient, input_path: str | Path, output_path: str | Path, *, batch_size: int = 16,
                concurrency: int = 2, n: int = 1, return_scores: bool = False, seed: int = 0,
                rejected_path: Optional[str | Path] = None, progress: bool = True,
                output_format: str = "jsonl") -> BatchSummary:
    """Define every row of a JSONL or CSV file (:func:`read_rows`) into ``output_path`` (``output_format`` jsonl
    or csv, see :func:`write_rows`; module docstring); rejected rows (with reasons) go to ``rejected_path``
    (default ``<output>.rejected.jsonl``, written only when there are any). ``progress``: a bar on stderr."""
    if output_format not in ("jsonl", "csv"):
        raise ValueError(f"unknown output format {output_format!r}; expected jsonl or csv")
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be >= 1")
    t0 = time.perf_counter()
    rows, rejected = read_rows(input_path)
    summary = BatchSummary(rows=len(rows) + len(rejected), rejected=list(rejected))
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    done: list[tuple[int, dict]] = []
    with _rows_bar(summary.rows, progress, Path(input_path).name) as advance, \
            ThreadPoolExecutor(max_workers=concurrency) as pool:
        advance(len(rejected))
        for results, rej in pool.map(lambda c: _define_chunk(client, c, n, return_scores, seed), chunks):
            done.extend((no, output_row(row, res)) for no, row, res in results)
            summary.rejected.extend(rej)
            advance(len(results) + len(rej))
    done.sort(key=lambda x: x[0])
    write_rows([row for _, row in done], output_path, output_format)
    summary.defined = len(done)
    summary.output = str(output_path)
    summary.rejected.sort(key=lambda r: r.line)
    if summary.rejected:
        rp = Path(rejected_path) if rejected_path else output_path.with_name(output_path.name + ".rejected.jsonl")
        with open(rp, "w", encoding="utf-8") as f:
            for r in summary.rejected:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        summary.rejected_path = str(rp)
    summary.seconds = time.perf_counter() - t0
    return summary



@contextmanager
def _rows_bar(total: int, enabled: bool, label: str):
    """``advance(n)`` of a rich progress bar on stderr (rows done of ``total``); a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("define {task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TextColumn("rows"), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
