"""Starting or joining Ray with resources that fit the machine.

On a laptop Ray is started locally with capped CPUs and a small object store (Ray's defaults take 30% of RAM); under
`ray job submit` or with an address configured, the running cluster is joined and its resources are used as they are.
:func:`clean_exit` makes a command's SIGTERM / Ctrl-C stop it and every process it started, Ray's included.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator


def init_ray(resources=None, *, log_to_driver: bool = False):
    """Idempotent ``ray.init`` for the stages; returns the cluster's resources.

    Under the pipeline's terminal (:mod:`lm_lexicon.console`) the workers' output is forwarded to the driver, whose
    output goes to the run's log: the log then holds what every worker printed."""
    import ray

    from lm_lexicon.console import capturing

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = (resources.ray_address if resources is not None else None) or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": log_to_driver or capturing(),
                    "include_dashboard": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        if resources is not None and resources.num_cpus:
            kwargs["num_cpus"] = resources.num_cpus
        if resources is not None and resources.object_store_memory_mb:
            kwargs["object_store_memory"] = resources.object_store_memory_mb * 1024 * 1024
        _start_local_ray(ray, kwargs)
    reclaim_stop_signals()
    return ray.cluster_resources()


# Ray gives a new local node a fixed 30 s (not configurable) to register its raylet; on a loaded laptop or CI machine
# that can pass, and Ray raises with the node's processes still running.
LOCAL_START_ATTEMPTS = 3
_STARTUP_TIMEOUT = "timed out during startup"


def _start_local_ray(ray, kwargs: dict) -> None:
    """``ray.init(**kwargs)``; a start that timed out is cleaned up (the processes it left) and tried again."""
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        before = {p.pid for p in _descendants()}
        try:
            ray.init(**kwargs)
            return
        except Exception as err:
            if _STARTUP_TIMEOUT not in str(err) or attempt == LOCAL_START_ATTEMPTS:
                raise
            left = [p for p in _descendants() if p.pid not in before and _alive(p)]
            _terminate(left, time.monotonic() + STOP_TIMEOUT_S)
            logging.getLogger(__name__).warning(
                "the local Ray node %s (attempt %d of %d; the machine may be busy): stopped the %d process(es) "
                "it left and starting it again", _STARTUP_TIMEOUT, attempt, LOCAL_START_ATTEMPTS, len(left))


def quiet_ray_data() -> None:
    """No wall of Ray Data logs: its progress bars per operator in an interactive terminal, none under the
    pipeline's terminal (which shows its own bars and sends Ray Data's output to the log)."""
    import ray.data

    from lm_lexicon.console import capturing

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not capturing()
    ctx.print_on_execution_start = False


# =================================================================================================== clean exit
STOP_TIMEOUT_S = 30.0  # from the signal to the last process gone (docs/RAY_JOBS.md "Stopping a run")
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # systemd, Kubernetes, CI; a closed terminal
_stop_handler: list = []  # the active clean_exit's handler (reinstalled after ray.init, which replaces it)


@contextmanager
def clean_exit(timeout_s: float = STOP_TIMEOUT_S) -> Iterator[dict]:
    """Run a command so that stopping it stops everything it started.

    Inside, SIGTERM and SIGHUP interrupt the main thread as Ctrl-C does (``KeyboardInterrupt``), so ``finally`` blocks
    and the command's own clean-up run (the default SIGTERM kills Python on the spot and left Ray's agents behind).
    Ray Tune's own Ctrl-C handler (finish the running step, checkpoint, then stop) is turned off: the stages resume
    from their markers, and a stop must be quick. On the way out, however it ends, :func:`stop_ray_and_children`
    runs. Yields ``{"signal": name or None, "exit_code": 128 + the signal (130 for Ctrl-C), "stopped":
    stop_ray_and_children's report}``."""
    import signal
    import threading

    state: dict = {"signal": None, "exit_code": 128 + signal.SIGINT, "stopped": None}
    main = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    previous: dict = {}

    def interrupt(signum, frame):
        state["signal"], state["exit_code"] = signal.Signals(signum).name, 128 + signum
        raise KeyboardInterrupt(state["signal"])

    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if main:
        for name in STOP_SIGNALS:
            previous[name] = signal.signal(getattr(signal, name), interrupt)
        _stop_handler.append(interrupt)
    try:
        yield state
    finally:
        if main:
            _stop_handler.remove(interrupt)
        if main:  # the clean-up is bounded by timeout_s: a second signal must not cut it short
            previous.setdefault("SIGINT", signal.getsignal(signal.SIGINT))
            for name in (*STOP_SIGNALS, "SIGINT"):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        try:
            state["stopped"] = stop_ray_and_children(timeout_s)
        finally:
            for name, handler in previous.items():
                signal.signal(getattr(signal, name), handler)


def reclaim_stop_signals() -> None:
    """Call right after ``ray.init``: the driver's core worker installs its own SIGTERM handler (it logs "SIGTERM
    received" and aborts the process, which left Ray's agents orphaned); inside :func:`clean_exit` this puts the
    clean exit's handler back. A no-op elsewhere."""
    import signal
    import threading

    if _stop_handler and threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), _stop_handler[-1])


def stop_ray_and_children(timeout_s: float = STOP_TIMEOUT_S) -> dict:
    """``ray.shutdown()``, then end, within ``timeout_s``, every process started under this one and, when this process
    started its Ray (``ray.init`` without an address), every process of that Ray's session.

    Ray's own shutdown leaves some behind: its daemons run in sessions of their own, and the dashboard and runtime-env
    agents outlived a SIGTERMed ``lm-lexicon serve`` (they ignore SIGTERM once their raylet is gone). Survivors get
    SIGTERM, then SIGKILL for those still there halfway to the deadline. A cluster that was joined (an address) is
    only disconnected from. Returns ``{"owned_ray", "terminated", "killed", "seconds"}``."""
    import ray

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    node = getattr(ray._private.worker, "_global_node", None)
    owned = bool(ray.is_initialized() and node is not None and node.head)
    session = node.get_session_dir_path() if owned else None
    started = _descendants()  # before the shutdown: Ray's daemons leave this tree when their parent exits
    if ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # a half-dead Ray must not stop the clean-up
            pass
    survivors = {p.pid: p for p in started + (_session_processes(session) if session else []) if _alive(p)}
    terminated, killed = _terminate(list(survivors.values()), deadline)
    return {"owned_ray": owned, "terminated": terminated, "killed": killed, "seconds": time.monotonic() - t0}


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _session_processes(session_dir: str) -> list:
    """Processes whose command line names the session directory (Ray's daemons and agents: --session-dir=...)."""
    import psutil

    me = os.getpid()
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != me and any(session_dir in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _terminate(procs: list, deadline: float) -> tuple[int, int]:
    """SIGTERM ``procs``, SIGKILL those alive halfway to ``deadline``; returns (how many got SIGTERM, SIGKILL)."""
    import psutil

    if not procs:
        return 0, 0
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    grace = max(1.0, (deadline - time.monotonic()) / 2)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    alive = [p for p in alive if _alive(p)]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=max(1.0, deadline - time.monotonic()))
    return len(procs), len(alive)
