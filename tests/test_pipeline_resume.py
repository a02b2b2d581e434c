"""Acceptance: the whole pipeline resumes where it stopped, and its results do not depend on the interruption.

* test A runs the micro recipe to the end (``jobs/pipeline.py`` in a subprocess: the session's ``micro_run``, whose
  terminal output tests/test_quiet_terminal.py checks) and records every stage's ``_SUCCESS.json`` and the final
  ``evaluate/metrics.json``;
* test B runs the same recipe as a subprocess (``jobs/pipeline.py``) in a directory holding test A's data, partition
  and experts stages (linked: the run reuses them and starts with the merge; tests/test_experts_stage.py resumes a
  killed experts stage), SIGKILLs its process group while the merge stage is running, re-runs it and checks that the
  finished stages were reused byte for byte, the rest recomputed, the ``.partial`` leftovers were not taken for
  finished stages, and the final table equals test A's exactly;
* test C changes a ``finetune.*`` value in a copy of test A's run: data, partition and experts are reused, merge,
  evaluate and export recomputed.

Several Ray instances. The re-runs run in-process on the session's Ray (``ray_local``: 2 CPUs, 200 MB object store).
Test A's and the killed subprocess start their own local Ray (``init_ray`` with
``resources.num_cpus=2 resources.object_store_memory_mb=200``), never the session's: ``RAY_ADDRESS`` is removed from
its environment and ``RAY_TMPDIR`` points at a private directory, so ``ray.init()`` neither finds an address to join
(``<temp dir>/ray/ray_current_cluster``, which a ``ray start`` elsewhere on the machine may have written) nor shares a
session directory with another Ray. Two local Rays on one host do not conflict (their ports are picked free and their
sockets live in their own session directories); they do not deadlock either, because the session Ray is idle while
the subprocess runs. Ray started by ``ray.init`` fate-shares with its driver (the kernel kills GCS and raylet when
the driver dies), so the SIGKILL takes its Ray down with it; the test checks that nothing that belongs to the
private temp dir survives and kills leftovers by pid if any.

Determinism: training on CPU with fixed seeds, each Ray Train worker on ``cpus_per_worker`` = 1 torch thread and
generation actors on a fixed thread count, gives the same weights in a fresh process; the test compares the metrics
table exactly (and the MoE weights and predictions), with no tolerance.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lm_lexicon.config import load_config
from lm_lexicon.pipeline import STAGES, run_pipeline
from lm_lexicon.artifacts import MARKER
from micro_pipeline import link_finished_stages, micro_overrides, private_ray_env
from process_helpers import kill_and_wait, process_tree, processes_naming

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
KILL_TIMEOUT_S = 900  # generous: the machine may be shared with other heavy jobs


def markers(out: Path) -> dict[str, bytes]:
    return {s: (out / s / MARKER).read_bytes() for s in STAGES if (out / s / MARKER).is_file()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outcome(out: Path) -> dict:
    """What must not depend on how the run got there: the metrics table, the MoE's weights and predictions."""
    return {"results": json.loads((out / "evaluate" / "metrics.json").read_text())["results"],
            "moe_weights": digest(out / "merge" / "model" / "model.safetensors"),
            "moe_predictions": (out / "evaluate" / "predictions" / "moe.jsonl").read_text()}


@pytest.fixture(scope="module")
def seed(micro_seed):
    return micro_seed


@pytest.fixture(scope="module")
def uninterrupted(micro_run):
    """Test A's run: the micro recipe start to finish (``jobs/pipeline.py`` in a subprocess with its own Ray; the
    session's ``micro_run``, whose terminal output tests/test_quiet_terminal.py checks)."""
    out = micro_run["out"]
    return {"out": out, "lines": micro_run["stdout"], "markers": markers(out), "outcome": outcome(out),
            "seconds": micro_run["seconds"]}


def test_a_uninterrupted_run_finishes_every_stage(uninterrupted):
    out = uninterrupted["out"]
    assert list(uninterrupted["markers"]) == list(STAGES)
    for stage in STAGES:
        marker = json.loads(uninterrupted["markers"][stage])
        assert marker["stage"] == stage and len(marker["fingerprint"]) == 16
        assert marker["seconds"] >= 0 and marker["provenance"]["finished_at"]
        assert f"[{stage}] running -> {out / stage}" in uninterrupted["lines"]  # computed, not reused
    assert not list(out.glob("*.partial"))
    table = uninterrupted["outcome"]["results"]
    assert list(table) == ["constant", "moe"]
    for res in table.values():
        assert set(res) == {"bleu_a", "rouge_l", "length"}
        assert res["bleu_a"]["n"] == 6 and res["bleu_a"]["value"] is not None
    print(f"\nuninterrupted micro pipeline: {uninterrupted['seconds']:.1f}s")


def _kill(proc: subprocess.Popen, private_dir: str) -> list[int]:
    """SIGKILL the subprocess's process group (and, by pid, any descendant or Ray process of its own that left the
    group); returns the pids that were still alive after the group kill."""
    import psutil

    tree = process_tree(proc.pid)
    group, outside = [], []  # start_new_session: the group id is the subprocess's pid
    for p in tree:
        try:
            (group if os.getpgid(p.pid) == proc.pid else outside).append(p)
        except ProcessLookupError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(group, timeout=20)
    # Descendants that left the group (a local Ray's GCS and raylet run in sessions of their own) are not the group
    # kill's to take down: they are killed by pid below, with any other process of the private Ray, and not counted.
    return _kill_leftovers(private_dir, alive, extra=outside)


def _kill_leftovers(private_dir: str, alive: list = (), extra: list = ()) -> list[int]:
    """SIGKILL, by pid, ``alive`` (the group's survivors), ``extra`` and any process that names ``private_dir``;
    returns the pids of ``alive``."""
    # The process group must die with the group kill (`alive` counts against it). A local Ray's daemons run in
    # sessions of their own and can outlive a SIGKILLed driver (Ray's behaviour, seen on a clean clone): they are
    # killed here by pid so nothing leaks, but not counted against the group kill.
    leftovers = [p for p in [*extra, *processes_naming(private_dir)] if p not in alive]
    kill_and_wait([*alive, *leftovers], timeout=20)
    return [p.pid for p in alive]


def _wait_for(predicate, proc: subprocess.Popen, log_path: Path, what: str, timeout: float = KILL_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"pipeline exited ({proc.returncode}) before {what}:\n"
                                 + log_path.read_text()[-4000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n" + log_path.read_text()[-4000:])
        time.sleep(0.2)


def test_b_a_run_killed_during_merge_resumes_and_gives_the_same_table(tmp_path, seed, uninterrupted, ray_local):
    out = tmp_path / "run"
    log_path = tmp_path / "pipeline.log"
    private = tempfile.mkdtemp(prefix="lmlx-ray-")  # short: Ray's socket paths live under it (108-byte limit)
    env = private_ray_env(private)
    link_finished_stages(uninterrupted["out"], out, ("data", "partition", "experts"))  # test A's, untouched
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "jobs/pipeline.py", "--config", "configs/tiny.yaml",
                                 *micro_overrides(out, seed)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: (out / "experts" / MARKER).is_file(), proc, log_path, "experts/_SUCCESS.json")
        partial = out / "merge.partial"
        # merge has started: its work dir exists; give it until the merged MoE is being written (the fine-tune on
        # Ray Train comes next), so the kill leaves a non-empty .partial directory behind
        _wait_for(lambda: (partial / "merged").is_dir(), proc, log_path, "merge.partial/merged", timeout=300)
    finally:
        survivors = _kill(proc, private) if proc.poll() is None else _kill_leftovers(private)
        killed_at = time.perf_counter() - t0
        shutil.rmtree(private, ignore_errors=True)
    first = log_path.read_text()
    assert proc.returncode == -signal.SIGKILL, first[-3000:]
    assert survivors == [], f"processes outlived the process-group kill: {survivors}"

    # state after the kill: three finished stages, merge half-written, nothing later
    before = markers(out)
    assert list(before) == ["data", "partition", "experts"], first[-3000:]
    assert "[merge] running" in first and "[merge] done" not in first
    assert partial.is_dir() and not (out / "merge").exists()
    assert not (out / "evaluate").exists() and not (out / "export").exists()
    # The worst moment to die: merge had written its marker into the work dir but not renamed it yet. Plant that
    # marker (same fingerprint: A's merge marker, the recipe is the same) to show a .partial is never taken as done.
    (partial / MARKER).write_bytes(uninterrupted["markers"]["merge"])
    for stage in before:  # same recipe, same fingerprints as the uninterrupted run
        assert json.loads(before[stage])["fingerprint"] == json.loads(uninterrupted["markers"][stage])["fingerprint"]

    lines: list[str] = []
    t1 = time.perf_counter()
    results = run_pipeline(load_config("configs/tiny.yaml", micro_overrides(out, seed)), log=lines.append)
    resumed_s = time.perf_counter() - t1
    reused = [s for s in STAGES if results[s].reused]
    recomputed = [s for s in STAGES if not results[s].reused]
    assert reused == ["data", "partition", "experts"] and len(recomputed) == 3
    for stage in reused:
        assert any(line.startswith(f"[{stage}] reusing {out / stage}") for line in lines), lines
        finished_at = json.loads(before[stage])["provenance"]["finished_at"]
        assert f"[{stage}] reusing {out / stage} (finished {finished_at})" in lines
    for stage in recomputed:
        assert f"[{stage}] running -> {out / stage}" in lines, lines
    after = markers(out)
    assert list(after) == list(STAGES)
    assert {s: after[s] for s in reused} == before  # untouched, byte for byte (same finished_at, timings)
    assert not list(out.glob("*.partial"))
    assert after["merge"] != uninterrupted["markers"]["merge"]  # a fresh marker, not the planted one

    # the interruption changes nothing in the results
    resumed = outcome(out)
    expected = uninterrupted["outcome"]
    assert resumed["moe_weights"] == expected["moe_weights"]
    assert resumed["moe_predictions"] == expected["moe_predictions"]
    assert resumed["results"] == expected["results"]
    print(f"\nsubprocess killed after {killed_at:.1f}s (during merge); resumed run: {resumed_s:.1f}s, "
          f"reused {reused}, recomputed {recomputed}")


def test_c_a_finetune_change_recomputes_merge_and_everything_after(tmp_path, uninterrupted, seed, ray_local):
    """``finetune.enabled=false`` (a ``finetune.*`` change that also skips the Ray Train fine-tune, to stay cheap):
    the merge fingerprint changes, so merge, evaluate and export are recomputed; data, partition, experts are not.
    On a copy of test A's run: other tests link that run's stages and need them as they are."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted["out"], out, symlinks=True)
    before = markers(out)
    lines: list[str] = []
    results = run_pipeline(load_config("configs/tiny.yaml", micro_overrides(out, seed, "finetune.enabled=false")),
                           log=lines.append)
    after = markers(out)
    for stage in ("data", "partition", "experts"):
        assert results[stage].reused and after[stage] == before[stage]
        assert any(line.startswith(f"[{stage}] reusing {out / stage}") for line in lines)
    for stage in ("merge", "evaluate", "export"):
        assert not results[stage].reused and after[stage] != before[stage]
        assert json.loads(after[stage])["fingerprint"] != json.loads(before[stage])["fingerprint"]
        assert f"[{stage}] running -> {out / stage}" in lines
    assert sum(not results[s].reused for s in STAGES) == 3
    assert json.loads((out / "merge" / "merge.json").read_text())["finetune"] is None
    # the new config took effect: the served MoE is now the merge without fine-tune
    assert digest(out / "merge" / "model" / "model.safetensors") == \
        digest(out / "merge" / "merged" / "model.safetensors") != uninterrupted["outcome"]["moe_weights"]
    assert not list(out.glob("*.partial"))
