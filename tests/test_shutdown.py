"""Stopping a command stops every process it started (lm_lexicon.ray_utils.clean_exit), within STOP_TIMEOUT_S.

Each test runs the command as a user would, in a subprocess with a private Ray (``private_ray_env``: its own
``RAY_TMPDIR``, no ``RAY_ADDRESS``) and in a session of its own (``start_new_session``: its process group is what a
terminal's Ctrl-C reaches), waits until it is busy, records every process of the run (the command's process tree and
every process naming the private Ray directory: Ray's daemons, agents and workers), sends the signal, and checks that
all of them are gone within the stated time. Leftovers, if any, are killed by pid afterwards and reported.

* ``lm-lexicon serve --host 0.0.0.0 --insecure`` and SIGTERM (what systemd, Kubernetes and CI send), serving: the
  issue's case, where ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` outlived the server;
* ``jobs/pipeline.py`` and Ctrl-C (SIGINT to the process group) while the experts stage trains on Ray Train;
* ``jobs/tune_experts.py`` and SIGTERM while a trial's pipeline (a process of its own) runs.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from lm_lexicon.ray_utils import STOP_TIMEOUT_S
from micro_pipeline import micro_overrides, private_ray_env
from process_helpers import free_port, kill_and_wait, process_tree, processes_naming
from test_serve_app import pipeline_dir  # noqa: F401 (pipeline_dir is a fixture)

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 600  # generous: the machine may be shared with other heavy jobs
MARGIN_S = 10  # process exit and the poll's own granularity, on a busy machine


class Run:
    """A command in its own session with a private Ray; its output in a log file."""

    def __init__(self, cmd: list[str], tmp_path: Path, env_extra: dict | None = None):
        self.private = tempfile.mkdtemp(prefix="lmlx-ray-")  # short: Ray's socket paths live under it
        env = private_ray_env(self.private)
        env.pop("LM_LEXICON_API_TOKEN", None)
        env.update(env_extra or {})
        self.log_path = tmp_path / "command.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"command exited ({self.proc.returncode}) before {what}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def processes(self) -> list:
        """The command's process tree and every process that names its private Ray directory."""
        return list({p.pid: p for p in [*process_tree(self.proc.pid), *processes_naming(self.private)]}.values())

    def stop(self, sig: int, group: bool = False) -> dict:
        """Send ``sig`` (to the process group: a terminal's Ctrl-C), then wait until every process of the run is gone
        or the stated time has passed. Returns names of the processes seen, the exit code, the seconds it took,
        and the survivors (killed here by pid)."""
        before = self.processes()
        names = sorted({_name(p) for p in before})
        t0 = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        deadline = t0 + STOP_TIMEOUT_S + MARGIN_S
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S + MARGIN_S)
        except subprocess.TimeoutExpired:
            pass
        alive = [p for p in before + self.processes() if _alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if _alive(p)]
        seconds = time.monotonic() - t0
        survivors = sorted({f"{p.pid} {_name(p)}" for p in alive + [p for p in self.processes() if _alive(p)]})
        self.cleanup()
        return {"seen": names, "n_seen": len(before), "returncode": self.proc.returncode, "seconds": seconds,
                "survivors": survivors}

    def cleanup(self) -> None:
        kill_and_wait([p for p in self.processes() if _alive(p)], timeout=20)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.private, ignore_errors=True)


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(p) -> str:
    """``ray::DashboardAgent``-style titles as they are, otherwise the program and its script."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    shown = [Path(a).name for a in cmd[:3] if not a.startswith("-")]
    return " ".join(shown) or p.name()


def _descendant_named(run: Run, needle: str) -> bool:
    return any(needle in _name(p) for p in run.processes())


def _assert_stopped(report: dict, what: str) -> None:
    print(f"\n{what}: {report['n_seen']} processes of the run, all gone {report['seconds']:.1f}s after the signal "
          f"(exit {report['returncode']}); seen: {', '.join(report['seen'])}")
    assert report["survivors"] == [], f"outlived the stop: {report['survivors']}"
    assert report["seconds"] <= STOP_TIMEOUT_S + MARGIN_S


def test_serve_stops_on_sigterm_with_every_process_it_started(tmp_path, pipeline_dir):
    port = free_port()
    run = Run([sys.executable, "-c", "from lm_lexicon.cli import app; app()", "serve", str(pipeline_dir),
               "--host", "0.0.0.0", "--port", str(port), "--insecure"], tmp_path)
    try:
        run.wait_for(lambda: "lm-lexicon is serving" in run.log(), "the server to be ready")
        log = " ".join(run.log().split())
        assert "WARNING: serving on 0.0.0.0 without authentication (--insecure)" in log
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60)
        assert r.status_code == 200, r.text
        # the processes the issue found orphaned are there to be stopped
        run.wait_for(lambda: _descendant_named(run, "DashboardAgent") and _descendant_named(run, "RuntimeEnvAgent"),
                     "Ray's agents", timeout=60)
        report = run.stop(signal.SIGTERM)
    finally:
        run.cleanup()
    _assert_stopped(report, "lm-lexicon serve, SIGTERM")
    assert report["returncode"] == 0 and "shutting down" in run.log()
    assert any("DashboardAgent" in n for n in report["seen"]) and any("ServeReplica" in n for n in report["seen"])


@pytest.mark.slow
def test_pipeline_stops_on_ctrl_c_while_experts_train(tmp_path, micro_seed):
    out = tmp_path / "run"
    run = Run([sys.executable, "jobs/pipeline.py", "--config", "configs/tiny.yaml", *micro_overrides(out, micro_seed)],
              tmp_path)
    try:
        run.wait_for(lambda: _descendant_named(run, "RayTrainWorker"), "the experts' Ray Train workers")
        report = run.stop(signal.SIGINT, group=True)  # what Ctrl-C in a terminal sends: the foreground group
    finally:
        run.cleanup()
    _assert_stopped(report, "jobs/pipeline.py, Ctrl-C during the experts stage")
    assert report["returncode"] == 130 and "interrupted (SIGINT)" in " ".join(run.log().split())
    assert any("RayTrainWorker" in n for n in report["seen"])
    assert not (out / "experts" / "_SUCCESS.json").exists()


@pytest.mark.slow
def test_scan_stops_on_sigterm_with_its_trials_pipelines(tmp_path, micro_seed):
    out = tmp_path / "run"
    run = Run([sys.executable, "jobs/tune_experts.py", "--config", "configs/tiny.yaml", "--ns", "2",
               "--out", str(tmp_path / "scan"), *micro_overrides(out, micro_seed)], tmp_path)
    try:
        run.wait_for(lambda: _descendant_named(run, "pipeline.py") and _descendant_named(run, "RayTrainWorker"),
                     "a trial's pipeline training its experts")
        report = run.stop(signal.SIGTERM)  # to the scan's own process only, as systemd or Kubernetes would
    finally:
        run.cleanup()
    _assert_stopped(report, "jobs/tune_experts.py, SIGTERM during a trial")
    assert report["returncode"] == 128 + signal.SIGTERM
    assert any("pipeline.py" in n for n in report["seen"]) and any("RayTrainWorker" in n for n in report["seen"])
