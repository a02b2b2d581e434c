"""Merge stage: tiny Llama experts -> MoE -> router/expert fine-tune on Ray Train; the result loads through Auto."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lm_lexicon.config import load_config
from lm_lexicon.pipeline import run_pipeline

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory):
    from lm_lexicon.seed_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("seed") / "tiny-llama")


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_merge_then_finetune_trains_only_experts_and_loads_through_auto(tmp_path, tiny_seed, ray_local):
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path}", f"resources.storage_path={tmp_path}/ray", f"seed_model.name={tiny_seed}",
        "data.max_train_rows=48", "data.max_valid_rows=16", "data.max_test_rows=8", "partition.n_experts=2",
        "partition.plot_sample=40", "train.max_steps=2", "train.eval_every=2", "train.batch_size=4",
        "train.precision=fp32", "train.lr=1e-3", "finetune.max_steps=3", "finetune.lr=1e-3",
        "finetune.batch_size=4"])
    res = run_pipeline(cfg, stages=("merge",), log=lambda m: None)["merge"]
    summary = json.loads((res.path / "merge.json").read_text())
    assert summary["routing"] == "domain" and summary["n_experts"] == 2
    ft = summary["finetune"]
    assert ft["steps"] == 3 and ft["trainable_parameters"] > 0
    assert ft["torch_threads"] == 2  # alone on the 2-CPU local Ray, the fine-tune takes both (an expert job takes 1)
    merged, tuned = _tensors(res.path / "merged"), _tensors(res.path / "model")
    assert merged.keys() == tuned.keys()
    expert_keys = [k for k in merged if ".experts." in k]
    frozen_keys = [k for k in merged if "self_attn" in k or "embed_tokens" in k or "norm" in k]
    assert expert_keys and frozen_keys
    assert any(not torch.equal(merged[k], tuned[k]) for k in expert_keys)
    assert all(torch.equal(merged[k], tuned[k]) for k in frozen_keys)
    assert (res.path / "model" / "router" / "router.json").exists()
    # the fine-tune trains on, and saves beside its model, the merged model's templates
    from lm_lexicon.data.prompts import TEMPLATES_FILE, PromptTemplates

    assert (res.path / "model" / TEMPLATES_FILE).exists()
    assert PromptTemplates.load(res.path / "model") == PromptTemplates.load(res.path / "merged")

    import lm_lexicon  # noqa: F401  (registers the MoE with the Auto classes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(res.path / "model")
    assert type(model).__name__ == "LexiconMoEForCausalLM"
    from lm_lexicon.moe import load

    loaded = load(res.path / "model")
    assert loaded.router is not None and loaded.router.n_clusters == 2


def test_the_finetune_takes_every_cpu_of_one_cpu_node_only():
    from lm_lexicon.moe.stage import finetune_torch_threads

    laptop = load_config("configs/tiny.yaml").resources  # cpus_per_worker 1, one worker
    assert finetune_torch_threads(laptop, node_cpus=2.0, nodes=1) == 2
    assert finetune_torch_threads(laptop, node_cpus=0.5, nodes=1) == 1  # never under the recipe's reservation
    assert finetune_torch_threads(laptop, node_cpus=64.0, nodes=3) == 1  # a cluster: the recipe decides
    two_workers = laptop.model_copy(update={"workers_per_expert": 2})
    assert finetune_torch_threads(two_workers, node_cpus=8.0, nodes=1) == 4
    gpu = load_config("configs/llama3-8b-3dex.yaml").resources
    assert finetune_torch_threads(gpu, node_cpus=256.0, nodes=1) == int(gpu.cpus_per_worker)
