"""Expert stage on Ray Train + Tune with a tiny Llama seed: N=2 experts + the dense baseline, resume after a failure."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lm_lexicon.config import load_config
from lm_lexicon.pipeline import run_pipeline
from lm_lexicon.train.stage import FAIL_ONCE_ENV, finished_jobs, max_concurrent, plan_jobs

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory):
    from lm_lexicon.seed_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("seed") / "tiny-llama")


def _cfg(out, seed, *extra):
    return load_config("configs/tiny.yaml", [
        f"output_dir={out}", f"resources.storage_path={out}/ray", f"seed_model.name={seed}",
        "data.max_train_rows=48", "data.max_valid_rows=16", "data.max_test_rows=8", "partition.n_experts=2",
        "partition.plot_sample=40", "train.max_steps=4", "train.eval_every=2", "train.batch_size=4",
        "train.precision=fp32", "train.lr=1e-3", "train.trainable=all", *extra])


def test_plan_and_concurrency():
    cfg = load_config("configs/tiny.yaml")
    assert [j["name"] for j in plan_jobs(3)] == ["dense", "expert_0", "expert_1", "expert_2"]
    assert max_concurrent(cfg.resources, {"CPU": 2}) == 2
    assert max_concurrent(cfg.resources, {"CPU": 1}) == 1
    gpu = load_config("configs/llama3-8b-3dex.yaml").resources
    assert max_concurrent(gpu, {"CPU": 256, "GPU": 32}) == 4  # 8 GPUs per expert
    assert max_concurrent(gpu, {"CPU": 256, "GPU": 8}) == 1


def test_two_experts_and_dense_produce_distinct_checkpoints_and_a_manifest(micro_run):
    """The experts stage of the session's micro run (2 domains, 2 steps a job, 0.5 CPU a worker)."""
    out = micro_run["out"]
    d = out / "experts"
    fp = json.loads((d / "_SUCCESS.json").read_text())["fingerprint"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert [j["name"] for j in manifest["jobs"]] == ["dense", "expert_0", "expert_1"]
    # the three half-CPU jobs fit the 2-CPU Ray at once (the Tune trial's own reservation does not crowd one out):
    # the dense model's and the first expert's workers are launched side by side (measured from the launch, not from
    # the start of training, which a loaded machine can delay past the other job's few steps)
    spans = {job: (final["worker_launched_at"], final["finished_at"]) for job, final in manifest["final"].items()}
    assert spans["expert_0"][0] < spans["dense"][1] and spans["dense"][0] < spans["expert_0"][1], spans
    weights = {}
    for job in ("expert_0", "expert_1", "dense"):
        metrics = json.loads((d / job / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["train_loss_last"] < metrics["train_loss_first"]
        assert [h["step"] for h in metrics["history"]] == [2]
        files = sorted(p.name for p in (d / job / "model").iterdir())
        assert "model.safetensors" in files and "config.json" in files
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
        weights[job] = load_file(str(d / job / "model" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights["expert_0"][name], weights["expert_1"][name])
    assert not torch.equal(weights["expert_0"][name], weights["dense"][name])
    table = manifest["own_domain_validation"]
    assert [r["domain"] for r in table] == [0, 1] and all("dense_loss" in r for r in table)
    # the finished stage released its Ray Train checkpoints; the runs' directories (logs) stay
    runs_dirs = sorted(p.name for p in (out / "ray").glob(f"tiny-*-{fp[:8]}"))
    assert {f"tiny-{j}-{fp[:8]}" for j in ("expert_0", "expert_1", "dense")} <= set(runs_dirs)
    assert not [p for p in (out / "ray").rglob("checkpoint_*") if p.is_dir()]
    # the Tune trials' directories are named after their jobs
    trial_dirs = (out / "ray" / f"tiny-experts-{fp[:8]}").iterdir()
    assert sorted(p.name.split("-")[0] for p in trial_dirs if p.is_dir()) == ["dense", "expert_0", "expert_1"]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["lm-lexicon"])
    assert sorted(runs["tags.job"].dropna()) == ["dense", "expert_0", "expert_1"]
    stage_runs = runs[runs["tags.kind"] == "stage"]  # children of the one pipeline run
    assert set(stage_runs["tags.stage"]) == {"data", "partition", "experts", "merge", "evaluate", "export"}
    pipeline_id = runs[runs["tags.kind"] == "pipeline"]["run_id"].tolist()
    assert len(pipeline_id) == 1 and set(stage_runs["tags.mlflow.parentRunId"]) == set(pipeline_id)


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_seed, ray_local, monkeypatch):
    cfg = _cfg(tmp_path, tiny_seed, "resources.max_failures=0", "partition.n_experts=1", "partition.method=none")
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"2:{marker}")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pipeline(cfg, stages=("experts",), log=lambda m: None)
    assert marker.exists()
    monkeypatch.delenv(FAIL_ONCE_ENV)
    res = run_pipeline(cfg, stages=("experts",), log=lambda m: None)["experts"]
    resumed = {job: json.loads((res.path / job / "metrics.json").read_text()) for job in ("expert_0", "dense")}
    failed_job = marker.read_text()
    assert resumed[failed_job]["resumed_from_step"] == 2 and resumed[failed_job]["steps"] == 4
    # the job that was not interrupted by the injected failure either finished or resumed; both end at step 4
    assert all(m["steps"] == 4 for m in resumed.values())


@pytest.mark.slow
def test_ray_train_retries_a_failed_worker_from_its_checkpoint(tmp_path, tiny_seed, ray_local, monkeypatch):
    cfg = _cfg(tmp_path, tiny_seed, "resources.max_failures=1", "partition.n_experts=1", "partition.method=none")
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"2:{marker}")
    res = run_pipeline(cfg, stages=("experts",), log=lambda m: None)["experts"]
    m = json.loads((res.path / marker.read_text() / "metrics.json").read_text())
    assert m["resumed_from_step"] == 2 and m["steps"] == 4


def test_deepspeed_json_contents_are_part_of_the_experts_fingerprint(tmp_path, monkeypatch):
    import lm_lexicon.train.stage as experts
    from lm_lexicon.artifacts import StageResult

    seen = []
    monkeypatch.setattr(experts, "run_stage", lambda name, path, fp, *a, **k: seen.append(fp))
    monkeypatch.setattr(experts, "release_checkpoints", lambda *a, **k: None)
    zero = tmp_path / "zero.json"
    zero.write_text('{"zero_optimization": {"stage": 3}}')
    cfg = load_config("configs/llama3-8b-3dex.yaml", [f"train.deepspeed={zero}"])
    partition = StageResult("partition", tmp_path, "p" * 16, False, 0.0, {})
    experts.run_experts_stage(cfg, partition)
    experts.run_experts_stage(cfg, partition)
    zero.write_text('{"zero_optimization": {"stage": 2}}')  # same path, different contents
    experts.run_experts_stage(cfg, partition)
    assert seen[0] == seen[1] != seen[2]


@pytest.mark.parametrize("dense", [True, False])
def test_dense_baseline_switch_reaches_the_stage(tmp_path, monkeypatch, dense):
    import lm_lexicon.train.stage as experts
    from lm_lexicon.artifacts import StageResult

    seen = {}
    monkeypatch.setattr(experts, "experts_stage_fn", lambda *a, with_dense=True, **k: seen.setdefault("dense", with_dense))
    monkeypatch.setattr(experts, "run_stage", lambda *a, **k: None)
    monkeypatch.setattr(experts, "release_checkpoints", lambda *a, **k: None)
    cfg = load_config("configs/tiny.yaml", [f"train.dense_baseline={str(dense).lower()}"])
    experts.run_experts_stage(cfg, StageResult("partition", tmp_path, "p" * 16, False, 0.0, {}))
    assert seen["dense"] is dense
    assert [j["name"] for j in plan_jobs(2, with_dense=dense)] == (["dense"] if dense else []) + ["expert_0", "expert_1"]


def test_an_interrupted_tune_run_stops_the_stage_before_it_reads_missing_models(tmp_path):
    """Tune handles a stop signal itself and returns normally: a job with no error and no model is not finished."""
    from types import SimpleNamespace

    jobs = plan_jobs(2, with_dense=False)
    grid = [SimpleNamespace(config={"job": j}, error=None, metrics={"steps": 3}) for j in jobs]
    (tmp_path / jobs[0]["name"] / "model").mkdir(parents=True)
    with pytest.raises(RuntimeError, match=f"stopped before {jobs[1]['name']} finished"):
        finished_jobs(grid, jobs, tmp_path)
    (tmp_path / jobs[1]["name"] / "model").mkdir(parents=True)
    assert finished_jobs(grid, jobs, tmp_path) == {j["name"]: {"steps": 3} for j in jobs}
    grid[1].metrics = {"job_error": "ValueError: boom"}
    with pytest.raises(RuntimeError, match="expert training failed: .*boom"):
        finished_jobs(grid, jobs, tmp_path)
    grid[1] = SimpleNamespace(config=None, error=MemoryError("killed by Ray's memory monitor"), metrics={})
    with pytest.raises(RuntimeError, match="a trial that did not start: killed by Ray's memory monitor"):
        finished_jobs(grid, jobs, tmp_path)
