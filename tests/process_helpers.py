"""Finding and ending the processes a test's command or private Ray left behind, and free ports (tests that start
subprocesses: test_shutdown, test_ray_job_submit, test_pipeline_resume)."""
from __future__ import annotations

import socket

import psutil


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (none when it is gone)."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def processes_naming(*needles: str) -> list[psutil.Process]:
    """Every process with one of ``needles`` in an argument of its command line (a private Ray's temp dir names all
    of that Ray's daemons, agents and workers)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(n in arg for arg in p.info["cmdline"] or () for n in needles):
                found.append(p)
        except psutil.Error:
            pass
    return found


def kill_and_wait(processes: list[psutil.Process], timeout: float) -> None:
    """SIGKILL each process by pid (one already gone is fine) and wait up to ``timeout`` s for them to end."""
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=timeout)
