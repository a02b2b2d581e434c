"""The reward model on the pretrained seed (lm_lexicon.evaluate.best_of_n.reward.RewardModel.from_seed), on a tiny
random Llama: it reads the policy's own input format, learns a preference, survives save/load exactly, and old MiniLM
directories still load.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from reward_pairs import fluent_vs_shuffled_pairs as _pairs

from lm_lexicon.evaluate.best_of_n.reward import RewardModel, pairwise_accuracy
from lm_lexicon.train import encode_example

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    from lm_lexicon.seed_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny_seed") / "seed")


@pytest.fixture(scope="module")
def trained(seed_dir):
    model = RewardModel.from_seed(str(seed_dir), max_length=48, seed=0)
    valid = _pairs(32, seed=1)
    before = pairwise_accuracy(model, valid)
    metrics = model.train(_pairs(64, seed=0), epochs=3, lr=3e-3, batch_size=8, seed=0, valid_pairs=valid)
    return model, metrics, valid, before


def test_seed_reward_model_learns_to_prefer_the_better_definition(trained):
    model, metrics, valid, before = trained
    assert model.backbone == "seed" and model.config["pooling"] == "last"
    assert metrics["steps"] == 3 * 8 and metrics["epoch_loss"][-1] < metrics["epoch_loss"][0]
    accuracy = pairwise_accuracy(model, valid)  # held-out pairs
    assert accuracy > 0.8 and accuracy > before
    assert metrics["valid_accuracy"][-1] == accuracy


def test_seed_input_is_the_policys_training_format(seed_dir):
    model = RewardModel.from_seed(str(seed_dir), max_length=16, seed=0)
    tok = model.tokenizer
    prompt, definition = 'What is the definition of "bank"?', "land beside a river"
    short = model._encode([prompt, "p"], [definition, "x"])
    expected = encode_example(tok, prompt, definition, max_length=16)["input_ids"]
    assert short["input_ids"][0].tolist() == expected and expected[-1] == tok.eos_token_id
    # right padding: the second row is [BOS] p x EOS then padding, masked
    n = int(short["attention_mask"][1].sum())
    assert short["attention_mask"][1].tolist() == [1] * n + [0] * (len(expected) - n)
    assert short["input_ids"][1, n - 1].item() == tok.eos_token_id
    # over max_length the prompt loses its first tokens; BOS, the definition and EOS stay
    long_prompt = "context " * 30 + prompt
    ids = model._encode([long_prompt], [definition])["input_ids"][0].tolist()
    full = encode_example(tok, long_prompt, definition, max_length=10_000)["input_ids"]
    assert len(ids) == 16 and ids[0] == full[0] == tok.cls_token_id and ids[1:] == full[len(full) - 15:]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[-5:-1]) == definition  # 4 word pieces
    # the head reads the prompt too: the same definition scores differently under another prompt
    a, b = model.score([prompt, 'What is the definition of "river"?'], [definition, definition])
    assert abs(a - b) > 1e-6


def test_seed_scores_do_not_depend_on_the_batch(trained):
    model, _, valid, _ = trained
    prompts = [p.prompt for p in valid[:6]] + ["a much longer prompt " * 4]
    defs = [p.chosen for p in valid[:6]] + ["x"]
    batched = model.score(prompts, defs)
    one_by_one = np.array([model.score([p], [d])[0] for p, d in zip(prompts, defs)])
    np.testing.assert_allclose(one_by_one, batched, rtol=1e-4, atol=1e-5)  # padding is masked and never pooled


def test_seed_save_load_round_trip_gives_identical_scores(trained, tmp_path):
    model, metrics, valid, _ = trained
    out = model.save(tmp_path / "rm")
    assert sorted(p.name for p in out.iterdir()) == ["encoder", "model.safetensors", "reward_config.json", "tokenizer"]
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    cfg = json.loads((out / "reward_config.json").read_text())
    assert cfg["backbone"] == "seed" and cfg["pooling"] == "last" and cfg["history"][-1]["steps"] == metrics["steps"]
    loaded = RewardModel.load(out)
    assert loaded.backbone == "seed" and loaded.net.pooling == "last"
    prompts = [p.prompt for p in valid] * 2
    defs = [p.chosen for p in valid] + [p.rejected for p in valid]
    np.testing.assert_array_equal(loaded.score(prompts, defs), model.score(prompts, defs))  # the same computation


def test_a_reward_model_saved_before_backbones_loads_as_minilm_mean_pooling(tmp_path):
    model = RewardModel.from_encoder("bundled-minilm", num_hidden_layers=1, max_length=32, seed=0)
    out = model.save(tmp_path / "old")
    cfg = json.loads((out / "reward_config.json").read_text())
    for key in ("backbone", "seed_model", "attn_implementation"):  # what the previous format did not write
        cfg.pop(key, None)
    (out / "reward_config.json").write_text(json.dumps(cfg))
    loaded = RewardModel.load(out)
    assert loaded.backbone == "encoder" and loaded.net.pooling == "mean"
    prompts, defs = ["What is the definition of \"bank\"?"] * 2, ["land beside a river", "a place for money"]
    np.testing.assert_array_equal(loaded.score(prompts, defs), model.score(prompts, defs))
    cfg["backbone"] = "decoder"
    (out / "reward_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="backbone"):
        RewardModel.load(out)


def test_reward_config_backbone_validation():
    from pydantic import ValidationError

    from lm_lexicon.config import RewardConfig

    assert RewardConfig().backbone == "encoder"
    assert RewardConfig(backbone="seed", precision="bf16").backbone == "seed"
    with pytest.raises(ValidationError, match="num_hidden_layers"):
        RewardConfig(backbone="seed", num_hidden_layers=1)
    with pytest.raises(ValidationError):
        RewardConfig(backbone="decoder")
