"""Evaluate + export stages end to end on a micro run (tiny Llama seed; the upstream stages are the session's
``micro_run``'s): every model gets a row, the MoE is scored with the partition's domains, the report and predictions
are written, and the collapsed export loads with plain transformers."""
import json

import pytest

from lm_lexicon.config import load_config
from lm_lexicon.pipeline import STAGES, run_pipeline
from micro_pipeline import link_finished_stages, micro_overrides

pytestmark = pytest.mark.ray


def test_micro_pipeline_through_evaluate_and_export(tmp_path, micro_run, micro_seed, ray_local):
    out = tmp_path / "run"
    link_finished_stages(micro_run["out"], out, ("data", "partition", "experts", "merge"))  # the session's run
    cfg = load_config("configs/tiny.yaml", micro_overrides(
        out, micro_seed, "evaluate.max_rows=8", "evaluate.max_new_tokens=6",
        "evaluate.metrics=[bleu_a, sacrebleu, rouge_l, exact_match, length]",
        "evaluate.baselines=[constant, seed, dense, icl-random, icl-retrieval]", "evaluate.icl_shots=2",
        "evaluate.best_of_n=2", "evaluate.bon_ns=[1, 2, 4]", "evaluate.no_repeat_ngram_size=2",
        "evaluate.reward.train_rows=8", "evaluate.reward.valid_rows=6", "evaluate.reward.samples=2",
        "evaluate.reward.backbone=seed", "evaluate.reward.max_length=48", "evaluate.misrouted=true"))
    results = run_pipeline(cfg, log=lambda m: None)
    assert [s for s in STAGES if results[s].reused] == ["data", "partition", "experts", "merge"]
    ev = results["evaluate"].path
    metrics = json.loads((ev / "metrics.json").read_text())["results"]
    assert list(metrics) == ["constant", "seed", "dense", "icl-random", "icl-retrieval", "moe", "moe:misrouted",
                             "moe:sample", "moe:bon-orm-n2", "moe:oracle-n2"]
    for model, res in metrics.items():
        assert set(res) == {"bleu_a", "sacrebleu", "rouge_l", "exact_match", "length"}
        assert res["bleu_a"]["n"] == 8 and res["bleu_a"]["value"] is not None
    assert metrics["constant"]["length"]["std"] == 0.0  # the same string for every row
    moe_rows = [json.loads(line) for line in (ev / "predictions" / "moe.jsonl").open()]
    assert len(moe_rows) == 8 and all(r["domain"] in (0, 1) and r["model"] == "moe" for r in moe_rows)
    icl = [json.loads(line) for line in (ev / "predictions" / "icl-retrieval.jsonl").open()]
    assert len(icl) == 8 and all(r["model"] == "icl-retrieval" for r in icl)

    # Best-of-N: reward model saved, curves for N in bon_ns up to best_of_n, all rules equal at N = 1
    bon = json.loads((ev / "bon.json").read_text())
    assert bon["n"] == 2 and bon["ns"] == [1, 2] and (ev / "bon.png").stat().st_size > 1000
    curves = bon["curves"]
    assert curves["reward model"]["1"] == curves["oracle (upper bound)"]["1"] == curves["no selection (sample 1)"]["1"]
    assert curves["oracle (upper bound)"]["2"] >= curves["reward model"]["2"]
    assert 0.0 <= bon["reward_model"]["valid_accuracy"] <= 1.0 and bon["reward_model"]["train_pairs"] > 0
    samples = [json.loads(line) for line in (ev / "predictions" / "moe-samples.jsonl").open()]
    picked = [json.loads(line) for line in (ev / "predictions" / "moe:bon-orm-n2.jsonl").open()]
    assert all(len(s["predictions"]) == 2 and p["prediction"] in s["predictions"] for s, p in zip(samples, picked))
    from lm_lexicon.evaluate.best_of_n.reward import RewardModel

    reward_model = RewardModel.load(ev / "reward_model")  # on the seed (evaluate.reward.backbone=seed)
    assert reward_model.backbone == "seed" and reward_model.score(["p"], ["d"]).shape == (1,)
    assert metrics["moe:bon-orm-n2"]["bleu_a"]["value"] == pytest.approx(curves["reward model"]["2"], abs=1e-6)
    # every per-sentence metric of the table gets its curves; at N=2 the reward model's are its row's values
    analysis = bon["analysis"]
    assert set(analysis["metrics"]) == {"bleu_a", "sacrebleu", "rouge_l", "exact_match"}
    for m, res in analysis["metrics"].items():
        assert res["curves"]["reward model"]["2"] == pytest.approx(metrics["moe:bon-orm-n2"][m]["value"], abs=1e-6)
        assert res["curves"]["no selection (sample 1)"]["1"] == pytest.approx(metrics["moe:sample"][m]["value"])
        assert set(res["p_value"]) == {"1", "2"}
    lengths = analysis["pick_length"]
    assert lengths["reward model"]["2"] == pytest.approx(metrics["moe:bon-orm-n2"]["length"]["value"])
    assert json.loads((ev / "metrics.json").read_text())["best_of_n"]["analysis"]["pick_length"] == lengths

    vs_floor = json.loads((ev / "metrics.json").read_text())["vs_floor"]
    assert set(vs_floor) == set(metrics) - {"constant"} and "length" not in vs_floor["moe"]
    for model, by in vs_floor.items():
        for m, c in by.items():
            assert c["delta"] == pytest.approx(metrics[model][m]["value"] - metrics["constant"][m]["value"], abs=1e-6)
            assert 0.0 < c["p_value"] <= 1.0 and c["n"] == 8

    # the routed MoE against itself with every input sent to the other expert
    misrouted = json.loads((ev / "metrics.json").read_text())["misrouted_vs_moe"]
    assert set(misrouted) == {"bleu_a", "sacrebleu", "rouge_l", "exact_match"}
    for m, c in misrouted.items():
        assert c["delta"] == pytest.approx(metrics["moe:misrouted"][m]["value"] - metrics["moe"][m]["value"], abs=1e-6)

    report = (ev / "report.md").read_text()
    assert "## Each input's own expert against another's" in report
    assert "## Against the constant floor" in report
    assert "## Best-of-N (moe)" in report and "held-out pairwise accuracy" in report
    assert "### Best-of-N on every metric" in report and "Mean length of the picks" in report
    assert "| moe |" in report and "By domain" in report and (ev / "metrics.png").stat().st_size > 1000

    exported = json.loads((results["export"].path / "export.json").read_text())
    assert exported["routing"] == "domain"
    assert exported["collapsed"] == str(results["export"].path / "collapsed")  # the final path, not the .partial one
    from transformers import AutoModelForCausalLM

    dense_0 = AutoModelForCausalLM.from_pretrained(results["export"].path / "collapsed" / "domain-0")
    assert type(dense_0).__name__ == "LlamaForCausalLM"


def test_compare_with_floor_gives_paired_differences_and_p_values():
    from lm_lexicon.evaluate.stage import compare_with_floor, render_floor_section

    floor = {"bleu_a": {"per_item": [10.0, 20.0, 30.0, 40.0]}, "length": {"per_item": [3, 3, 3, 3]}}
    better = {"bleu_a": {"per_item": [12.0, 22.0, 32.0, 42.0]}, "length": {"per_item": [7, 8, 6, 9]}}
    same = {"bleu_a": {"per_item": [10.0, 20.0, 30.0, 40.0]}, "rouge_l": {"per_item": [1.0, 2.0, 3.0, 4.0]}}
    out = compare_with_floor({"constant": floor, "dense": better, "moe": same})
    # 4 lines, every difference +2: of the 16 sign flips only all-plus and all-minus reach |mean| 2 -> p = 2/16
    assert out["dense"] == {"bleu_a": {"delta": pytest.approx(2.0), "p_value": pytest.approx(2 / 16), "n": 4}}
    assert out["moe"] == {"bleu_a": {"delta": 0.0, "p_value": 1.0, "n": 4}}  # rouge_l: the floor has none
    assert compare_with_floor({"dense": better}) == {}
    text = render_floor_section(out)
    assert "| dense | +2.00 (0.125) |" in text and "| moe | +0.00 (1.000) |" in text


def test_example_rows_spread_over_the_sample_with_every_models_prediction(tmp_path):
    import json

    from lm_lexicon.evaluate.stage import example_rows

    (tmp_path / "predictions").mkdir()
    for model in ("dense", "moe"):
        rows = [{"term": f"t{i}", "context": f"c{i}" if i % 2 else None, "reference": f"gold {i}",
                 "prediction": f"{model} {i}"} for i in range(10)]
        (tmp_path / "predictions" / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shown = example_rows(tmp_path, k=5)
    assert [r["term"] for r in shown] == ["t0", "t2", "t4", "t7", "t9"]  # first to last, evenly
    assert shown[1] == {"term": "t2", "context": "", "gold": "gold 2", "dense": "dense 2", "moe": "moe 2"}
    assert example_rows(tmp_path, models=("moe",), k=20)[-1] == {"term": "t9", "context": "c9", "gold": "gold 9",
                                                                   "moe": "moe 9"}
    assert example_rows(tmp_path / "nowhere") == []


def test_misrouting_sends_every_input_to_another_expert_and_needs_domain_routing():
    from lm_lexicon.evaluate.stage import misrouted_domains, render_misrouted_section

    assert misrouted_domains([0, 1, 2, 3, 3], 4) == [1, 2, 3, 0, 0]
    assert render_misrouted_section(None) == ""
    text = render_misrouted_section({"bleu_a": {"delta": -1.5, "p_value": 0.01, "n": 4}})
    assert "| -1.50 (0.010) |" in text
    with pytest.raises(ValueError, match="misrouted needs merge.routing=domain"):
        load_config("configs/tiny.yaml", ["evaluate.misrouted=true", "merge.routing=token"])
    with pytest.raises(ValueError, match="at least 2 experts"):
        load_config("configs/tiny.yaml", ["evaluate.misrouted=true", "partition.n_experts=1"])
    assert "misrouted" not in load_config("configs/tiny.yaml").model_dump(mode="json")["evaluate"]  # added later
