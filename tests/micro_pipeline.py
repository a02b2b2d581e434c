"""The micro pipeline several tests run: the smallest recipe that still runs every stage for real, in-process or as
``jobs/pipeline.py`` in a subprocess with a private Ray (see tests/test_pipeline_resume.py's docstring)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def micro_overrides(out: Path, seed: Path, *extra: str) -> list[str]:
    """2 domains, 2 training steps per expert and for the MoE fine-tune, 6 greedy test rows of 4 new tokens, the
    constant baseline, cheap metrics."""
    return [f"output_dir={out}", f"resources.storage_path={out}/ray", f"seed_model.name={seed}",
            "resources.num_cpus=2", "resources.object_store_memory_mb=200",
            "data.max_train_rows=32", "data.max_valid_rows=8", "data.max_test_rows=8",
            "embed.num_actors=1", "partition.n_experts=2", "partition.plot_sample=16",
            "resources.cpus_per_worker=0.5",  # the 3 expert runs (2 experts + dense) at once on 2 CPUs
            "train.max_steps=2", "train.eval_every=2", "train.batch_size=4", "train.precision=fp32",
            "finetune.max_steps=2", "finetune.batch_size=4",
            "evaluate.max_rows=6", "evaluate.max_new_tokens=4", "evaluate.baselines=[constant]",
            "evaluate.metrics=[bleu_a, rouge_l, length]", "evaluate.best_of_n=1", *extra]


def private_ray_env(private_dir: str) -> dict:
    """The environment of a subprocess that must start its own local Ray, never join another one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COLUMNS")}
    env.update(RAY_TMPDIR=private_dir, PYTHONUNBUFFERED="1")
    return env


def run_micro_pipeline(out: Path, seed: Path, *extra: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """``jobs/pipeline.py`` on the micro recipe in a subprocess; its stdout and stderr are pipes (what a user's
    terminal would show)."""
    private = tempfile.mkdtemp(prefix="lmlx-ray-")  # short: Ray's socket paths live under it (108-byte limit)
    try:
        return subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "configs/tiny.yaml",
                               *micro_overrides(out, seed, *extra)], cwd=REPO, env=private_ray_env(private),
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def link_finished_stages(run_dir: Path, out: Path, stages: tuple[str, ...]) -> None:
    """Symlink ``stages`` of a finished micro run into ``out``: a run there on the same upstream recipe reuses them
    (same fingerprints), as ablation arms do, and computes only the stages after them. The linked stages must stay
    untouched, so no test may re-run a stage inside the shared run's own directory."""
    out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        assert (run_dir / stage / "_SUCCESS.json").is_file(), f"{run_dir / stage} is not a finished stage"
        (out / stage).symlink_to(run_dir / stage, target_is_directory=True)
