"""The reward model that starts from the policy (lm_lexicon.evaluate.best_of_n.reward.RewardModel.from_policy), on tiny
Llamas: untrained it scores a definition by its mean token log-probability, it learns a preference, tied weights are
saved once and a save/load round trip gives identical scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
from reward_pairs import fluent_vs_shuffled_pairs as _pairs

from lm_lexicon.evaluate.best_of_n.reward import RewardModel, pairwise_accuracy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from lm_lexicon.seed_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny_policy") / "policy")


@pytest.fixture(scope="module")
def tied_policy_dir(policy_dir, tmp_path_factory):
    """The tiny Llama with its LM head tied to the embeddings, as SmolLM2's is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(policy_dir), local_files_only=True)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    out = tmp_path_factory.mktemp("tied_policy") / "policy"
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(policy_dir), local_files_only=True).save_pretrained(str(out))
    return out


def test_untrained_score_is_beta_times_the_mean_token_log_probability(policy_dir):
    from lm_lexicon.evaluate.generate import DefinitionGenerator
    from lm_lexicon.train import encode_example

    model = RewardModel.from_policy(policy_dir, max_length=64, beta=2.0)
    pairs = _pairs(6, seed=3)
    prompts, defs = [p.prompt for p in pairs], [p.chosen for p in pairs]
    generator = DefinitionGenerator(policy_dir, torch_threads=1)
    total = np.array(generator.sequence_logprobs(prompts, defs))  # sum over the definition's tokens and EOS
    n_scored = np.array([sum(t != -100 for t in encode_example(model.tokenizer, p, d, 64)["labels"])
                         for p, d in zip(prompts, defs)])
    np.testing.assert_allclose(model.score(prompts, defs), 2.0 * total / n_scored, rtol=1e-4, atol=1e-4)
    assert model.backbone == "policy" and "policy" in repr(model)


def test_policy_reward_model_learns_a_preference_and_round_trips(tied_policy_dir, tmp_path):
    model = RewardModel.from_policy(tied_policy_dir, max_length=48)
    valid = _pairs(32, seed=1)
    before = pairwise_accuracy(model, valid)
    metrics = model.train(_pairs(64, seed=0), epochs=3, lr=3e-3, batch_size=8, seed=0)
    after = pairwise_accuracy(model, valid)
    assert metrics["epoch_loss"][-1] < metrics["epoch_loss"][0] and after > 0.8 and after > before
    out = model.save(tmp_path / "rm")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "encoder.model.embed_tokens.weight" in names and "encoder.lm_head.weight" not in names  # tied: once
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert json.loads((out / "reward_config.json").read_text())["backbone"] == "policy"
    loaded = RewardModel.load(out)
    prompts = [p.prompt for p in valid] * 2
    defs = [p.chosen for p in valid] + [p.rejected for p in valid]
    np.testing.assert_array_equal(loaded.score(prompts, defs), model.score(prompts, defs))  # the same computation


def test_policy_backbone_needs_the_dense_model():
    from pydantic import ValidationError

    from lm_lexicon.evaluate.best_of_n.steps import new_reward_model
    from lm_lexicon.config import RewardConfig

    with pytest.raises(ValueError, match="dense_baseline"):
        new_reward_model(RewardConfig(backbone="policy"))
    with pytest.raises(ValidationError, match="num_hidden_layers"):
        RewardConfig(backbone="policy", num_hidden_layers=1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        RewardModel.from_policy("/nonexistent/policy")
