"""Evaluate + export stages end to end on a micro run (tiny Llama seed): every model gets a row, the MoE is scored
with the partition's domains, the report and predictions are written, and the collapsed export loads with plain
transformers."""
import json

import pytest

from lm_lexicon.config import load_config
from lm_lexicon.pipeline import run_pipeline

pytestmark = pytest.mark.ray


def test_micro_pipeline_through_evaluate_and_export(tmp_path, ray_local):
    from lm_lexicon.seed_models import tiny_llama

    seed = tiny_llama(tmp_path / "seed")
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"resources.storage_path={tmp_path}/ray", f"seed_model.name={seed}",
        "data.max_train_rows=48", "data.max_valid_rows=16", "data.max_test_rows=12", "partition.n_experts=2",
        "partition.plot_sample=40", "train.max_steps=2", "train.eval_every=2", "train.batch_size=4",
        "train.precision=fp32", "finetune.max_steps=2", "finetune.batch_size=4", "evaluate.max_rows=8",
        "evaluate.max_new_tokens=6", "evaluate.metrics=[bleu_a, sacrebleu, rouge_l, exact_match, length]",
        "evaluate.baselines=[constant, seed, dense]"])
    results = run_pipeline(cfg, log=lambda m: None)
    ev = results["evaluate"].path
    metrics = json.loads((ev / "metrics.json").read_text())["results"]
    assert list(metrics) == ["constant", "seed", "dense", "moe"]
    for model, res in metrics.items():
        assert set(res) == {"bleu_a", "sacrebleu", "rouge_l", "exact_match", "length"}
        assert res["bleu_a"]["n"] == 8 and res["bleu_a"]["value"] is not None
    assert metrics["constant"]["length"]["std"] == 0.0  # the same string for every row
    moe_rows = [json.loads(line) for line in (ev / "predictions" / "moe.jsonl").open()]
    assert len(moe_rows) == 8 and all(r["domain"] in (0, 1) and r["model"] == "moe" for r in moe_rows)
    report = (ev / "report.md").read_text()
    assert "| moe |" in report and "By domain" in report and (ev / "metrics.png").stat().st_size > 1000

    exported = json.loads((results["export"].path / "export.json").read_text())
    assert exported["routing"] == "domain"
    from transformers import AutoModelForCausalLM

    dense_0 = AutoModelForCausalLM.from_pretrained(results["export"].path / "collapsed" / "domain-0")
    assert type(dense_0).__name__ == "LlamaForCausalLM"
