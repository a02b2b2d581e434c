"""Acceptance: the pipeline as a Ray job on a running head node, the way a cluster runs it (docs/RAY_JOBS.md).

The test starts its own head (``ray start --head --block``) from the venv's ``ray`` binary, on free ports, with its
own ``--temp-dir`` (so ``ray_current_cluster`` is written there, not in /tmp/ray where every ``ray.init()`` on the
machine would find it and join this head) and its own token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``: Ray
2.60 turns token auth on for ``ray start`` whenever ``~/.ray/auth_token`` exists, and the job CLI only sends a token
when ``RAY_AUTH_MODE=token``; a private token makes both sides agree without reading anyone's ``~/.ray``). Then:

1. a probe job prints the ``python`` the job entrypoint gets: a head started from ``.venv/bin/ray`` does NOT put the
   venv on the jobs' PATH (measured: ``/bin/sh: 1: python: not found`` here, the system python elsewhere); the
   driver's environment is the head's, so the head is started with the venv's ``bin`` first on PATH, as an
   activated venv would;
2. ``ray job submit --working-dir <repo> -- python jobs/pipeline.py --config configs/tiny.yaml <micro overrides>``
   with absolute ``output_dir``, ``resources.storage_path`` and seed path; the test waits for SUCCEEDED, checks
   every stage's artifacts, the results table in the job's logs against ``evaluate/metrics.json``, and the uploaded
   working directory (``.gitignore`` keeps ``runs/`` and ``.venv/`` out; ``excludes`` drops ``.git``).

Teardown stops this head only: SIGTERM to the ``ray start --block`` process group (its GCS, raylet, dashboard and
workers fate-share with it), then SIGKILL by pid to anything left that names the private temp dir or the test's
output dir. Not ``ray stop``: it kills every Ray process on the host by name, other users' and the test session's
own Ray included.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from process_helpers import free_port, kill_and_wait, processes_naming

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.prefix) / "bin"
STAGES = ("data", "partition", "experts", "merge", "evaluate", "export")


@pytest.fixture
def ray_head(tmp_path):
    """A private head node: 2 CPUs, 200 MB object store, free ports, its own temp dir and auth token."""
    temp_dir = tempfile.mkdtemp(prefix="lmlx-head-")  # short: Ray's unix sockets live under it (108-byte limit)
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    dashboard = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2",
           f"--object-store-memory={200 * 1024 * 1024}", f"--port={free_port()}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        request = urllib.request.Request(f"{url}/api/jobs/", headers={"authorization": f"Bearer {token.read_text()}"})
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    json.loads(r.read())  # the job API answers: the head is ready for submissions
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                if head.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the head did not come up:\n"
                                         + (Path(temp_dir) / "head.log").read_text()[-3000:])
                time.sleep(1)
        yield {"url": url, "env": env, "temp_dir": Path(temp_dir), "head_pid": head.pid}
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        log.close()
        kill_and_wait(processes_naming(temp_dir, str(tmp_path)), timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(head: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=head["env"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def submit(head: dict, submission_id: str, *entrypoint: str, working_dir: Path | None = None,
           timeout: float = 60 * 60) -> subprocess.CompletedProcess:
    """``ray job submit`` (it tails the job's logs and returns when the job ends, non-zero when it failed)."""
    extra = ["--working-dir", str(working_dir), "--runtime-env-json", json.dumps({"excludes": [".git"]})] \
        if working_dir else []
    return ray_cli(head, "job", "submit", "--address", head["url"], "--submission-id", submission_id, *extra,
                   "--", *entrypoint, timeout=timeout)


def micro_overrides(out: Path, seed: Path) -> list[str]:
    return [f"output_dir={out}", f"resources.storage_path={out}/ray", f"seed_model.name={seed}",
            "data.max_train_rows=32", "data.max_valid_rows=8", "data.max_test_rows=8",
            "embed.num_actors=1", "partition.n_experts=2", "partition.plot_sample=16",
            "resources.cpus_per_worker=0.5", "train.max_steps=2", "train.eval_every=2", "train.batch_size=4",
            "train.precision=fp32", "finetune.max_steps=2", "finetune.batch_size=4", "evaluate.max_rows=6",
            "evaluate.max_new_tokens=4", "evaluate.baselines=[constant]", "evaluate.metrics=[bleu_a, rouge_l, length]",
            "evaluate.best_of_n=1"]


def test_pipeline_runs_as_a_ray_job_on_a_head_node(tmp_path, ray_head):
    from lm_lexicon.seed_models import tiny_llama

    t0 = time.perf_counter()
    # 1. the job's `python` is the venv's
    probe = submit(ray_head, f"lmlx-probe-{secrets.token_hex(4)}", "python", "-c",
                   "import sys; print('job python:', sys.executable, sys.prefix)", timeout=600)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    prefix = re.search(r"job python: (\S+) (\S+)", probe.stdout)
    assert prefix and Path(prefix.group(2)).resolve() == Path(sys.prefix).resolve(), probe.stdout[-2000:]

    # 2. the pipeline, from an uploaded copy of the repository, writing to absolute paths
    seed = tiny_llama(tmp_path / "seed")
    out = tmp_path / "run"
    job_id = f"lmlx-pipeline-{secrets.token_hex(4)}"
    t1 = time.perf_counter()
    run = submit(ray_head, job_id, "python", "jobs/pipeline.py", "--config", "configs/tiny.yaml",
                 *micro_overrides(out, seed), working_dir=REPO)
    job_s = time.perf_counter() - t1
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    status = ray_cli(ray_head, "job", "status", "--address", ray_head["url"], job_id)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    logs = ray_cli(ray_head, "job", "logs", "--address", ray_head["url"], job_id).stdout

    # the artifacts landed in the absolute output_dir, every stage finished
    for stage in STAGES:
        marker = json.loads((out / stage / "_SUCCESS.json").read_text())
        assert marker["stage"] == stage and marker["provenance"]["finished_at"]
    assert not list(out.glob("*.partial"))
    assert (out / "export" / "collapsed" / "domain-0" / "config.json").is_file()
    assert any((out / "ray").iterdir())  # Ray Train / Tune storage: the absolute storage_path
    # the driver joined the head (2 CPUs) rather than starting a Ray of its own
    assert "Connecting to existing Ray cluster at address" in logs and "Started a local Ray instance" not in logs

    # the results table in the job's logs is evaluate/metrics.json's
    results = json.loads((out / "evaluate" / "metrics.json").read_text())["results"]
    assert list(results) == ["constant", "moe"]
    assert "tiny: test split, 6 rows" in logs and "pipeline finished in" in logs
    for model, res in results.items():
        cells = [f"{res[m]['value']:.2f}" for m in ("bleu_a", "rouge_l")]
        row = [line for line in logs.splitlines() if re.match(rf"\W*{re.escape(model)}\s", line)]
        assert row and all(c in row[0] for c in cells), (model, cells, row)

    # what was uploaded: the repository without runs/, .venv/ (.gitignore) and .git (excludes)
    pkgs = [p for p in (ray_head["temp_dir"] / "session_latest" / "runtime_resources" / "working_dir_files").glob(
        "_ray_pkg_*") if p.is_dir()]
    assert len(pkgs) == 1, pkgs
    uploaded = {p.name for p in pkgs[0].iterdir()}
    assert {"jobs", "configs", "platform"} <= uploaded
    assert not {"runs", ".venv", ".git"} & uploaded, uploaded
    size_mb = sum(f.stat().st_size for f in pkgs[0].rglob("*") if f.is_file()) / 2**20
    assert size_mb < 100, f"{size_mb:.1f} MB uploaded"
    print(f"\nray job submit: pipeline job {job_s:.1f}s, whole test {time.perf_counter() - t0:.1f}s, "
          f"working dir {size_mb:.1f} MB")
