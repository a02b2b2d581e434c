import json
import sys

import pytest

from lm_lexicon.config import load_config
from lm_lexicon.distributed import expert_resources, resolve_deepspeed_config


def test_paper_recipe_fills_zero3_autos_from_table_12():
    cfg = load_config("configs/llama3-8b-3dex.yaml")
    ds = resolve_deepspeed_config(cfg.train.deepspeed, cfg.train, world_size=8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 8 * 8 * 8
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"] == {"lr": 5e-6, "betas": [0.9, 0.95], "weight_decay": 0.01}
    assert "auto" not in json.dumps(ds)


def test_explicit_values_must_agree_with_the_recipe(tmp_path):
    cfg = load_config("configs/llama3-8b-3dex.yaml")
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="train_batch_size=7 contradicts the recipe"):
        resolve_deepspeed_config(bad, cfg.train, world_size=8)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(ValueError, match="stage must be 0..3"):
        resolve_deepspeed_config(bad, cfg.train, world_size=8)
    with pytest.raises(FileNotFoundError):
        resolve_deepspeed_config(tmp_path / "none.json", cfg.train, 1)


def test_gpu_recipe_resources():
    r = expert_resources(load_config("configs/llama3-8b-3dex.yaml").resources)
    assert r["workers"] == 8 and r["per_worker"] == {"CPU": 8, "GPU": 1} and r["total"] == {"CPU": 64, "GPU": 8}
    cpu = expert_resources(load_config("configs/tiny.yaml").resources)
    assert cpu["total"] == {"CPU": 1}


def test_cpu_path_never_imports_deepspeed():
    import lm_lexicon.sft  # noqa: F401
    import lm_lexicon.stages.experts  # noqa: F401

    assert "deepspeed" not in sys.modules
