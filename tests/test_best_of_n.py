"""Best-of-N as the evaluate stage runs it (lm_lexicon.best_of_n): the reward model trained on (gold, sample) pairs
beats chance on held-out records, and reranking yields the three curves that agree at N = 1."""
from __future__ import annotations

import random

import pytest

from lm_lexicon.best_of_n import SampledSet, curve_table, rerank, train_outcome_reward_model
from lm_lexicon.config import RewardConfig
from lm_lexicon.data.records import Record

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADJ = ["small", "large", "wooden", "bright", "quiet", "sharp", "round", "heavy"]
NOUN = ["tool", "animal", "vessel", "building", "instrument", "plant", "device", "garment"]


def _set(n: int, seed: int) -> SampledSet:
    """Gold definitions are fluent; samples are the gold's words shuffled (plus one copy of the gold: not a negative)."""
    rng = random.Random(seed)
    records, samples, logprobs = [], [], []
    for i in range(n):
        gold = f"a {rng.choice(ADJ)} {rng.choice(NOUN)} used for {rng.choice(NOUN)}s"
        shuffled = []
        while len(shuffled) < 3:
            words = gold.split()
            rng.shuffle(words)
            if " ".join(words) != gold:
                shuffled.append(" ".join(words))
        records.append(Record(term=f"term{seed}-{i}", definition=gold, context=f"seen {i}", source="toy"))
        samples.append(shuffled + [gold])
        logprobs.append([-1.0, -2.0, -3.0, -0.5])
    return SampledSet(records, None, samples, logprobs)


def test_reward_model_beats_chance_on_held_out_records():
    cfg = RewardConfig(epochs=3, lr=1e-4, batch_size=8, top_k=2, max_length=48, num_hidden_layers=2)
    model, report = train_outcome_reward_model(_set(32, 0), _set(16, 1), cfg, log=lambda m: None)
    assert report["train_pairs"] == 32 * 2  # top_k=2 of the 3 negatives; the gold copy is never a negative
    assert report["valid_pairs"] == 16 * 2
    assert report["valid_accuracy"] > 0.8 and report["valid_accuracy"] > report["valid_accuracy_untrained"]
    assert report["loss_last"] < report["loss_first"]

    records = _set(6, 2)
    prompts = [f"prompt {i}" for i in range(6)]
    references = [[r.definition] for r in records.records]
    result = rerank(model, prompts, records.samples, references, ns=[1, 2, 4, 8])
    curves = result["curves"]
    assert result["n"] == 4 and set(curves["reward model"]) == {1, 2, 4}  # N=8 > 4 samples: left out
    assert curves["reward model"][1] == curves["oracle (upper bound)"][1] == curves["no selection (sample 1)"][1]
    assert curves["oracle (upper bound)"][4] == pytest.approx(100.0)  # the gold is among the 4 candidates
    assert all(curves["oracle (upper bound)"][n] >= curves["reward model"][n] for n in (1, 2, 4))
    assert len(result["picks"]) == 6 and all(p in c for p, c in zip(result["picks"], records.samples))
    assert "| reward model |" in curve_table(curves) and "N=4" in curve_table(curves)


def test_no_pairs_is_an_error():
    same = SampledSet([Record(term="t", definition="d", context=None, source="toy")], None, [["d", "d."]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="no preference pairs"):
        train_outcome_reward_model(same, same, RewardConfig(num_hidden_layers=1), log=lambda m: None)
