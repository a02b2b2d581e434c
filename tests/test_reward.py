"""Best-of-N (lm_lexicon.evaluate.best_of_n.reward): preference pairs, the pairwise-loss reward model, selection, the
BoN curve.

The reward model runs on the bundled MiniLM cut to 2 layers, on a separable toy set: gold definitions follow one
pattern ("a <adj> <noun> <relation> <object>"), negatives are the same words shuffled.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lm_lexicon.data.records import Record
from lm_lexicon.metrics import sentence_bleu_a
from lm_lexicon.evaluate.best_of_n.reward import (PreferencePair, RewardModel, best_of_n, bon_curve,
                                                  build_preference_pairs, balance_lengths, build_ranked_sample_pairs,
                                                  length_matched, oracle_best_of_n, pairwise_accuracy, plot_bon_curve,
                                                  shorter_wins_accuracy, word_count)
from lm_lexicon.train import record_prompt

ADJ = ["small", "large", "red", "wooden", "quiet", "bright", "old", "sharp", "soft", "heavy", "cold", "round"]
NOUN = ["animal", "tool", "building", "plant", "machine", "container", "vehicle", "garment", "instrument", "bird"]
REL = ["used for", "found in", "made of", "kept in", "known for", "grown in"]
OBJ = ["cutting wood", "the forest", "metal", "the kitchen", "its song", "warm climates", "carrying water"]


# one torch thread: another process may hold the other core (two OpenMP threads then wait on each other)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy(n: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        gold = f"a {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(REL)} {rng.choice(OBJ)}"
        words = gold.split()
        while " ".join(words) == gold:
            rng.shuffle(words)
        pairs.append(PreferencePair(f'"seen in context {seed}-{i}" What is the definition of "term{i}"?', gold,
                                    " ".join(words), i))
    return pairs


@pytest.fixture(scope="module")
def trained():
    model = RewardModel.from_encoder("bundled-minilm", num_hidden_layers=2, max_length=64, seed=0)
    valid = _toy(32, seed=1)
    before = pairwise_accuracy(model, valid)
    metrics = model.train(_toy(48, seed=0), epochs=4, lr=1e-4, batch_size=8, seed=0, valid_pairs=valid)
    return model, metrics, valid, before


# =================================================================================================== reward model
def test_reward_model_learns_a_separable_preference(trained):
    model, metrics, valid, before = trained
    assert metrics["epoch_loss"][-1] < metrics["epoch_loss"][0]
    assert metrics["steps"] == 4 * 6 and len(metrics["valid_accuracy"]) == 4
    accuracy = pairwise_accuracy(model, valid)  # held-out pairs
    assert accuracy > 0.8 and accuracy >= before
    assert metrics["valid_accuracy"][-1] == accuracy


def test_scores_are_deterministic_and_in_input_order(trained):
    model, _, valid, _ = trained
    prompts = [p.prompt for p in valid[:6]]
    defs = [p.chosen for p in valid[:6]]
    a = model.score(prompts, defs)
    assert a.dtype == np.float32 and a.shape == (6,)
    np.testing.assert_array_equal(model.score(prompts, defs), a)
    one_by_one = np.array([model.score([p], [d])[0] for p, d in zip(prompts, defs)])
    np.testing.assert_allclose(one_by_one, a, rtol=1e-4, atol=1e-5)
    nested = model.score_candidates(prompts[:2], [defs[:3], defs[3:4]])
    assert [len(s) for s in nested] == [3, 1]
    np.testing.assert_allclose(nested[0], model.score([prompts[0]] * 3, defs[:3]), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path):
    model, metrics, valid, _ = trained
    out = model.save(tmp_path / "rm")
    assert sorted(p.name for p in out.iterdir()) == ["encoder", "model.safetensors", "reward_config.json", "tokenizer"]
    pickled = [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not pickled
    cfg = json.loads((out / "reward_config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["history"][-1]["epoch_loss"] == metrics["epoch_loss"]
    loaded = RewardModel.load(out)
    prompts = [p.prompt for p in valid] * 2
    defs = [p.chosen for p in valid] + [p.rejected for p in valid]
    np.testing.assert_array_equal(loaded.score(prompts, defs), model.score(prompts, defs))


def test_load_rejects_a_foreign_directory(tmp_path):
    (tmp_path / "reward_config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format"):
        RewardModel.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        RewardModel.load(tmp_path / "missing")


# =================================================================================================== preference data
def test_build_preference_pairs_keeps_the_most_likely_non_gold_samples():
    records = [Record(term="bank", context="the river bank", definition="Sloping land beside water.", source="t"),
               Record(term="bat", context="", definition="a club", source="t")]
    samples = [["sloping land beside water", "a money place", "a money place", "the side", "", "a seat"],
               ["A club."]]
    logprobs = [[-1.0, -5.0, -4.0, -2.0, -0.5, -3.0], [-1.0]]
    pairs = build_preference_pairs(records, samples, logprobs, top_k=2)
    # gold-equal (case, period) and empty samples skipped; duplicates once, with their best log-prob
    assert [p.rejected for p in pairs] == ["the side", "a seat"]
    assert all(p.chosen == records[0].definition and p.prompt == record_prompt(records[0]) for p in pairs)
    assert {p.index for p in pairs} == {0}
    by_order = build_preference_pairs(records, samples, top_k=2)  # no log-probs: sample order
    assert [p.rejected for p in by_order] == ["a money place", "the side"]
    every = build_preference_pairs(records, samples, logprobs, top_k=8)
    assert [p.rejected for p in every] == ["the side", "a seat", "a money place"]
    sub = build_preference_pairs(records, samples, logprobs, top_k=8, ratio=1, seed=3)
    assert len(sub) == 1 and sub[0].rejected in {"the side", "a seat", "a money place"}
    assert sub == build_preference_pairs(records, samples, logprobs, top_k=8, ratio=1, seed=3)
    with pytest.raises(ValueError, match="sample lists"):
        build_preference_pairs(records, samples[:1])


def test_ranked_sample_pairs_prefer_the_sample_closer_to_the_references():
    records = [Record(term="t", context="", definition="a b c d", source="t"),
               Record(term="u", context="", definition="e f", source="t")]
    # Protocol A vs "a b c d": "a b c d" 1.0; "a b c x" (0.8*0.75*(2/3)*0.5)^(1/4) = 0.6687;
    # "q r s t" (1/5*1/4*1/3*1/2)^(1/4) = 0.3021; "a b c d." is "a b c d" again; "" is dropped
    samples = [["a b c x", "a b c d", "q r s t", "a b c d.", ""], ["e f", "E F."]]  # record 1: one distinct sample
    references = [["a b c d"], ["e f"]]
    pairs = build_ranked_sample_pairs(records, samples, references, per_record=8, margin=0.05)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a b c x", "q r s t"), ("a b c d", "a b c x"),
                                                       ("a b c d", "q r s t")]
    assert all(p.index == 0 and p.prompt == record_prompt(records[0]) for p in pairs)
    wide = build_ranked_sample_pairs(records, samples, references, per_record=8, margin=0.35)  # gaps .331/.367/.698
    assert [(p.chosen, p.rejected) for p in wide] == [("a b c x", "q r s t"), ("a b c d", "q r s t")]
    two = build_ranked_sample_pairs(records, samples, references, per_record=2, margin=0.05, seed=5)
    assert len(two) == 2 and set(two) <= set(pairs)
    assert two == build_ranked_sample_pairs(records, samples, references, per_record=2, margin=0.05, seed=5)
    assert build_ranked_sample_pairs(records, samples, references, per_record=0) == []
    with pytest.raises(ValueError, match="reference lists"):
        build_ranked_sample_pairs(records, samples, references[:1])
    with pytest.raises(ValueError, match="margin"):
        build_ranked_sample_pairs(records, samples, references, margin=1.0)


def test_ranked_sample_pairs_count_the_ties_and_near_ties_they_drop():
    records = [Record(term="t", context="", definition="a b c d", source="t"),
               Record(term="u", context="", definition="e f", source="t")]
    # BLEU vs "a b c d": "a b c d" 1.0, "a b c x" = "a b c y" 0.6687 (a tie), "q r s t" 0.3021. Of the 6 pairs of
    # distinct samples at margin 0.35: x/y tie (gap 0), d/x and d/y near ties (.331), x/q, y/q (.367), d/q (.698) kept
    samples = [["a b c x", "a b c d", "q r s t", "a b c y"], ["e f"]]
    pairs = build_ranked_sample_pairs(records, samples, [["a b c d"], ["e f"]], per_record=2, margin=0.35, seed=0)
    assert pairs.stats == {"margin": 0.35, "records": 2, "records_without_two_samples": 1, "sample_pairs": 6,
                           "ties": 1, "near_ties": 2, "eligible": 3, "drawn": 2}
    assert len(pairs) == 2 and all(p.rejected == "q r s t" or p.chosen == "a b c d" for p in pairs)
    loose = build_ranked_sample_pairs(records, samples, [["a b c d"], ["e f"]], per_record=8, margin=0.05)
    assert (loose.stats["ties"], loose.stats["near_ties"], loose.stats["eligible"], len(loose)) == (1, 0, 5, 5)


def test_accuracy_within_length_matched_pairs():
    pairs = [PreferencePair("p", "a b c", "a b c d e", 0),   # chosen 2 words shorter
             PreferencePair("p", "a b c d", "x y z", 1),     # chosen 1 word longer
             PreferencePair("p", "one two", "three four", 2),  # same length
             PreferencePair("p", "k l m.", "n o p", 3)]      # same length once the period is stripped
    assert [word_count(p.chosen) for p in pairs] == [3, 4, 2, 3]
    assert length_matched(pairs) == pairs[2:]
    assert length_matched(pairs, max_gap=1) == pairs[1:]
    assert shorter_wins_accuracy(pairs) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)

    class PrefersShort:  # a reward model that has learned length and nothing else
        def score(self, prompts, definitions, batch_size=64):
            return -np.array([word_count(d) for d in definitions], dtype=np.float32)

    assert pairwise_accuracy(PrefersShort(), pairs) == 0.25  # right only where the chosen one is shorter
    assert pairwise_accuracy(PrefersShort(), length_matched(pairs)) == 0.0  # length ties count as wrong
    with pytest.raises(ValueError, match="max_gap"):
        length_matched(pairs, max_gap=-1)


def test_length_balanced_pairs_prefer_the_shorter_as_often_as_the_longer():
    shorter = [PreferencePair("p", "a b", f"a b c {i}", i) for i in range(5)]  # the preferred one is shorter
    longer = [PreferencePair("p", f"a b c {i}", "a b", 10 + i) for i in range(2)]
    level = [PreferencePair("p", "a b", "c d", 20)]
    pairs = shorter[:3] + level + longer + shorter[3:]
    balanced, dropped = balance_lengths(pairs, seed=1)
    assert dropped == 3 and len(balanced) == 5 and shorter_wins_accuracy(balanced) == 0.5
    assert level[0] in balanced and all(p in balanced for p in longer)  # the minority and the level pairs all stay
    assert balanced == [p for p in pairs if p in balanced]  # original order kept
    assert balanced == balance_lengths(pairs, seed=1)[0] and balance_lengths(level, seed=0) == (level, 0)


# =================================================================================================== selection
def test_best_of_n_picks_the_argmax():
    candidates = [["a", "b", "c"], ["d", "e"]]
    assert best_of_n(candidates, [[0.1, 0.9, 0.5], [2.0, -1.0]]) == ["b", "d"]
    assert best_of_n([["x", "y"]], [[1.0, 1.0]]) == ["x"]  # tie: the first
    with pytest.raises(ValueError):
        best_of_n(candidates, [[0.1, 0.2], [1.0, 2.0]])


def test_oracle_picks_the_best_bleu():
    refs = [["a large animal that lives in the sea", "a big sea mammal"], "a tool for cutting wood"]
    candidates = [["a small bird", "a large animal in the sea", "a large animal that lives in the sea ."],
                  ["a red stone", "a tool for wood", "cutting wood"]]
    picked = oracle_best_of_n(candidates, refs)
    for cs, r, p in zip(candidates, refs, picked):
        scores = [sentence_bleu_a(c, [r] if isinstance(r, str) else r) for c in cs]
        assert p == cs[int(np.argmax(scores))]
    assert picked[0] == "a large animal that lives in the sea ."  # exact match once the period is stripped
    length = oracle_best_of_n(candidates, refs, metric=lambda h, rs: len(h))
    assert length == ["a large animal that lives in the sea .", "a tool for wood"]


def test_bon_curve_and_plot(tmp_path, trained):
    rng = random.Random(0)
    refs = [f"a {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(REL)} {rng.choice(OBJ)}" for _ in range(6)]
    candidates = [[f"a {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(REL)} {rng.choice(OBJ)}" for _ in range(8)]
                  for _ in refs]
    oracle = bon_curve(candidates, refs, "oracle", ns=(1, 2, 4, 8, 16))
    assert list(oracle) == [1, 2, 4, 8]  # N above the available 8 is left out
    assert all(a <= b for a, b in zip(list(oracle.values()), list(oracle.values())[1:]))  # nested prefixes
    first = bon_curve(candidates, refs, "first", ns=(1, 2, 4, 8))
    assert len(set(first.values())) == 1 and first[1] == oracle[1]
    assert first[1] == pytest.approx(100 * np.mean([sentence_bleu_a(c[0], [r]) for c, r in zip(candidates, refs)]))
    model = trained[0]
    prompts = [f'What is the definition of "t{i}"?' for i in range(len(refs))]
    rm = bon_curve(candidates, refs, model.score_candidates(prompts, candidates), ns=(1, 2, 4, 8))
    assert rm[1] == oracle[1] and all(rm[n] <= oracle[n] + 1e-9 for n in rm)
    path = plot_bon_curve({"oracle (upper bound)": oracle, "reward model": rm, "first sample": first},
                          tmp_path / "bon.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = plot_bon_curve(oracle, tmp_path / "single.png")
    assert single.stat().st_size > 1000
