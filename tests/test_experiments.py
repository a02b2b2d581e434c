"""Experiments over pipelines (lm_lexicon.experiments): the significance test, the ablation summary and tables, the
scan table and plot; the Tune scan and an ablation end to end on a micro config (slow)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lm_lexicon.experiments import (Variant, ablation_table, mean_std, paired_permutation_test, plot_ablation,
                                    plot_scan, scan_table, summarize)


def test_permutation_test_exact_small_sample():
    # 4 positive differences: of the 16 sign patterns only all-plus and all-minus reach |mean| = 1 -> p = 2/16
    assert paired_permutation_test([2, 2, 2, 2], [1, 1, 1, 1]) == pytest.approx(2 / 16)
    assert paired_permutation_test([1, 2, 3], [1, 2, 3]) == 1.0
    # symmetric in the arguments
    a, b = [0.3, 0.9, 0.1, 0.5, 0.7], [0.2, 0.4, 0.3, 0.1, 0.6]
    assert paired_permutation_test(a, b) == paired_permutation_test(b, a)


def test_permutation_test_large_sample_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    assert paired_permutation_test(base + 0.3, base + rng.normal(scale=0.5, size=400)) < 0.01
    noise = rng.normal(size=400)
    assert paired_permutation_test(noise, rng.permutation(noise)) > 0.05
    with pytest.raises(ValueError):
        paired_permutation_test([], [])


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, None)


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
    import yaml

    merged = yaml.safe_load((tmp_path / "abl" / "routing" / "token-top1-s21" / "merge" / "config.yaml").read_text())
    assert merged["merge"]["routing"] == "token" and merged["merge"]["top_k"] == 1
    assert (tmp_path / "abl" / "routing.md").read_text().count("|") > 10
