"""The pipeline's terminal: the project's own lines and progress bars; everything else goes to a log file.

    with pipeline_terminal(cfg.output_dir, verbose=False) as term:
        run_pipeline(cfg, log=term.line)
        term.console.print(summary_table)

Inside the context the process's stdout and stderr *file descriptors* (1 and 2) point at
``<output_dir>/logs/pipeline.log``, so whatever a library prints (Ray, Ray Data, Tune, transformers, MLflow, Python
warnings), whatever the C++ core worker writes and whatever a child process inherits lands in the log, not on the
screen. Ray started inside the context forwards its workers' output to the driver (``log_to_driver``), that is into
the log too. The project's lines and bars go to a duplicate of the original terminal kept aside (``term.console``).
``verbose=True`` copies the log to the terminal as it is written (above the bars).

What still reaches the terminal, one line each, with the log's path: warnings of the project's own loggers
(``lm_lexicon.*``), errors of any logger, and the exception that ends a run (its traceback is in the log).

Progress: :func:`bar` gives a bar on the active terminal (a no-op one outside it, e.g. in tests and library use);
:class:`RemoteBars` lets Ray workers feed bars on the driver (training steps and loss per expert) through a small
actor, :func:`step_reporter` being the workers' side.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

LOG_DIR = "logs"
LOG_FILE = "pipeline.log"
# Read at import time by transformers / huggingface_hub and Ray Data: set before they load (and inherited by Ray
# workers, which Ray starts with the driver's environment). Their bars would only fill the log with carriage returns.
# RAY_COLOR_PREFIX=0 and RAY_DEDUP_LOGS=0: the workers' lines reach the log whole, without ANSI colour codes.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_COLOR_PREFIX": "0",
             "RAY_DEDUP_LOGS": "0"}
# Libraries whose loggers do not propagate to the root logger: the terminal echo of errors is attached to them too.
LIBRARY_LOGGERS = ("ray", "transformers", "mlflow", "torch", "datasets")
TERMINAL_LOGGER = "lm_lexicon.terminal"
SEND_EVERY_S = 0.5  # a worker sends its progress at most this often (and always its last step)

_active: Optional["Terminal"] = None


def active() -> Optional["Terminal"]:
    """The terminal of the running pipeline, or None (library use, tests)."""
    return _active


def capturing() -> bool:
    """True while a :class:`Terminal` redirects this process's output to its log."""
    return _active is not None


# =================================================================================================== bars
class Bar:
    """A progress bar handle: ``advance(n)``, ``update(completed=, total=, note=)``, ``close()``; a context manager.
    The base class does nothing (no active terminal)."""

    def advance(self, n: float = 1) -> None:
        pass

    def update(self, completed: Optional[float] = None, total: Optional[float] = None,
               note: Optional[str] = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LiveBar(Bar):
    def __init__(self, term: "Terminal", task_id, stage: Optional[str]):
        self.term, self.task_id, self.stage, self.closed = term, task_id, stage, False

    def advance(self, n: float = 1) -> None:
        if not self.closed:
            self.term._progress.advance(self.task_id, n)

    def update(self, completed=None, total=None, note=None) -> None:
        if self.closed:
            return
        fields = {} if note is None else {"note": note}
        if total is not None:
            fields["total_text"] = f"{total:,.0f}"
        self.term._progress.update(self.task_id, completed=completed, total=total, **fields)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.term._bar_closed(self)


def bar(label: str, total: Optional[float] = None, unit: str = "rows", stage: Optional[str] = None) -> Bar:
    """A progress bar ``[stage] label ━━━━ done/total unit`` on the active terminal (a no-op outside one)."""
    term = _active
    return term.bar(label, total, unit, stage) if term is not None else Bar()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Bars opened inside are tagged ``[name]``; those left open are closed when the stage ends."""
    term = _active
    if term is None:
        yield
        return
    previous, term.stage = term.stage, name
    try:
        yield
    finally:
        term.close_bars(stage=name)
        term.stage = previous


# =================================================================================================== terminal
class _Echo(logging.Handler):
    """Prints the records that need the user (see module docstring) as one terminal line each."""

    def __init__(self, term: "Terminal"):
        super().__init__(logging.WARNING)
        self.term = term

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == TERMINAL_LOGGER or getattr(record, "_lm_lexicon_echoed", False):
            return  # the terminal's own record of what it printed; a record seen by a library logger and the root
        record._lm_lexicon_echoed = True
        own = record.name == "lm_lexicon" or record.name.startswith("lm_lexicon.")
        if record.levelno < logging.ERROR and not own:
            return
        if self.term.verbose and not own:
            return  # already on the screen through the log's live copy
        try:
            first = record.getMessage().strip().splitlines()
        except Exception:  # a broken format string must not take the run down
            first = [str(record.msg)]
        self.term.notice(record.levelname.lower(), first[0] if first else "")


class Terminal:
    """See the module docstring. Build it with :func:`pipeline_terminal`."""

    def __init__(self, log_path: Path, verbose: bool = False):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.ray_was_running = _ray_initialized()  # Ray started inside is stopped inside (see stop)
        self.stage: Optional[str] = None
        self.notices = {"warning": 0, "error": 0}
        self._bars: list[_LiveBar] = []
        self._lock = threading.RLock()
        self._progress = None
        self._saved: dict[int, int] = {}
        self._undo: list[Callable[[], None]] = []

    # ---- output ----
    def line(self, message: str) -> None:
        """One of the project's lines: on the terminal and, time-stamped, in the log."""
        logging.getLogger(TERMINAL_LOGGER).info(message)
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def notice(self, level: str, message: str) -> None:
        """``warning: ...`` / ``error: ...`` on the terminal's stderr, pointing at the log."""
        self.notices[level] = self.notices.get(level, 0) + 1
        self.err_console.print(f"{level}: {message} (details: {self.log_path})", markup=False, highlight=False,
                               soft_wrap=True, style="bold red" if level == "error" else "yellow")

    def fail(self, exc: BaseException) -> None:
        """The exception that ends a run: its traceback to the log, one line to the terminal."""
        logging.getLogger(TERMINAL_LOGGER).error(
            "the run failed:\n%s", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        text = str(exc).strip().splitlines()
        self.err_console.print(f"error: {type(exc).__name__}: {text[0] if text else ''} (traceback: {self.log_path})",
                               markup=False, highlight=False, soft_wrap=True, style="bold red")

    # ---- bars ----
    def bar(self, label: str, total: Optional[float], unit: str, stage: Optional[str] = None) -> Bar:
        with self._lock:
            if self._progress is None:
                self._progress = _new_progress(self.console)
                self._progress.start()
            stage = stage or self.stage
            task = self._progress.add_task(label, total=total, tag=f"[{stage}] " if stage else "", unit=unit,
                                           note="", total_text="?" if total is None else f"{total:,.0f}")
            handle = _LiveBar(self, task, stage)
            self._bars.append(handle)
            return handle

    def _bar_closed(self, handle: _LiveBar) -> None:
        with self._lock:
            if handle in self._bars:
                self._bars.remove(handle)
                task = next(t for t in self._progress.tasks if t.id == handle.task_id)
                logging.getLogger(TERMINAL_LOGGER).info(  # the bar's final state, in the log too
                    "%s%s: %s/%s %s %s", task.fields["tag"], task.description, f"{task.completed:,.0f}",
                    task.fields["total_text"], task.fields["unit"], task.fields["note"])
            if not self._bars and self._progress is not None:
                self._progress.stop()  # a pipe or a file gets the bars' final state here, once
                self._progress = None

    def close_bars(self, stage: Optional[str] = None) -> None:
        with self._lock:
            for handle in [b for b in self._bars if stage is None or b.stage == stage]:
                handle.close()

    # ---- set-up and tear-down ----
    def start(self) -> "Terminal":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                self._undo.append(lambda key=key: os.environ.pop(key, None))
        _silence_imported_libraries()
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = {1: os.dup(1), 2: os.dup(2)}
        self.console, self.err_console = _terminal_console(self._saved[1]), _terminal_console(self._saved[2])
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        target = log_fd
        if self.verbose:
            target = self._start_copy(log_fd)
        os.dup2(target, 1)
        os.dup2(target, 2)
        if target != log_fd:
            os.close(target)
        self._log_fd = log_fd
        self._configure_logging()
        return self

    def _start_copy(self, log_fd: int) -> int:
        """``--verbose``: a pipe whose reader copies everything to the log and, line by line, to the terminal."""
        read_fd, write_fd = os.pipe()

        def pump() -> None:
            pending = b""
            while True:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                os.write(log_fd, chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    if self._saved:  # after stop(), the log only
                        self.console.print(raw.decode("utf-8", "replace"), markup=False, highlight=False,
                                           soft_wrap=True, style="dim")
            os.close(read_fd)

        self._pump = threading.Thread(target=pump, name="lm-lexicon-verbose-log", daemon=True)
        self._pump.start()
        return write_fd

    def _configure_logging(self) -> None:
        root = logging.getLogger()
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        # the terminal's own lines straight into the file (they are on the screen already); every other record
        # through stderr, i.e. the log, and with --verbose the screen too
        file_handler = logging.FileHandler(self.log_path, encoding="utf-8")
        file_handler.addFilter(lambda r: r.name == TERMINAL_LOGGER)
        stream_handler = logging.StreamHandler(sys.stderr)
        stream_handler.addFilter(lambda r: r.name != TERMINAL_LOGGER)
        echo = _Echo(self)
        old_level = root.level
        root.setLevel(logging.INFO)
        for handler in (file_handler, stream_handler):
            handler.setFormatter(fmt)
            root.addHandler(handler)
        root.addHandler(echo)
        logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> the log, time-stamped
        libraries = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
        for lib in libraries:
            lib.addHandler(echo)

        def undo() -> None:
            logging.captureWarnings(False)
            for lib in libraries:
                lib.removeHandler(echo)
            for handler in (echo, file_handler, stream_handler):
                root.removeHandler(handler)
            root.setLevel(old_level)
            file_handler.close()

        self._undo.append(undo)

    def stop(self) -> None:
        global _active
        self.close_bars()
        _shutdown_ray_started_here(self)
        sys.stdout.flush()
        sys.stderr.flush()
        saved, self._saved = self._saved, {}
        for fd, copy in saved.items():
            os.dup2(copy, fd)  # the verbose pump sees EOF once no child holds the pipe any more
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        pump = getattr(self, "_pump", None)
        if pump is not None:
            pump.join(timeout=2.0)
        if pump is None or not pump.is_alive():  # a pump still copying (a child holds the pipe) keeps its file
            os.close(self._log_fd)
        for copy in saved.values():
            os.close(copy)
        _active = None

    def summary(self) -> str:
        counts = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in self.notices.items() if n)
        return f"log: {self.log_path}" + (f" ({counts} above)" if counts else "")


def log_path_for(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve() / LOG_DIR / LOG_FILE


@contextlib.contextmanager
def pipeline_terminal(output_dir: str | Path, verbose: bool = False) -> Iterator[Terminal]:
    """The quiet terminal for one run whose log is ``<output_dir>/logs/pipeline.log`` (appended to)."""
    global _active
    if _active is not None:  # nested (a CLI command inside a pipeline run): the outer one stays in charge
        yield _active
        return
    term = Terminal(log_path_for(output_dir), verbose)
    term.start()
    _active = term
    logging.getLogger(TERMINAL_LOGGER).info("=== %s (pid %d, verbose=%s)", " ".join(sys.argv), os.getpid(),
                                                  verbose)
    try:
        yield term
    finally:
        term.stop()


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _shutdown_ray_started_here(term: Terminal) -> None:
    """Ray started inside the context stops inside it: its shutdown messages belong in the log too."""
    if not term.ray_was_running and _ray_initialized():
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # best effort: the run itself is over
            logging.getLogger(TERMINAL_LOGGER).exception("ray.shutdown failed")


def _silence_imported_libraries() -> None:
    """Libraries already imported read QUIET_ENV too late: switch their bars off directly."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "ray.data" in sys.modules:
        sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = False


def _terminal_console(fd: int):
    from rich.console import Console

    stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    if stream.isatty():
        width = os.get_terminal_size(fd).columns
    else:  # a pipe or a CI log: wide enough for the summary tables
        width = int(os.environ.get("COLUMNS", "0") or 0) or 120
    return Console(file=stream, width=width, highlight=False)


def _new_progress(console):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.fields[tag]}{task.description}", markup=False), BarColumn(bar_width=24),
        TextColumn("{task.completed:,.0f}/{task.fields[total_text]} {task.fields[unit]}", markup=False),
        TimeElapsedColumn(), TextColumn("{task.fields[note]}", markup=False),
        console=console, redirect_stdout=False, redirect_stderr=False, refresh_per_second=4)


# =================================================================================================== Ray workers
class _Inbox:
    """Ray actor on the driver's node: workers put progress messages, the driver takes them."""

    def __init__(self):
        self.items: list[tuple] = []

    def put(self, item: tuple) -> None:
        self.items.append(item)

    def take(self) -> list[tuple]:
        out, self.items = self.items, []
        return out


class RemoteBars:
    """Bars on the driver fed by Ray workers (started at once, ``close()`` or a ``with`` block ends them).

    ``address`` is what to hand the workers for :func:`step_reporter` (a small dict; None outside a terminal or
    without Ray: the workers then report nothing). ``keys`` get a waiting bar at once; others appear with their
    first message."""

    def __init__(self, keys: Sequence[str] = (), unit: str = "steps", poll_s: float = 0.5):
        self.address: Optional[dict] = None
        self._term = _active
        if self._term is None or not _ray_initialized():
            return
        import ray

        name = f"lm-lexicon-progress-{uuid.uuid4().hex[:12]}"
        namespace = ray.get_runtime_context().namespace
        self._inbox = ray.remote(num_cpus=0)(_Inbox).options(name=name, namespace=namespace).remote()
        self._unit = unit
        self._bars: dict[str, Bar] = {key: self._term.bar(key, None, unit) for key in keys}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(poll_s,), name="lm-lexicon-progress", daemon=True)
        self._thread.start()
        self.address = {"name": name, "namespace": namespace}

    def _drain(self) -> None:
        import ray

        for key, step, total, loss in ray.get(self._inbox.take.remote()):
            handle = self._bars.get(key) or self._bars.setdefault(key, self._term.bar(key, total, self._unit))
            handle.update(completed=step, total=total, note="" if loss is None else f"loss {loss:.3f}")
            if total and step >= total:
                handle.close()

    def _poll(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                self._drain()
            except Exception:  # progress must never break a run
                logging.getLogger("lm_lexicon.console").debug("progress poll failed", exc_info=True)

    def close(self) -> None:
        if self.address is None:
            return
        import ray

        self._stop.set()
        self._thread.join(timeout=60.0)  # a poll in flight finishes first: one drain at a time
        try:
            self._drain()
        except Exception:
            logging.getLogger("lm_lexicon.console").warning("the last progress messages were lost", exc_info=True)
        for handle in self._bars.values():
            handle.close()
        with contextlib.suppress(Exception):
            ray.kill(self._inbox)
        self.address = None

    def __enter__(self) -> "RemoteBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def step_reporter(address: Optional[dict], key: str) -> Optional[Callable[[int, int, Optional[float]], None]]:
    """For a Ray worker: ``fn(step, total, loss)`` that feeds the driver's bar ``key`` (at most every
    ``SEND_EVERY_S``, and always the last step); None when the driver shows no bars."""
    if not address:
        return None
    import ray

    try:
        inbox = ray.get_actor(address["name"], namespace=address.get("namespace"))
    except Exception:
        logging.getLogger("lm_lexicon.console").warning("progress inbox %s not found; no progress bar",
                                                       address.get("name"))
        return None
    last = [0.0]

    def report(step: int, total: int, loss: Optional[float] = None) -> None:
        now = time.monotonic()
        if now - last[0] < SEND_EVERY_S and step < total:
            return
        last[0] = now
        sent = inbox.put.remote((key, int(step), int(total), None if loss is None else float(loss)))
        if step >= total:  # the last step: make sure it arrived before the worker moves on (or exits)
            try:
                ray.get(sent, timeout=30)
            except Exception:
                logging.getLogger("lm_lexicon.console").warning("the last progress message of %s was lost", key)

    return report
