"""Best-of-N as the evaluate stage runs it (lm_lexicon.evaluate.best_of_n): the reward model trained on (gold,
sample) pairs beats chance on held-out records, and reranking yields the three curves that agree at N = 1."""
from __future__ import annotations

import random

import pytest

from lm_lexicon.evaluate.best_of_n.report import curve_table
from lm_lexicon.evaluate.best_of_n.steps import LENGTH_CONTROL, SampledSet, rerank, train_outcome_reward_model
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


def test_gold_pairs_off_trains_on_the_ranked_sample_pairs_alone():
    cfg = RewardConfig(epochs=3, lr=1e-4, batch_size=8, top_k=1, max_length=48, num_hidden_layers=2,
                       sample_pairs=3, sample_margin=0.05, gold_pairs=False)
    model, report = train_outcome_reward_model(_damaged_set(48, 0), _damaged_set(16, 1), cfg, log=lambda m: None)
    assert report["train_gold_pairs"] == 0 and report["train_pairs"] == report["train_sample_pairs"] == 48 * 3
    assert report["valid_pairs"] == 16 * 1  # gold-vs-sample accuracy is still measured on held-out records
    assert report["valid_accuracy_samples"] > 0.8
    with pytest.raises(ValueError, match="sample_pairs > 0"):
        RewardConfig(gold_pairs=False, sample_pairs=0)


def test_no_pairs_is_an_error():
    same = SampledSet([Record(term="t", definition="d", context=None, source="toy")], None, [["d", "d."]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="no preference pairs"):
        train_outcome_reward_model(same, same, RewardConfig(num_hidden_layers=1, sample_pairs=0), log=lambda m: None)


# =================================================================================================== seed backbone
@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory):
    from lm_lexicon.seed_models import tiny_llama

    return str(tiny_llama(tmp_path_factory.mktemp("bon_seed") / "seed"))


def test_seed_backbone_ranks_samples_and_reports_length_control(tiny_seed):
    cfg = RewardConfig(backbone="seed", epochs=3, lr=3e-3, batch_size=8, top_k=1, max_length=48, sample_pairs=3,
                       sample_margin=0.05, length_match_gap=0)
    model, report = train_outcome_reward_model(_damaged_set(48, 0), _damaged_set(16, 1), cfg, log=lambda m: None,
                                               seed_model=tiny_seed)
    assert model.backbone == "seed" and report["backbone"] == "seed"
    assert report["train_sample_pairs"] == 48 * 3
    stats = report["train_sample_pair_stats"]  # 4 distinct samples: 6 pairs a record, the 1-word gaps all clear 0.05
    assert stats["sample_pairs"] == 48 * 6 and stats["drawn"] == 48 * 3
    assert stats["ties"] + stats["near_ties"] + stats["eligible"] == stats["sample_pairs"]
    # damage replaces words: both samples of every pair have the gold's length, so every pair is length-matched
    assert report["valid_length_matched_pairs"] == report["valid_sample_pairs"] == 16 * 3
    assert report["valid_accuracy_length_matched"] == report["valid_accuracy_samples"] > 0.8
    assert report["valid_accuracy_samples_shorter_wins"] == 0.5
    with pytest.raises(ValueError, match="seed_model"):
        train_outcome_reward_model(_damaged_set(4, 0), _damaged_set(4, 1), cfg, log=lambda m: None)


# =================================================================================================== every metric
def test_candidate_metric_scores_are_the_evaluations_per_sentence_scores():
    from lm_lexicon.evaluate.best_of_n.steps import candidate_metric_scores
    from lm_lexicon.metrics import sentence_bleu_a
    from lm_lexicon.metrics.text import rouge_l, sacrebleu_sentence

    rows = [{"term": "bank", "split": "test", "lang": "en", "references": ["land beside a river"]},
            {"term": "bat", "split": "test", "lang": "en", "references": ["a club used in cricket"]}]
    candidates = [["land near a river", "a place for money", "land beside a river"],
                  ["a flying animal", "a club for cricket", "a wooden club"]]
    scores, skipped = candidate_metric_scores(rows, candidates, ["bleu_a", "rouge_l", "sacrebleu", "length",
                                                                  "distinct_1"])
    assert list(scores) == ["bleu_a", "rouge_l", "sacrebleu"] and skipped == {}  # length/distinct: no BoN curve
    for i, (row, cs) in enumerate(zip(rows, candidates)):
        refs = row["references"]
        assert scores["bleu_a"][i] == pytest.approx([100 * sentence_bleu_a(c, refs) for c in cs])
        assert scores["rouge_l"][i] == pytest.approx(rouge_l(cs, [refs] * 3)[0])
        assert scores["sacrebleu"][i] == pytest.approx(sacrebleu_sentence(cs, [refs] * 3)[0])


def test_bon_analysis_matches_a_hand_computation():
    from lm_lexicon.evaluate.best_of_n.report import analysis_tables
    from lm_lexicon.evaluate.best_of_n.steps import bon_analysis

    candidates = [["a b", "a b c d", "a"], ["x y z", "x", "x y"]]
    metric = {"m": [[10.0, 30.0, 20.0], [40.0, 0.0, 50.0]]}
    selections = {"reward model": [[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]], "no selection (sample 1)": [[1, 0, 0], [1, 0, 0]]}
    out = bon_analysis(candidates, [["a b"], ["x y"]], selections, metric, ns=[1, 2, 3], n_permutations=100)
    curves = out["metrics"]["m"]["curves"]
    # N=1: everyone takes sample 1 -> (10 + 40) / 2
    assert {rule: c[1] for rule, c in curves.items()} == {"reward model": 25.0, "no selection (sample 1)": 25.0,
                                                          "oracle (upper bound)": 25.0, LENGTH_CONTROL: 25.0}
    # every candidate of an input has its own length here: the same-length control is the reward model's pick
    assert curves[LENGTH_CONTROL] == curves["reward model"]
    # N=2: reward model picks [1, 0] -> (30 + 40) / 2; oracle picks the best of the first two: (30 + 40) / 2
    assert curves["reward model"][2] == 35.0 and curves["oracle (upper bound)"][2] == 35.0
    assert curves["no selection (sample 1)"][2] == 25.0
    # N=3: reward model [1, 2] -> (30 + 50) / 2; oracle also [1, 2]
    assert curves["reward model"][3] == 40.0 == curves["oracle (upper bound)"][3]
    p = out["metrics"]["m"]["p_value"]
    assert p[1] == 1.0 and 0.0 < p[3] <= 1.0  # N=1: the same picks, no difference
    # lengths in words: sample 1 -> (2 + 3) / 2; reward model at N=2 -> (4 + 3) / 2, at N=3 -> (4 + 2) / 2; the
    # oracle picks by BLEU-A against the references given ("a b" / "x y": candidates 0 and 2)
    lengths = out["pick_length"]
    assert lengths["no selection (sample 1)"] == {1: 2.5, 2: 2.5, 3: 2.5}
    assert lengths["reward model"] == {1: 2.5, 2: 3.5, 3: 3.0}
    assert lengths["oracle (upper bound)"][3] == 2.0 and set(out["pick_length_p_value"]) == {1, 2, 3}
    table = analysis_tables(out)
    assert "**m**" in table and "| p, reward model vs sample 1 |" in table and "Mean length of the picks" in table
    assert "| p, reward model vs a random pick as long |" in table


def test_the_length_control_averages_the_candidates_as_long_as_the_pick():
    from lm_lexicon.evaluate.best_of_n.steps import bon_analysis, same_length_expectation

    candidates = [["a b", "c d", "e", "f g"], ["x", "y z w", "v"]]
    metric = {"m": [[10.0, 30.0, 20.0, 50.0], [40.0, 0.0, 60.0]]}
    lengths = [[2, 2, 1, 2], [1, 3, 1]]
    assert same_length_expectation(metric["m"], lengths, [1, 2], 3) == [20.0, 50.0]  # (10+30)/2, (40+60)/2
    assert same_length_expectation(metric["m"], lengths, [1, 2], 4) == [30.0, 50.0]  # (10+30+50)/3
    selections = {"reward model": [[0.1, 0.9, 0.5, 0.0], [0.0, 0.1, 0.9]], "no selection (sample 1)":
                  [[1, 0, 0, 0], [1, 0, 0]]}
    out = bon_analysis(candidates, [["a b"], ["x"]], selections, metric, ns=[3], n_permutations=100)
    assert out["metrics"]["m"]["curves"][LENGTH_CONTROL] == {3: 35.0}  # (20 + 50) / 2
    assert out["metrics"]["m"]["curves"]["reward model"] == {3: 45.0}  # (30 + 60) / 2
    assert 0.0 < out["metrics"]["m"]["p_value_length_control"][3] <= 1.0


def test_rerank_reports_every_metric_and_bleu_a_agrees_with_the_headline_curve():
    from lm_lexicon.evaluate.best_of_n.steps import candidate_metric_scores

    records = _damaged_set(6, 3)
    rows = [{"term": r.term, "split": "test", "lang": "en", "references": refs}
            for r, refs in zip(records.records, records.references)]

    class PrefersFewFillers:
        def score_candidates(self, prompts, candidates):
            return [[-sum(w in ("zq", "xv", "wk", "jj") for w in c.split()) for c in cs] for cs in candidates]

    scores, _ = candidate_metric_scores(rows, records.samples, ["bleu_a", "rouge_l"])
    result = rerank(PrefersFewFillers(), ["p"] * 6, records.samples, records.references, ns=[1, 2, 4],
                    metric_scores=scores)
    analysis = result["analysis"]
    assert set(analysis["metrics"]) == {"bleu_a", "rouge_l"}
    for rule, curve in result["curves"].items():  # two routes to Protocol A BLEU: the same numbers
        assert analysis["metrics"]["bleu_a"]["curves"][rule] == pytest.approx(curve)
    rouge = analysis["metrics"]["rouge_l"]["curves"]
    assert rouge["reward model"][4] == pytest.approx(100.0) == rouge["oracle (upper bound)"][4]  # the undamaged one
    assert analysis["pick_length"]["reward model"][4] == 6.0  # damage keeps the length: 6 words each


def test_bon_section_renders_new_and_old_reports():
    from lm_lexicon.evaluate.best_of_n.report import render_bon_section

    orm = {"train_pairs": 10, "train_gold_pairs": 6, "train_sample_pairs": 4, "sample_margin": 0.05,
           "train_records": 3, "valid_accuracy": 0.7, "valid_pairs": 5, "valid_records": 2,
           "valid_accuracy_untrained": 0.5, "valid_sample_pairs": 4, "valid_accuracy_samples": 0.75,
           "valid_accuracy_samples_untrained": 0.5}
    bon = {"model": "moe", "sampling": {"num_return_sequences": 2, "temperature": 0.6, "top_k": 50, "top_p": 0.9},
           "curves": {"reward model": {1: 10.0, 2: 12.0}}, "reward_model": orm}
    old = render_bon_section(bon)  # a report written before the length control and the per-metric curves
    assert "sample vs sample **0.750**" in old and "every metric" not in old and "length-matched" not in old
    orm.update(valid_length_matched_pairs=2, valid_accuracy_length_matched=0.5, length_match_gap=0,
               valid_accuracy_length_matched_untrained=0.5, valid_accuracy_samples_shorter_wins=0.625,
               train_sample_pair_stats={"sample_pairs": 9, "ties": 2, "near_ties": 3}, model="RewardModel(...)",
               length_balance=True, train_pairs_dropped_length_balance=3)
    analysis = {"metrics": {"rouge_l": {"curves": {"reward model": {1: 20.0, 2: 22.0}}, "p_value": {1: 1.0, 2: 0.04}}},
                "pick_length": {"reward model": {1: 5.0, 2: 4.5}}, "pick_length_p_value": {1: 1.0, 2: 0.5},
                "skipped_metrics": {"meteor": "nltk is not installed"}}
    new = render_bon_section({**bon, "analysis": analysis})
    assert "`RewardModel(...)`" in new and "2 ties and 3 near-ties were dropped" in new
    assert "(3 dropped so that the preferred definition is as often the shorter as the longer one" in new
    assert "within length-matched pairs (at most 0 words apart) **0.500** on 2" in new and "0.625" in new
    assert "### Best-of-N on every metric" in new and "| reward model | 20.00 | 22.00 |" in new
    assert "| p, reward model vs sample 1 | 1 | 0.04 |" in new and "Not drawn: meteor (nltk is not installed)" in new


def test_split_by_headword_keeps_every_headword_on_one_side():
    from lm_lexicon.evaluate.best_of_n.steps import split_by_headword

    keys = [f"w{i % 37}" for i in range(200)]  # 37 headwords, 5 or 6 senses each
    held, train = split_by_headword(keys, 60, 90, seed=3)
    assert len(held) == 60 and len(train) == 90
    assert not {keys[i] for i in held} & {keys[i] for i in train}
    assert held == sorted(held) and train == sorted(train) and not set(held) & set(train)
    assert (held, train) == split_by_headword(keys, 60, 90, seed=3)
    assert (held, train) != split_by_headword(keys, 60, 90, seed=4)
    everything, rest = split_by_headword(keys, 500, 10, seed=0)  # asking for more than there is: all held out
    assert everything == list(range(200)) and rest == []


def test_reward_records_from_valid_leave_the_held_out_headwords_alone(tmp_path):
    import pandas as pd

    from lm_lexicon.evaluate.best_of_n.run import reward_records

    rows = [dict(Record(term=f"w{i % 30}", context=f"c{i}", definition=f"d{i}", source="toy", split="valid").to_dict(),
                 domain=i % 3) for i in range(90)]
    pd.DataFrame(rows).to_parquet(tmp_path / "valid.parquet")
    rc = RewardConfig(train_prompts="valid", valid_rows=40, train_rows=30)
    (train, train_domains, train_refs), (held, held_domains, held_refs) = reward_records(tmp_path, rc, seed=0)
    assert len(held) == 40 and len(train) == 30
    assert not {r.term for r in train} & {r.term for r in held}
    assert all(d == int(r.context[1:]) % 3 for r, d in zip(train + held, train_domains + held_domains))
    assert all(sorted(refs) == sorted(f"d{j}" for j in range(90) if j % 30 == int(r.term[1:]))
               for r, refs in zip(train + held, train_refs + held_refs))  # every sense of the headword in the split
    with pytest.raises(ValueError, match="leave none for training"):
        reward_records(tmp_path, RewardConfig(train_prompts="valid", valid_rows=90), seed=0)
