"""Experiments over pipelines (lm_lexicon.experiments): the ablation summary and tables, the
scan table and plot; the Tune scan and an ablation end to end on a micro config (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lm_lexicon.experiments import Variant, ablation_table, plot_ablation, plot_scan, scan_table, summarize


def test_summary_table_and_plot(tmp_path):
    variants = [Variant("semantic", [], label="semantic (default)"), Variant("random", [])]
    scores = {"semantic": {21: {"bleu_a": 10.0}, 42: {"bleu_a": 12.0}},
              "random": {21: {"bleu_a": 8.0}, 42: {"bleu_a": 9.0}}}
    items = {"semantic": {21: {"bleu_a": np.array([10.0, 10.0, 10.0, 10.0])},
                          42: {"bleu_a": np.array([12.0, 12.0, 12.0, 12.0])}},
             "random": {21: {"bleu_a": np.array([8.0, 8.0, 8.0, 8.0])}, 42: {"bleu_a": np.array([9.0, 9.0, 9.0, 9.0])}}}
    rows = summarize(variants, scores, items, ["bleu_a"])
    assert rows[0]["bleu_a"]["mean"] == 11.0 and rows[0]["bleu_a"]["std"] == pytest.approx(2 ** 0.5)
    assert "p_value" not in rows[0]["bleu_a"]  # the default is the reference
    assert rows[1]["bleu_a"]["delta"] == pytest.approx(-2.5)
    assert rows[1]["bleu_a"]["p_value"] == pytest.approx(2 / 16)
    table = ablation_table("partition", rows, ["bleu_a"], [21, 42])
    assert "| semantic (default) | 11.00 ± 1.41 | — |" in table
    assert "| random | 8.50 ± 0.71 | -2.50 (0.125) |" in table
    plot_ablation("partition", rows, ["bleu_a"], tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_scan_table_and_plot(tmp_path):
    rows = [{"n": 1, "moe_bleu_a": 10.0, "dense_bleu_a": 11.0, "seconds": 60},
            {"n": 4, "moe_bleu_a": 12.5, "dense_bleu_a": 11.0, "seconds": 120}]
    table = scan_table(rows)
    assert "| 4 | 12.50 | 11.00 | 2.0 |" in table
    plot_scan(rows, tmp_path / "scan.png", "t")
    assert (tmp_path / "scan.png").stat().st_size > 1000


def test_scan_rows_test_each_n_against_the_smallest_on_paired_items(tmp_path):
    from lm_lexicon.experiments import add_paired_tests

    rows = [{"n": 1, "moe_bleu_a": 10.0, "seeds": [21, 42]}, {"n": 2, "moe_bleu_a": 12.0, "seeds": [21, 42]},
            {"n": 4, "moe_bleu_a": 10.1, "seeds": [21, 42]}]
    base = np.linspace(0.0, 30.0, 40)
    items = {1: {"bleu_a": base}, 2: {"bleu_a": base + 2.0}, 4: {"bleu_a": base + np.where(np.arange(40) % 2, 1, -1)}}
    rows = add_paired_tests(rows, items)
    assert "moe_bleu_a_p" not in rows[0]
    assert rows[1]["moe_bleu_a_delta"] == pytest.approx(2.0) and rows[1]["moe_bleu_a_p"] < 0.001
    assert rows[2]["moe_bleu_a_delta"] == pytest.approx(0.0) and rows[2]["moe_bleu_a_p"] > 0.5
    table = scan_table(rows)
    assert "dense" not in table  # no trial trained a dense model: no empty columns
    assert "| N | MoE bleu_a | Δ MoE bleu_a vs N=1 (p) | minutes |" in table
    assert "| 2 | 12.00 | +2.00 (0.000) | 0.0 |" in table and "| 1 | 10.00 |  | 0.0 |" in table
    assert "paired sign-flip permutation" in table


def test_a_scan_trials_tune_directory_is_named_as_its_run_directory(tmp_path):
    from types import SimpleNamespace

    from lm_lexicon.experiments import scan_run_dir, scan_trial_dirname

    trial = SimpleNamespace(config={"n": 4, "seed": 21, "env": {"RAY_ADDRESS": "10.0.0.1:6379"}},
                            trial_id="c8409_00002")
    assert scan_trial_dirname(trial) == "n4-s21-c8409_00002" == f"{scan_run_dir(tmp_path, 4, 21).name}-c8409_00002"
    assert scan_trial_dirname(SimpleNamespace(config={"n": 2}, trial_id="c8409_00000")) == "n2-c8409_00000"


def test_scan_rows_are_means_over_seeds_with_their_std(tmp_path):
    from lm_lexicon.experiments import aggregate_scan

    trials = [{"n": 1, "seed": 21, "moe_bleu_a": 10.0, "dense_bleu_a": 9.0, "seconds": 60},
              {"n": 1, "seed": 42, "moe_bleu_a": 12.0, "dense_bleu_a": 9.0, "seconds": 120},
              {"n": 4, "seed": 21, "moe_bleu_a": 13.0, "seconds": 240}]
    rows = aggregate_scan(trials)
    assert [r["n"] for r in rows] == [1, 4] and rows[0]["seeds"] == [21, 42]
    assert rows[0]["moe_bleu_a"] == 11.0 and rows[0]["moe_bleu_a_std"] == pytest.approx(2 ** 0.5)
    assert rows[0]["dense_bleu_a_std"] == 0.0 and rows[0]["seconds"] == 90.0
    assert "moe_bleu_a_std" not in rows[1] and "dense_bleu_a" not in rows[1]  # one seed: no std; no dense model
    table = scan_table(rows)
    assert "| 1 | 11.00 ± 1.41 | 9.00 ± 0.00 | 1.5 |" in table and "| 4 | 13.00 |  | 4.0 |" in table
    assert "seeds 21, 42" in table
    plot_scan(rows, tmp_path / "scan.png", "t")
    assert (tmp_path / "scan.png").stat().st_size > 1000


def test_a_scan_trial_runs_once_deletes_its_weights_and_reruns_when_its_config_changes(tmp_path, monkeypatch):
    import ray.tune

    import lm_lexicon.experiments as experiments

    runs, reports = [], []

    def fake_pipeline(config, overrides, log_file, env=None):
        out = Path(next(o for o in overrides if o.startswith("output_dir=")).split("=", 1)[1])
        runs.append(list(overrides))
        for rel in ("experts/expert_0/model/model.safetensors", "merge/model/model.safetensors"):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(b"x" * 100)
        (out / "evaluate").mkdir(parents=True, exist_ok=True)
        (out / "evaluate" / "metrics.json").write_text(json.dumps(
            {"meta": {"split": "valid"}, "results": {"moe": {"bleu_a": {"value": 10.0 + len(runs)}}}}))

    monkeypatch.setattr(experiments, "run_pipeline_process", fake_pipeline)
    monkeypatch.setattr(ray.tune, "report", reports.append)
    trial = {"n": 2, "seed": 21, "scan_dir": str(tmp_path), "overrides": ["train.max_steps=2"],
             "config": "configs/tiny.yaml", "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "env": {},
             "name": "tiny", "keep_weights": False}
    experiments._scan_trial(trial)
    out = tmp_path / "n2-s21"
    assert len(runs) == 1 and {"partition.seed=21", "train.seeds=[21]", "partition.n_experts=2",
                               "evaluate.split=valid"} <= set(runs[0])
    assert reports[-1]["n"] == 2 and reports[-1]["seed"] == 21 and reports[-1]["moe_bleu_a"] == 11.0
    assert not list(out.rglob("*.safetensors"))
    assert json.loads((out / experiments.ARM_DONE).read_text())["pruned"]["files"] == 2
    experiments._scan_trial(trial)  # resumed: read, not rerun
    assert len(runs) == 1 and reports[-1]["moe_bleu_a"] == 11.0
    experiments._scan_trial({**trial, "overrides": ["train.max_steps=3"]})
    assert len(runs) == 2 and reports[-1]["moe_bleu_a"] == 12.0


def _micro(tmp_path, seed_dir) -> list[str]:
    return [f"seed_model.name={seed_dir}", "data.max_train_rows=40", "data.max_valid_rows=12", "data.max_test_rows=10",
            "partition.plot_sample=30", "train.max_steps=2", "train.eval_every=2", "train.batch_size=4",
            "train.precision=fp32", "finetune.max_steps=1", "finetune.batch_size=4", "evaluate.max_rows=6",
            "evaluate.max_new_tokens=4", "evaluate.metrics=[bleu_a, rouge_l]", "evaluate.baselines=[constant, dense]",
            "evaluate.no_repeat_ngram_size=0", "evaluate.best_of_n=1"]


@pytest.mark.slow
@pytest.mark.ray
def test_expert_count_scan_on_ray_tune(tmp_path, ray_local):
    from lm_lexicon.experiments import expert_count_scan
    from lm_lexicon.seed_models import tiny_llama

    seed = tiny_llama(tmp_path / "seed")
    result = expert_count_scan("configs/tiny.yaml", _micro(tmp_path, seed), [1, 2], tmp_path / "scan",
                               log=lambda m: None)
    assert [r["n"] for r in result["rows"]] == [1, 2]
    assert all("moe_bleu_a" in r and "dense_rouge_l" in r for r in result["rows"])
    for n in (1, 2):
        meta = json.loads((tmp_path / "scan" / f"n{n}" / "evaluate" / "metrics.json").read_text())["meta"]
        assert meta["split"] == "valid"
        partition = json.loads((tmp_path / "scan" / f"n{n}" / "partition" / "partition.json").read_text())
        assert partition["n_experts"] == n
    assert (tmp_path / "scan" / "scan.png").stat().st_size > 1000
    trial_dirs = (tmp_path / "scan" / "tune" / "scan-expert-count").iterdir()
    assert sorted(p.name.split("-")[0] for p in trial_dirs if p.is_dir()) == ["n1", "n2"]

    import mlflow  # one scan run, each trial's pipeline run its child

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'scan' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lm-lexicon"])
    scan_id = runs[runs["tags.kind"] == "scan"]["run_id"].tolist()
    pipelines = runs[runs["tags.kind"] == "pipeline"]
    assert len(scan_id) == 1 and len(pipelines) == 2
    assert set(pipelines["tags.mlflow.parentRunId"]) == set(scan_id)


@pytest.mark.slow
@pytest.mark.ray
def test_routing_ablation_reuses_the_default_arms_upstream_stages(tmp_path, ray_local):
    from lm_lexicon.experiments import ROUTING_VARIANTS, run_ablation
    from lm_lexicon.seed_models import tiny_llama

    seed = tiny_llama(tmp_path / "seed")
    res = run_ablation("routing", "configs/tiny.yaml", _micro(tmp_path, seed), [21], tmp_path / "abl",
                       variants=ROUTING_VARIANTS[:2], log=lambda m: None)
    assert [r["variant"] for r in res.rows] == ["domain", "token-top1"]
    assert "p_value" in res.rows[1]["bleu_a"]
    default_arm = tmp_path / "abl" / "partition" / "semantic-s21"
    for stage in ("data", "partition", "experts"):
        link = tmp_path / "abl" / "routing" / "token-top1-s21" / stage
        assert link.is_symlink() and link.resolve() == (default_arm / stage).resolve()
    merged = yaml.safe_load((tmp_path / "abl" / "routing" / "token-top1-s21" / "merge" / "config.yaml").read_text())
    assert merged["merge"]["routing"] == "token" and merged["merge"]["top_k"] == 1
    assert (tmp_path / "abl" / "routing.md").read_text().count("|") > 10


# ---- ablation arms delete their weights once evaluated, and still resume


def _fake_pipeline(calls):
    """Stands in for run_pipeline: writes a finished run's layout (weights, router, metrics, predictions, configs)
    into the stage directories the arm owns (a symlinked upstream stage belongs to another arm)."""
    def run(cfg, log=print):
        out = Path(cfg.output_dir)
        calls.append(out.name)
        files = {"experts/expert_0/model/model.safetensors": 1000, "experts/dense/model/model.safetensors": 1000,
                 "experts/expert_0/metrics.json": 10, "experts/_SUCCESS.json": 10,
                 "merge/model/model.safetensors": 2000, "merge/model/router/router.safetensors": 50,
                 "merge/model/config.json": 10, "merge/_SUCCESS.json": 10,
                 "export/collapsed/domain-0/model.safetensors": 1000, "export/_SUCCESS.json": 10,
                 "evaluate/config.yaml": 10,
                 "partition/router/router.safetensors": 50, "partition/_SUCCESS.json": 10, "data/_SUCCESS.json": 10,
                 "ray/run-1/checkpoint_000001/model.pt": 500}
        for rel, size in files.items():
            path = out / rel
            if (out / rel.split("/")[0]).is_symlink():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * size)
        value = 10.0 + len(calls)
        if not (out / "partition").is_symlink():
            classifier = None if cfg.partition.features == "prompt" else {"held_out_accuracy": 0.5}
            (out / "partition" / "partition.json").write_text(json.dumps(
                {"agreement": {"source": {"purity": len(calls) / 10}}, "separation_mean": 0.25,
                 "classifier": classifier}))
        if cfg.train.dense_baseline and not (out / "experts").is_symlink():  # own-domain losses: 2 domains
            (out / "experts" / "manifest.json").write_text(json.dumps({"own_domain_validation": [
                {"domain": 0, "n_valid": 1, "expert_loss": 2.0, "dense_loss": 2.5},
                {"domain": 1, "n_valid": 3, "expert_loss": 3.0, "dense_loss": 2.5}]}))
        if not (out / "evaluate").is_symlink():  # four test items: two from each source
            (out / "evaluate" / "predictions").mkdir(parents=True, exist_ok=True)
            (out / "evaluate" / "predictions" / "moe.jsonl").write_text("".join(
                json.dumps({"term": f"t{i}", "source": src}) + "\n" for i, src in enumerate(["a", "b", "a", "b"])))
        (out / "evaluate" / "metrics.json").write_text(json.dumps(
            {"meta": {"split": "test"}, "results": {"moe": {"bleu_a": {"value": value}, "rouge_l": {"value": value}}}}))
    return run


@pytest.fixture
def fake_runs(monkeypatch):
    import contextlib

    import lm_lexicon.experiments as experiments
    import lm_lexicon.pipeline
    import lm_lexicon.tracking

    calls = []

    class _Run:
        def log_params(self, *a, **k): ...
        def log_artifact(self, *a, **k): ...

    monkeypatch.setattr(lm_lexicon.pipeline, "run_pipeline", _fake_pipeline(calls))
    monkeypatch.setattr(lm_lexicon.tracking, "tracked_run", lambda *a, **k: contextlib.nullcontext(_Run()))
    monkeypatch.setattr(experiments, "per_item_scores",
                        lambda run_dir, model, metrics: {m: np.arange(4, dtype=float) for m in metrics})
    monkeypatch.setattr(experiments, "plot_ablation", lambda *a, **k: None)
    return calls


def _weights(run_dir):
    return sorted(str(f.relative_to(run_dir)) for f in run_dir.rglob("*")
                  if f.is_file() and f.suffix in (".safetensors", ".pt") and "router" not in f.parts)


def test_evaluated_arms_delete_their_weights_and_resume(tmp_path, fake_runs):
    from lm_lexicon.experiments import ARM_DONE, PARTITION_VARIANTS, ROUTING_VARIANTS, run_ablation

    abl, logs = tmp_path / "abl", []
    run = lambda study, variants, **kw: run_ablation(  # noqa: E731
        study, "configs/tiny.yaml", kw.pop("overrides", []), [1], abl, variants=variants, log=logs.append, **kw)
    run("partition", [PARTITION_VARIANTS[0], PARTITION_VARIANTS[2]], keep_shared_upstream=True)
    semantic, rand = abl / "partition" / "semantic-s1", abl / "partition" / "random-s1"
    assert fake_runs == ["semantic-s1", "random-s1"]
    # the default arm keeps only its experts (the routing arms' shared upstream); the other arm keeps no weights
    assert _weights(semantic) == ["experts/dense/model/model.safetensors", "experts/expert_0/model/model.safetensors"]
    assert _weights(rand) == []
    for kept in ("evaluate/metrics.json", "evaluate/predictions/moe.jsonl", "evaluate/config.yaml",
                 "merge/model/config.json", "merge/model/router/router.safetensors", "experts/expert_0/metrics.json"):
        assert (rand / kept).is_file(), kept
    marker = json.loads((rand / ARM_DONE).read_text())
    assert marker["complete"] and marker["pruned"]["stages"] == ["experts", "merge", "export"]
    assert marker["pruned"]["files"] == 4 and marker["pruned"]["checkpoints"] == 1
    assert marker["pruned"]["bytes"] == 1000 + 1000 + 2000 + 1000 + 500
    assert any("deleted 4 weight file(s)" in m for m in logs)

    # resumed: finished arms are not rerun, and report the same numbers
    first = json.loads((abl / "partition.json").read_text())["rows"]
    run("partition", [PARTITION_VARIANTS[0], PARTITION_VARIANTS[2]], keep_shared_upstream=True)
    assert fake_runs == ["semantic-s1", "random-s1"]
    assert json.loads((abl / "partition.json").read_text())["rows"] == first

    # routing arms link the default arm's experts; once they are done, those experts go too
    run("routing", ROUTING_VARIANTS[:2])
    assert fake_runs[2:] == ["domain-s1", "token-top1-s1"]
    token = abl / "routing" / "token-top1-s1"
    assert (token / "experts").is_symlink() and _weights(token) == [] and _weights(semantic) == []
    assert json.loads((semantic / ARM_DONE).read_text())["pruned"]["stages"] == ["experts", "merge", "export"]

    # a new routing arm after that: the default arm's experts are retrained first (the other stages are reused)
    run("routing", ROUTING_VARIANTS[:3])
    assert fake_runs[4:] == ["semantic-s1", "token-top2-s1"]
    assert any("experts were deleted; retraining" in m for m in logs)

    # a changed configuration reruns the arm, from scratch where its weights are gone
    run("partition", [PARTITION_VARIANTS[2]], overrides=["evaluate.max_rows=5"])
    assert fake_runs[6:] == ["random-s1"]
    assert any("configuration changed" in m for m in logs)


def test_keep_weights_and_the_features_study_reuses_the_semantic_arm(tmp_path, fake_runs):
    from lm_lexicon.experiments import ARM_DONE, FEATURE_VARIANTS, PARTITION_VARIANTS, run_ablation

    abl = tmp_path / "abl"
    run_ablation("partition", "configs/tiny.yaml", [], [1], abl, variants=PARTITION_VARIANTS[:1], log=lambda m: None,
                 keep_weights=True)
    semantic = abl / "partition" / "semantic-s1"
    assert len(_weights(semantic)) == 5 and json.loads((semantic / ARM_DONE).read_text())["pruned"] is None
    res = run_ablation("features", "configs/tiny.yaml", [], [1], abl, variants=FEATURE_VARIANTS[:2],
                       log=lambda m: None, keep_weights=True)
    assert fake_runs == ["semantic-s1", "definition-s1"]  # the prompt arm is the semantic arm, not run again
    assert not (abl / "features" / "prompt-s1").exists()
    assert [r["variant"] for r in res.rows] == ["prompt", "definition"]
    assert res.rows[0]["bleu_a"]["mean"] == 11.0 and res.rows[1]["bleu_a"]["mean"] == 12.0
    assert len(_weights(abl / "features" / "definition-s1")) == 5
    # the clusters: purity (the fake's is a tenth of its call number), separation, the classifier's accuracy
    assert "| features | purity_source | router_accuracy | separation |" in res.table
    assert "| prompt (default) | 0.100 |  | 0.250 |" in res.table
    assert "| definition (classifier-routed) | 0.200 | 0.500 | 0.250 |" in res.table
    with pytest.raises(ValueError, match="study must be one of"):
        run_ablation("nonsense", "configs/tiny.yaml", [], [1], abl)


def test_the_recipe_study_reuses_the_semantic_and_dense_arms_and_varies_one_choice_per_arm(tmp_path, fake_runs,
                                                                                          monkeypatch):
    import lm_lexicon.pipeline
    from lm_lexicon.experiments import PARTITION_VARIANTS, RECIPE_VARIANTS, run_ablation

    abl, configs = tmp_path / "abl", {}
    fake = lm_lexicon.pipeline.run_pipeline

    def recording(cfg, log=print):
        configs[Path(cfg.output_dir).name] = cfg
        fake(cfg, log)

    monkeypatch.setattr(lm_lexicon.pipeline, "run_pipeline", recording)
    ablation_recipe = ["train.dense_baseline=false"]  # as the ablation recipes: a dense model is an arm of its own
    run_ablation("partition", "configs/tiny.yaml", ablation_recipe, [1], abl,
                 variants=[PARTITION_VARIANTS[0], PARTITION_VARIANTS[3]], log=lambda m: None)
    res = run_ablation("recipe", "configs/tiny.yaml", ablation_recipe, [1], abl, log=lambda m: None)
    # the default MoE and the dense model are the partition study's arms, not trained again
    assert fake_runs == ["semantic-s1", "none-s1", "no-finetune-s1", "compute-matched-s1", "full-s1", "dense-full-s1"]
    assert [r["variant"] for r in res.rows] == [v.name for v in RECIPE_VARIANTS]
    default, dense = configs["semantic-s1"], configs["none-s1"]
    differs = lambda name: {  # noqa: E731  the (section, field) pairs where an arm's recipe leaves the default's
        (sec, key) for sec in ("partition", "train", "finetune")
        for key, value in getattr(configs[name], sec).model_dump().items()
        if value != getattr(default, sec).model_dump()[key] and not (sec == "train" and key == "seeds")}
    assert differs("no-finetune-s1") == {("finetune", "enabled"), ("train", "dense_baseline")}
    assert differs("compute-matched-s1") == {("train", "expert_budget"), ("train", "dense_baseline")}
    assert configs["compute-matched-s1"].train.expert_budget == "steps"
    assert differs("full-s1") == {("train", "trainable")} and configs["full-s1"].train.trainable == "all"
    assert configs["dense-full-s1"].partition.n_experts == 1 and configs["dense-full-s1"].train.trainable == "all"
    assert dense.partition.n_experts == 1 and dense.train.trainable == default.train.trainable
    # per source (paper Table 2's shape): the fake per-item scores are 0, 1, 2, 3 on sources a, b, a, b
    assert "| recipe (bleu_a) | a (2) | b (2) |" in res.table and "| dense (N=1) | 1.00 | 2.00 |" in res.table
    # own domain: the arms that trained a dense model beside their experts (row-weighted: 0.25 x 2 + 0.75 x 3)
    assert "| MoE without the router fine-tune | 2.750 | 2.500 | 1 of 2 |" in res.table
    assert "| MoE, experts compute-matched (N passes over their domain) | 2.750 | 2.500 | 1 of 2 |" in res.table
    assert "| dense (N=1) | 2.750" not in res.table
    assert (abl / "recipe-by-source.png").stat().st_size > 1000
    by_source = json.loads((abl / "recipe.json").read_text())["by_source"]
    assert by_source["full"]["b"]["rouge_l"] == {"mean": 2.0, "std": None} and by_source["full"]["a"]["rows"] == 2
