"""`lm-lexicon run / evaluate / scan / ablate`: the pipeline's commands, and the jobs/ scripts that `ray job submit`
runs are the same commands. The heavy functions (the pipeline, the scan, the ablation runner) and the clean exit
(which would stop this process's Ray and children) are replaced by recorders: nothing here trains or starts Ray."""
from __future__ import annotations

import contextlib
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from lm_lexicon.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def calls(monkeypatch):
    """Every call of the heavy functions, as (name, args, kwargs); the pipeline "evaluates" one headline row."""
    import lm_lexicon.experiments
    import lm_lexicon.pipeline
    import lm_lexicon.ray_utils

    seen = []

    def fake_pipeline(cfg, stages=None, force=(), log=print):
        seen.append(("run_pipeline", (cfg.output_dir,), {"stages": stages, "force": force}))
        summary = {"headline": {"moe": {"bleu_a": 12.5}}, "split": "test", "n_rows": 6}
        return {"evaluate": SimpleNamespace(summary=summary, path=Path(cfg.output_dir) / "evaluate"), "_seconds": 1.0}

    def recorder(name, result=None):
        def record(*args, **kwargs):
            seen.append((name, args, kwargs))
            return result
        return record

    @contextlib.contextmanager
    def no_clean_exit(*args):
        yield {"signal": None, "exit_code": 130, "stopped": None}

    monkeypatch.setattr(lm_lexicon.pipeline, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(lm_lexicon.experiments, "expert_count_scan", recorder("expert_count_scan", {"rows": [{}]}))
    monkeypatch.setattr(lm_lexicon.experiments, "run_ablation", recorder("run_ablation"))
    monkeypatch.setattr(lm_lexicon.ray_utils, "clean_exit", no_clean_exit)
    return seen


def run_job(script: str, args: list[str], monkeypatch) -> int:
    """``python jobs/<script> ARGS`` in this process (so that the recorders see it); its exit code."""
    monkeypatch.setattr(sys, "argv", [str(REPO / "jobs" / script), *args])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(REPO / "jobs" / script), run_name="__main__")
    return stopped.value.code


def test_help_lists_the_pipeline_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for command in ("run", "evaluate", "scan", "ablate", "partition", "train-experts", "merge", "export", "serve"):
        assert f" {command} " in res.output, command


@pytest.mark.parametrize("command", ["run", "evaluate", "scan", "ablate"])
def test_a_bad_recipe_is_one_line_on_stderr_and_exit_2(command, tmp_path, calls):
    res = runner.invoke(app, [command, "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2
    assert res.stderr == f"config file not found: {tmp_path / 'missing.yaml'}\n" and res.stdout == ""
    res = runner.invoke(app, [command, "--config", "configs/tiny.yaml", "train.lr"])
    assert res.exit_code == 2
    assert res.stderr == "override 'train.lr' is not of the form section.field=value\n"
    assert calls == []


@pytest.mark.parametrize("command, options, message", [
    ("scan", ["--ns", "0,2"], "--ns must list expert counts >= 1, got '0,2'"),
    ("scan", ["--ns", "two"], "invalid literal for int() with base 10: 'two'"),
    ("ablate", ["--seeds", ","], "--seeds is empty"),
    ("ablate", ["--study", "tables"], "--study must be one of partition, routing, features, recipe or all, got 'tables'"),
])
def test_bad_options_are_one_line_and_exit_2(command, options, message, calls):
    res = runner.invoke(app, [command, "--config", "configs/tiny.yaml", *options])
    assert (res.exit_code, res.stderr) == (2, message + "\n")
    assert calls == []


def test_run_passes_stages_force_and_overrides_to_the_pipeline(tmp_path, calls):
    res = runner.invoke(app, ["run", "--config", "configs/tiny.yaml", "--stages", "data,partition", "--force",
                              "partition", f"output_dir={tmp_path}"])
    assert res.exit_code == 0, res.output
    assert calls == [("run_pipeline", (str(tmp_path),), {"stages": ("data", "partition"), "force": ("partition",)})]
    assert "pipeline finished in 1.0s" in (tmp_path / "logs" / "pipeline.log").read_text()


def test_evaluate_runs_the_evaluate_stage_and_prints_its_headline(tmp_path, calls):
    res = runner.invoke(app, ["evaluate", "--force", f"output_dir={tmp_path}"])
    assert res.exit_code == 0, res.output
    assert calls == [("run_pipeline", (str(tmp_path),), {"stages": ("evaluate",), "force": ("evaluate",)})]
    assert "12.50" in res.stdout and "tiny: test split," in res.stdout and "report.html" in res.stdout


def test_scan_and_ablate_call_the_runners_with_the_options(tmp_path, calls):
    res = runner.invoke(app, ["scan", "--ns", "1,2", "--out", str(tmp_path / "scan"), "--max-concurrent", "2",
                              "--trial-cpus", "0.5", "--seeds", "21,42", "train.max_steps=2"])
    assert res.exit_code == 0, res.output
    assert calls.pop() == ("expert_count_scan", ("configs/tiny.yaml", ["train.max_steps=2"], [1, 2], tmp_path / "scan"),
                           {"max_concurrent_trials": 2, "trial_cpus": 0.5, "name": "tiny", "seeds": [21, 42],
                            "keep_weights": False})
    assert res.stdout.startswith("scan of N=[1, 2] finished: ")
    res = runner.invoke(app, ["ablate", "--config", "configs/tiny.yaml", "--study", "all", "--seeds", "1, 2",
                              "--out", str(tmp_path / "abl"), "--keep-weights"])
    assert res.exit_code == 0, res.output
    assert [(c[1][0], c[1][3], c[2]["keep_shared_upstream"], c[2]["keep_weights"]) for c in calls] == [
        ("partition", [1, 2], True, True), ("routing", [1, 2], False, True), ("features", [1, 2], False, True),
        ("recipe", [1, 2], False, True)]
    assert all(c[2]["metrics"] == ["bleu_a", "rouge_l"] for c in calls)


@pytest.mark.parametrize("script, command, args", [
    ("pipeline.py", "run", ["--config", "configs/tiny.yaml", "--stages", "data", "--force", "data",
                            "data.max_train_rows=10"]),
    ("tune_experts.py", "scan", ["--ns", "2,4", "--out", "SCAN", "train.max_steps=1"]),
    ("ablate.py", "ablate", ["--config", "configs/tiny.yaml", "--study", "routing", "--seeds", "7", "--out", "ABL"]),
])
def test_a_job_script_is_its_command(script, command, args, tmp_path, calls, monkeypatch):
    """``python jobs/<script> ARGS`` and ``lm-lexicon <command> ARGS`` reach the same function with the same
    arguments and exit alike (0 here, 2 for a bad recipe)."""
    args = [a.replace("SCAN", str(tmp_path / "scan")).replace("ABL", str(tmp_path / "abl")) for a in args]
    args.append(f"output_dir={tmp_path / 'out'}")
    assert runner.invoke(app, [command, *args]).exit_code == 0
    via_cli = list(calls)
    calls.clear()
    assert run_job(script, args, monkeypatch) == 0
    assert calls == via_cli and len(calls) == 1
    assert run_job(script, [*args, "--config", str(tmp_path / "missing.yaml")], monkeypatch) == 2
