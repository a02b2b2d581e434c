"""Merge stage: tiny Llama experts (the session's ``micro_run``'s) -> MoE -> router/expert fine-tune on Ray Train;
the result loads through Auto."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lm_lexicon.config import load_config
from lm_lexicon.pipeline import run_pipeline
from micro_pipeline import link_finished_stages, micro_overrides

pytestmark = pytest.mark.ray


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_merge_then_finetune_trains_only_experts_and_loads_through_auto(tmp_path, micro_run, micro_seed, ray_local):
    link_finished_stages(micro_run["out"], tmp_path, ("data", "partition", "experts"))  # the session's run
    cfg = load_config("configs/tiny.yaml", micro_overrides(tmp_path, micro_seed, "finetune.max_steps=3",
                                                           "finetune.lr=1e-3"))
    res = run_pipeline(cfg, stages=("merge",), log=lambda m: None)["merge"]
    assert not res.reused
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
