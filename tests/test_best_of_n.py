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
    cfg = RewardConfig(epochs=3, lr=1e-4, batch_size=8, top_k=2, max_length=48, num_hidden_layers=2, sample_pairs=0)
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


def _damaged_set(n: int, seed: int) -> SampledSet:
    """Samples are the gold with 0-3 of its words replaced by filler: the more replaced, the lower the BLEU."""
    rng = random.Random(seed)
    records, samples, refs = [], [], []
    for i in range(n):
        gold = f"a {rng.choice(ADJ)} {rng.choice(NOUN)} used for {rng.choice(NOUN)}s".split()
        damaged = []
        for k in (0, 1, 2, 3):
            words = list(gold)
            for j in rng.sample(range(1, len(words)), k):
                words[j] = rng.choice(["zq", "xv", "wk", "jj"])
            damaged.append(" ".join(words))
        rng.shuffle(damaged)
        records.append(Record(term=f"term{seed}-{i}", definition=" ".join(gold), context=f"seen {i}", source="toy"))
        samples.append(damaged)
        refs.append([" ".join(gold)])
    return SampledSet(records, None, samples, [[0.0] * 4 for _ in samples], refs)


def test_ranked_sample_pairs_teach_the_reward_model_to_rank_samples():
    cfg = RewardConfig(epochs=3, lr=1e-4, batch_size=8, top_k=1, max_length=48, num_hidden_layers=2,
                       sample_pairs=3, sample_margin=0.05)
    model, report = train_outcome_reward_model(_damaged_set(48, 0), _damaged_set(16, 1), cfg, log=lambda m: None)
    assert report["train_sample_pairs"] == 48 * 3 and report["valid_sample_pairs"] == 16 * 3
    assert report["train_pairs"] == report["train_gold_pairs"] + report["train_sample_pairs"]
    assert report["valid_accuracy_samples"] > 0.8
    assert report["valid_accuracy_samples"] > report["valid_accuracy_samples_untrained"]
    with pytest.raises(ValueError, match="references"):
        train_outcome_reward_model(_set(4, 0), _set(4, 1), cfg, log=lambda m: None)


def test_no_pairs_is_an_error():
    same = SampledSet([Record(term="t", definition="d", context=None, source="toy")], None, [["d", "d."]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="no preference pairs"):
        train_outcome_reward_model(same, same, RewardConfig(num_hidden_layers=1, sample_pairs=0), log=lambda m: None)
