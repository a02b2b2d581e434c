"""The retrieval reward model (lm_lexicon.evaluate.best_of_n.retrieval): its features by hand, a fit that finds what
decides the preference, the pipeline step, save/load and the Scorer, and its config field staying out of old hashes."""
from __future__ import annotations

import random

import numpy as np
import pytest

from lm_lexicon.config import PipelineConfig, RewardConfig
from lm_lexicon.data.records import Record
from lm_lexicon.evaluate.best_of_n.io import load_reward_model
from lm_lexicon.evaluate.best_of_n.reward import PreferencePair, RewardModel, pairwise_accuracy
from lm_lexicon.evaluate.best_of_n.retrieval import FEATURES, RetrievalReward, pools_by_prompt
from lm_lexicon.evaluate.best_of_n.steps import RetrievalIndex, SampledSet, train_outcome_reward_model
from lm_lexicon.metrics.bleu import sentence_bleu_a

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INDEX = [Record(term="oak", context="an oak in the park", definition="a tree with hard wood and acorns", source="toy"),
         Record(term="elm", context="the elm shaded us", definition="a tall tree with broad leaves", source="toy"),
         Record(term="hammer", context="hit it with a hammer", definition="a hand tool for driving nails",
                source="toy")]


@pytest.fixture(scope="module")
def index_model():
    return RetrievalReward.from_records(INDEX, neighbours=3)


def test_features_by_hand(index_model):
    prompt = 'What is the definition of "ash"?'
    candidates = ["a tree with pale wood", "a tree with pale wood", "grey dust left by fire"]
    feats = index_model.features([prompt] * 3, candidates, pools=[candidates] * 3)
    assert feats.shape == (3, len(FEATURES))
    for row, cand in zip(feats, candidates):  # neighbours = the whole index here, so the choice does not matter
        assert row[0] == pytest.approx(np.mean([sentence_bleu_a(cand, [r.definition]) for r in INDEX]), abs=1e-12)
        others = list(candidates)
        others.remove(cand)
        assert row[1] == pytest.approx(np.mean([sentence_bleu_a(cand, [o]) for o in others]), abs=1e-12)
        assert row[2] == len(cand.split())
    assert feats[0, 1] > feats[2, 1]  # the two agreeing samples agree more than the odd one
    alone = index_model.features([prompt], [candidates[0]])
    assert alone[0, 1] == 0.0 and alone[0, 0] == pytest.approx(feats[0, 0], abs=1e-12)


def test_an_indexed_prompt_is_its_own_nearest_neighbour():
    from lm_lexicon.data.prompts import record_prompt

    model = RetrievalReward.from_records(INDEX, neighbours=1)
    nearest = model.neighbours_of([record_prompt(r) for r in INDEX])
    assert [int(n[0]) for n in nearest] == [0, 1, 2]


def test_pools_group_a_flat_request_by_prompt():
    assert pools_by_prompt(["a", "b", "a", "c", "b"]) == [[0, 2], [1, 4], [0, 2], [3], [1, 4]]


def _agreement_pairs(n: int, seed: int) -> tuple[list[PreferencePair], list[list[str]]]:
    """The better sample is the one most samples repeat; the worse one an outlier of the same length. Pools are per
    record (``pair.index``)."""
    rng = random.Random(seed)
    words = ["tree", "tool", "river", "stone", "light", "metal", "cloth", "grain", "sound", "glass"]
    pairs, pools = [], []
    for i in range(n):
        a, b, c, d = rng.sample(words, 4)
        good, bad = f"a kind of {a} {b}", f"a kind of {c} {d}"
        pools.append([good, good, good, bad])
        pairs.append(PreferencePair('What is the definition of "word"?', good, bad, i))  # one prompt for all
    return pairs, pools


def test_fit_finds_the_feature_that_decides(index_model):
    model = RetrievalReward(index_model.embeddings, index_model.definitions, index_model.config)
    pairs, pools = _agreement_pairs(40, 0)
    held, held_pools = _agreement_pairs(20, 1)
    metrics = model.fit(pairs, pools)
    assert metrics["pairs"] == 40 and metrics["loss_last"] < metrics["loss_first"]
    assert metrics["weights"]["sample_agreement"] > 0
    assert abs(metrics["weights"]["sample_agreement"]) > abs(metrics["weights"]["words"])
    # every record shares one prompt: pooled by prompt, all samples would be one pool and nothing would decide
    assert pairwise_accuracy(model, held, pools=held_pools) == 1.0
    assert pairwise_accuracy(model, held) < 1.0  # without the other samples the deciding feature is 0 for both
    with pytest.raises(ValueError, match="no samples for it"):
        pairwise_accuracy(model, held, pools=held_pools[:5])


def test_save_load_and_serve(index_model, tmp_path):
    from lm_lexicon.serving.engines import ScorerEngine, candidate_pools

    model = RetrievalReward(index_model.embeddings, index_model.definitions, index_model.config)
    pairs, pools = _agreement_pairs(20, 0)
    model.fit(pairs, pools)
    saved = model.save(tmp_path / "rm")
    loaded = load_reward_model(saved)
    assert isinstance(loaded, RetrievalReward) and loaded.backbone == "retrieval"
    with pytest.raises(ValueError, match="load_reward_model"):
        RewardModel.load(saved)
    prompts, candidates = ['What is the definition of "ash"?'] * 2, [["a tree", "a tree", "dust"], ["a tool"]]
    expected = model.score_candidates(prompts, candidates)
    assert loaded.score_candidates(prompts, candidates) == expected  # the same computation on the same numbers
    assert sorted(p.name for p in saved.iterdir()) == ["index.safetensors", "index_definitions.jsonl",
                                                       "reward_config.json"]
    scorer = ScorerEngine(saved, None)
    flat_p = [prompts[0]] * 3 + ['What is the definition of "hammer"?']
    flat_d = candidates[0] + candidates[1]
    pools = candidate_pools(flat_p, flat_d)  # what the Scorer deployment attaches to each pair of a call
    assert pools == [("a tree", "a tree", "dust")] * 3 + [("a tool",)]
    served = [scorer.reward([p], [d], [pool])[0] for p, d, pool in zip(flat_p, flat_d, pools)]  # batched apart
    assert served[:3] == pytest.approx(expected[0], abs=1e-6)
    assert served[3] == pytest.approx(float(model.score([flat_p[3]], ["a tool"])[0]), abs=1e-6)


def _misleading_set(n: int, seed: int) -> SampledSet:
    """The worse sample copies an indexed definition (so the neighbour agreement alone prefers it); the better ones
    paraphrase the gold and agree with one another: only a fitted weight on sample agreement ranks them right."""
    rng = random.Random(seed)
    animals = ["fox", "hare", "mole", "vole", "badger", "otter", "stoat", "weasel"]
    homes = ["burrows", "holes", "dens", "tunnels"]
    records, samples, refs = [], [], []
    for i in range(n):
        animal, home = rng.choice(animals), rng.choice(homes)
        gold = f"a small {animal} that lives in {home} under the ground"
        records.append(Record(term=f"{animal}{seed}-{i}", context="", definition=gold, source="toy"))
        samples.append([f"a small {animal} that lives in {home}", f"a small {animal} living in {home} under ground",
                        f"a small {animal} that lives under the ground", INDEX[i % 3].definition])
        refs.append([gold])
    return SampledSet(records, None, samples, [[0.0] * 4 for _ in samples], refs)


def test_the_pipeline_step_fits_what_the_neighbours_alone_get_wrong():
    cfg = RewardConfig(backbone="retrieval", neighbours=3, sample_pairs=4, gold_pairs=False)
    model, report = train_outcome_reward_model(_misleading_set(16, 0), _misleading_set(12, 1), cfg,
                                               log=lambda m: None, index=RetrievalIndex(INDEX))
    assert isinstance(model, RetrievalReward) and report["backbone"] == "retrieval"
    assert set(report["weights"]) == set(FEATURES) and report["train_pairs"] > 0
    assert report["valid_accuracy_samples_untrained"] < 0.7  # the copied definition wins on neighbour agreement
    assert report["valid_accuracy_samples"] > 0.9 and report["weights"]["sample_agreement"] > 0
    with pytest.raises(ValueError, match="training records to index"):
        train_outcome_reward_model(_misleading_set(4, 0), _misleading_set(4, 1), cfg, log=lambda m: None)


def test_best_of_n_at_n_compares_a_sample_with_the_first_n_only(index_model):
    from lm_lexicon.evaluate.best_of_n.steps import rerank

    model = RetrievalReward(index_model.embeddings, index_model.definitions,
                            dict(index_model.config, weights=[0.0, 1.0, 0.0]))  # sample agreement alone
    good, odd = "p q r s t", "x y z w v"
    candidates = [[odd, good, good, good]]  # at N=2 the two disagree alike: a tie, the first is picked
    by_n = model.score_prefixes(["prompt"], candidates, [2, 4])
    assert by_n[2][0][0] == by_n[2][0][1] and len(by_n[2][0]) == 2
    assert by_n[4][0] == pytest.approx(model.score_candidates(["prompt"], candidates)[0], abs=1e-12)
    result = rerank(model, ["prompt"], candidates, [[good]], ns=[1, 2, 4])
    # seeing samples 3 and 4 at N=2 would pick the good one (BLEU 100): the curve must not
    assert result["curves"]["reward model"][2] < 50.0 and result["curves"]["reward model"][4] == pytest.approx(100.0)
    assert result["picks"] == [good]
    ragged = [[odd, good, good, good], [good, odd, odd]]  # the picks use every sample, the curves stop at N=2
    result = rerank(model, ["prompt", "prompt"], ragged, [[good], [odd]], ns=[1, 2])
    assert sorted(result["curves"]["reward model"]) == [1, 2]
    for got, want in zip(result["raw_scores"], model.score_candidates(["prompt", "prompt"], ragged)):
        assert got == pytest.approx(want, abs=1e-12)
    assert result["picks"] == [good, odd]


def test_a_broken_retrieval_directory_is_refused_with_the_reason(index_model, tmp_path):
    from lm_lexicon.serving.engines import ScorerEngine

    saved = RetrievalReward(index_model.embeddings, index_model.definitions, index_model.config).save(tmp_path / "rm")
    (saved / "index.safetensors").unlink()
    with pytest.raises(ValueError, match="no index.safetensors"):
        load_reward_model(saved)
    scorer = ScorerEngine(saved, None)
    assert not scorer.available and "no index.safetensors" in scorer.reason


def test_the_length_control_draws_from_the_samples_the_filter_keeps():
    from lm_lexicon.evaluate.best_of_n.steps import same_length_expectation

    scores, lengths = [[10.0, 30.0, 50.0]], [[2, 2, 2]]
    assert same_length_expectation(scores, lengths, [1], 3) == [30.0]
    assert same_length_expectation(scores, lengths, [1], 3, keep=[[False, True, True]]) == [40.0]
    assert same_length_expectation(scores, lengths, [1], 3, keep=[[False, False, False]]) == [30.0]  # fallback


def test_retrieval_index_leaves_out_the_reward_records_headwords(tmp_path):
    import pandas as pd

    from lm_lexicon.evaluate.best_of_n.run import retrieval_index

    rows = [dict(Record(term=f"w{i % 10}", context=f"c{i}", definition=f"d{i}", source="toy", split="train").to_dict(),
                 domain=0) for i in range(30)]
    pd.DataFrame(rows).to_parquet(tmp_path / "domain_0.parquet")
    taken = [Record(term="w3", context="", definition="x", source="toy", split="train"),
             Record(term="w7", context="", definition="y", source="toy", split="valid")]
    index = retrieval_index(tmp_path, PipelineConfig(), None, taken)
    assert sorted({r.term for r in index.records}) == [f"w{i}" for i in range(10) if i not in (3, 7)]
    assert len(index.records) == 24 and index.embedder == "bundled-minilm"


def test_neighbours_stays_out_of_dumps_at_its_default():
    """A field added after runs were made (config.ADDED_LATER) leaves their stage hashes unchanged at its default."""
    default = PipelineConfig()
    assert "neighbours" not in default.model_dump(mode="json")["evaluate"]["reward"]
    changed = default.model_copy(deep=True)
    changed.evaluate.reward.neighbours = 8
    assert changed.model_dump(mode="json")["evaluate"]["reward"]["neighbours"] == 8
    assert changed.stage_hash("evaluate") != default.stage_hash("evaluate")
    assert PipelineConfig.model_validate(changed.model_dump(mode="json")).evaluate.reward.neighbours == 8
