"""Batch generation (lm_lexicon.evaluate.generate): left padding, seeded sampling, MoE domains, Ray Data, candidate
scoring.

Fixtures are tiny and built in tmp dirs: a random 2-layer Llama (hidden 64), a 2-layer MiniLM decoder, and an MoE
merged from two perturbed tiny Llamas. fp32 on CPU, one torch thread.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm_lexicon.data.records import Record
from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings, detect_kind, generate_split, row_seed
from lm_lexicon.seed_models import build_minilm_decoder, causal_bert_tokenizer, tiny_llama
from lm_lexicon.train import encode_example, record_prompt
from score_trace import (assert_equal_where_decisive, assert_same_decoding, assert_same_definitions,
                         definition_rows)

PROMPTS = [
    '"a dog barks at night" What is the definition of "bark"?',
    "a cat",
    '"the quick brown fox jumps over the lazy dog, again and again, all day long" What is the definition of "fox"?',
    'What is the definition of "tree"?',
    "x",
]
GREEDY = GenerationSettings(do_sample=False, max_new_tokens=10, batch_size=8)
SAMPLE = GenerationSettings(do_sample=True, num_return_sequences=4, max_new_tokens=8, batch_size=16, seed=7)


# Runs of one model that batch or pad differently compute the same scores only to float rounding, and a random model's
# next-token scores are nearly flat: such runs are compared through the scores each token was picked from
# (tests/score_trace.py, the `definition_traces` fixture), their texts wherever no near tie was met. The same batch
# run twice is the same computation, and is compared exactly.

# one torch thread: another process may hold the other core (two OpenMP threads then wait on each other)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def llama_dir(root):
    return tiny_llama(root / "llama")


@pytest.fixture(scope="module")
def llama(llama_dir):
    return DefinitionGenerator(llama_dir)


@pytest.fixture(scope="module")
def minilm(root):
    return DefinitionGenerator(build_minilm_decoder(root / "minilm", num_hidden_layers=2))


@pytest.fixture(scope="module")
def moe(root, perturb_weights):
    from lm_lexicon.moe import merge_experts

    tokenizer = causal_bert_tokenizer()
    experts = [perturb_weights(tiny_llama(root / f"expert-{i}", tokenizer=tokenizer, seed=i), 100 + i, 0.05)
               for i in range(2)]
    return DefinitionGenerator(merge_experts(experts, root / "moe", seed=3))


def _records(n: int = 7) -> list[Record]:
    terms = ["bark", "cat", "fox", "tree", "run", "light", "bank", "spring", "bat"]
    return [Record(term=terms[i % len(terms)], context=("a " * (i % 4)) + f"{terms[i % len(terms)]} here",
                   definition=f"definition {i}", source="toy", split="test") for i in range(n)]


# =================================================================================================== dense
def test_detect_kind(llama_dir, moe):
    assert detect_kind(llama_dir) == "dense"
    assert moe.kind == "moe" and moe.needs_domains


@pytest.mark.parametrize("which", ["llama", "minilm"])
def test_greedy_is_deterministic_and_batched_equals_one_at_a_time(request, which, definition_traces):
    gen = request.getfixturevalue(which)
    batched, batched_trace = definition_traces.run(gen.generate, PROMPTS, settings=GREEDY)
    assert gen.generate(PROMPTS, settings=GREEDY) == batched
    for i, p in enumerate(PROMPTS):  # left padding changes nothing
        alone, alone_trace = definition_traces.run(gen.generate, [p], settings=GREEDY)
        assert_same_definitions(alone, alone_trace, batched[i:i + 1], batched_trace,
                                definition_rows(gen, [p], GREEDY))
    assert all(len(outs) == 1 and isinstance(outs[0], str) for outs in batched)
    assert any(outs[0] for outs in batched)
    assert all(o == o.strip() for outs in batched for o in outs)
    # greedy with n > 1: n copies of the one greedy output
    tripled = gen.generate(PROMPTS, settings=GREEDY.replace(num_return_sequences=3))
    assert tripled == [outs * 3 for outs in batched]


def test_model_generation_config_cannot_switch_sampling_on(llama):
    """Llama-3 checkpoints ship do_sample=True, temperature 0.6, top-p 0.9: what runs is GenerationSettings."""
    expected = llama.generate(PROMPTS, settings=GREEDY)
    gc = llama.model.generation_config
    saved = (gc.do_sample, gc.temperature, gc.top_p, gc.repetition_penalty)
    gc.do_sample, gc.temperature, gc.top_p, gc.repetition_penalty = True, 0.6, 0.9, 3.0
    try:
        assert llama.generate(PROMPTS, settings=GREEDY) == expected
    finally:
        gc.do_sample, gc.temperature, gc.top_p, gc.repetition_penalty = saved


def test_prompts_encoded_as_training_saw_them(llama):
    from lm_lexicon.train import encode_prompt

    tok = llama.tokenizer
    assert llama.encode_prompts(PROMPTS[:2]) == [encode_prompt(tok, p) for p in PROMPTS[:2]]
    assert llama.encode_prompts(PROMPTS[:1])[0] == tok(PROMPTS[0])["input_ids"]  # [BOS] prompt, no [SEP]
    truncated = llama.encode_prompts(PROMPTS[2:3], max_prompt_tokens=6)[0]
    assert len(truncated) == 6 and truncated[0] == tok.bos_token_id


def test_sampling_is_seeded_and_independent_of_batching(llama, definition_traces):
    a, trace = definition_traces.run(llama.generate, PROMPTS, settings=SAMPLE)
    assert [len(outs) for outs in a] == [4] * len(PROMPTS)
    assert llama.generate(PROMPTS, settings=SAMPLE) == a
    # a sample is a function of (seed, prompt, index): batch size and order do not matter
    rows = definition_rows(llama, PROMPTS, SAMPLE)
    smaller, smaller_trace = definition_traces.run(llama.generate, PROMPTS, settings=SAMPLE.replace(batch_size=3))
    assert_same_definitions(smaller, smaller_trace, a, trace, rows)
    reversed_, reversed_trace = definition_traces.run(llama.generate, PROMPTS[::-1], settings=SAMPLE)
    assert_same_definitions(reversed_[::-1], reversed_trace, a, trace, rows)
    assert llama.generate(PROMPTS, settings=SAMPLE.replace(seed=8)) != a
    assert all(len(set(outs)) > 1 for outs in a)  # the n samples of a prompt differ
    assert row_seed(7, "p", 0) == row_seed(7, "p", 0) != row_seed(7, "p", 1)


def test_repetition_penalty_is_applied(llama):
    plain = llama.generate(PROMPTS, settings=GREEDY.replace(repetition_penalty=1.0, max_new_tokens=16))
    strong = llama.generate(PROMPTS, settings=GREEDY.replace(repetition_penalty=50.0, max_new_tokens=16))
    assert plain != strong
    for outs in strong:  # a huge penalty forbids repeating any token: no word appears twice
        words = outs[0].split()
        assert len(words) == len(set(words))


def test_repetition_penalty_ignores_left_padding():
    from lm_lexicon.evaluate.generate import _processors

    pad = 0
    procs = _processors(GenerationSettings(repetition_penalty=2.0), pad_lengths=[2, 0], row_seeds=None)
    input_ids = torch.tensor([[pad, pad, 5, 6], [5, 6, 6, 1]])
    scores = torch.tensor([[1.0, -1.0, 2.0, 3.0, 4.0, 5.0, -6.0, 7.0]] * 2)
    out = procs(input_ids, scores.clone())
    assert out[0].tolist() == [1.0, -1.0, 2.0, 3.0, 4.0, 2.5, -12.0, 7.0]  # pad (id 0) is not penalised
    assert out[1].tolist() == [1.0, -2.0, 2.0, 3.0, 4.0, 2.5, -12.0, 7.0]  # a real token 1 is; repeats count once


def test_no_repeat_ngram_bans_only_repeats_of_generated_ngrams():
    from lm_lexicon.evaluate.generate import _processors

    procs = _processors(GenerationSettings(repetition_penalty=1.0, no_repeat_ngram_size=2), pad_lengths=[0, 0],
                        row_seeds=None, prompt_width=2)
    # row 0 generated 3 4 3: the bigram (3, 4) exists, so 4 after 3 is banned; row 1's prompt holds (7, 5) but the
    # prompt does not count, and its generated 5 6 5 bans 6 only
    input_ids = torch.tensor([[9, 9, 3, 4, 3], [7, 5, 5, 6, 5]])
    out = procs(input_ids, torch.zeros(2, 10))
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [4]
    assert torch.isinf(out[1]).nonzero().flatten().tolist() == [6]


def test_no_repeat_ngram_size_in_generation(llama):
    settings = GREEDY.replace(repetition_penalty=1.0, max_new_tokens=24, no_repeat_ngram_size=2)
    ids = [llama.tokenizer(o[0], add_special_tokens=False)["input_ids"] for o in llama.generate(PROMPTS, settings=settings)]
    plain = llama.generate(PROMPTS, settings=GREEDY.replace(repetition_penalty=1.0, max_new_tokens=24))
    assert any(len(set(zip(t, t[1:]))) < len(t) - 1 for t in
               (llama.tokenizer(o[0], add_special_tokens=False)["input_ids"] for o in plain)), \
        "the fixture should repeat a bigram without the constraint, else this test proves nothing"
    for t in ids:  # re-tokenised text: compare decoded words, which round-trip for this tokenizer
        words = llama.tokenizer.convert_ids_to_tokens(t)
        assert len(set(zip(words, words[1:]))) == len(words) - 1 or len(words) < 2
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        GenerationSettings(no_repeat_ngram_size=-1)


def test_gumbel_max_samples_follow_the_warped_distribution():
    from lm_lexicon.evaluate.generate import _processors

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]])
    n = 4000
    settings = GenerationSettings(do_sample=True, temperature=0.5, top_k=4, top_p=1.0, repetition_penalty=1.0)
    procs = _processors(settings, pad_lengths=[0] * n, row_seeds=list(range(n)))
    picks = procs(torch.zeros((n, 1), dtype=torch.long), logits.repeat(n, 1)).argmax(dim=1)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0, float("-inf"), 0.5]) / 0.5, dim=0)  # top-4 drops id 3
    freq = torch.bincount(picks, minlength=5).double() / n
    assert freq[3] == 0
    assert torch.allclose(freq, expected.double(), atol=0.03)


def test_sequence_logprobs_equals_a_manual_computation(llama):
    candidates = ["a sound a dog makes", "a small animal", "an animal, red", "a plant", ""]
    got = llama.sequence_logprobs(PROMPTS, candidates, batch_size=2)
    model, tok = llama.model, llama.tokenizer
    for p, c, value in zip(PROMPTS, candidates, got):
        ex = encode_example(tok, p, c, 512)
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        expected = sum(float(logp[t - 1, ex["input_ids"][t]]) for t in range(1, len(ids[0])) if ex["labels"][t] != -100)
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-3)
    # without EOS: the EOS term is removed
    no_eos = llama.sequence_logprobs(PROMPTS, candidates, include_eos=False)
    assert all(a > b for a, b in zip(no_eos, got))


def test_call_adds_a_list_column(llama):
    batch = {"row": np.arange(3), "prompt": np.array(PROMPTS[:3], dtype=object)}
    out = llama.__class__.__call__(llama, batch)  # the Ray Data entry point, called in process
    assert out["predictions"].dtype == object and out["predictions"].shape == (3,)
    assert all(isinstance(p, list) and len(p) == 1 for p in out["predictions"])
    assert out["predictions"].tolist() == llama.generate(PROMPTS[:3])  # the same batch: the same computation
    assert out["domain"].tolist() == [-1, -1, -1]
    np.testing.assert_array_equal(out["row"], batch["row"])


# =================================================================================================== MoE
def test_moe_mixed_domains_equal_per_domain_groups(moe, definition_traces):
    domains = np.array([0, 1, 0, 1, 1])
    for settings in (GREEDY, SAMPLE):
        mixed, mixed_trace = definition_traces.run(moe.generate, PROMPTS, domains, settings=settings)
        for d in (0, 1):
            rows = np.flatnonzero(domains == d)
            prompts = [PROMPTS[i] for i in rows]
            alone, alone_trace = definition_traces.run(moe.generate, prompts, [d] * len(rows), settings=settings)
            assert_same_definitions(alone, alone_trace, [mixed[i] for i in rows], mixed_trace,
                                    definition_rows(moe, prompts, settings))
    # the labels matter: under the other domains every prompt scores its first token differently
    _, other = definition_traces.run(moe.generate, PROMPTS, 1 - domains, settings=GREEDY)
    _, given = definition_traces.run(moe.generate, PROMPTS, domains, settings=GREEDY)
    firsts = [(row, ()) for (row,) in definition_rows(moe, PROMPTS, GREEDY)]
    assert all((other.scores[k] - given.scores[k]).abs().max() > 1e-2 for k in firsts)
    lp_mixed = moe.sequence_logprobs(PROMPTS, ["a definition"] * 5, domains)
    lp_zero = moe.sequence_logprobs(PROMPTS, ["a definition"] * 5, [0] * 5)
    assert lp_mixed[0] == pytest.approx(lp_zero[0], rel=1e-5) and lp_mixed[1] != pytest.approx(lp_zero[1], rel=1e-5)


def test_moe_batches_rows_by_domain(moe, monkeypatch):
    seen = []
    generate = moe.model.generate

    def recording(*args, **kwargs):
        seen.append(sorted(set(kwargs["domain_labels"].tolist())))
        return generate(*args, **kwargs)

    monkeypatch.setattr(moe.model, "generate", recording)
    out = moe.generate(PROMPTS, [1, 0, 1, 0, 1], settings=GREEDY.replace(batch_size=2))
    assert len(out) == len(PROMPTS) and all(out)
    assert seen == [[0], [1], [1]]  # domain by domain (length order alone gave [[1], [0], [1]] here)


def test_moe_without_domains_or_router_is_an_error(moe):
    with pytest.raises(ValueError, match="no router"):
        moe.generate(PROMPTS[:1])
    with pytest.raises(ValueError, match=r"domains must lie in \[0, 2\)"):
        moe.generate(PROMPTS[:1], [5])


# =================================================================================================== whole split
def test_generate_split_in_process(llama_dir):
    records = _records(5)
    preds = generate_split(records, llama_dir, SAMPLE.replace(num_return_sequences=2), use_ray=False,
                           model_name="tiny")
    assert [p["term"] for p in preds] == [r.term for r in records]
    assert all(len(p["predictions"]) == 2 and p["prediction"] == p["predictions"][0] for p in preds)
    assert preds[0]["reference"] == records[0].definition and preds[0]["references"] == [records[0].definition]
    assert {p["model"] for p in preds} == {"tiny"} and {p["domain"] for p in preds} == {None}


def test_generate_split_on_ray_data_keeps_input_order(ray_local, llama_dir, definition_traces):
    records = _records(9)
    settings = SAMPLE.replace(num_return_sequences=3, batch_size=6)
    on_ray = generate_split(records, llama_dir, settings, use_ray=True, num_actors=1, rows_per_call=2,
                            torch_threads=1)
    generator = DefinitionGenerator(llama_dir)
    local, local_trace = definition_traces.run(generate_split, records, llama_dir, settings, use_ray=False,
                                               eos_ids=generator.eos_ids)
    assert [(p["term"], p["context"]) for p in on_ray] == [(r.term, r.context) for r in records]
    assert all(len(p["predictions"]) == 3 and all(isinstance(s, str) for s in p["predictions"]) for p in on_ray)
    prompts = [record_prompt(r) for r in records]
    rows = definition_rows(generator, prompts, settings)
    local = [p["predictions"] for p in local]
    # per-row seeds: the same samples, on Ray (batched otherwise, in another process: not traced) as here
    assert assert_equal_where_decisive([p["predictions"] for p in on_ray], local, local_trace, rows) >= 20
    direct, direct_trace = definition_traces.run(generator.generate, prompts, settings=settings)
    assert_same_definitions(local, local_trace, direct, direct_trace, rows)


def test_generate_split_with_given_prompts(llama_dir, definition_traces):
    records = _records(3)
    prompts = [f"few-shot prefix {i}. " + record_prompt(r) for i, r in enumerate(records)]
    generator = DefinitionGenerator(llama_dir)
    preds, split_trace = definition_traces.run(generate_split, records, llama_dir, GREEDY, use_ray=False,
                                               prompts=prompts, eos_ids=generator.eos_ids)
    direct, direct_trace = definition_traces.run(generator.generate, prompts, settings=GREEDY)
    assert_same_definitions([p["predictions"] for p in preds], split_trace, direct, direct_trace,
                            definition_rows(generator, prompts, GREEDY))
    assert preds[0]["term"] == records[0].term
    with pytest.raises(ValueError, match="2 prompts for 3 records"):
        generate_split(records, llama_dir, GREEDY, use_ray=False, prompts=prompts[:2])


def test_beam_search_returns_one_definition_per_prompt(llama, moe, definition_traces):
    settings = GREEDY.replace(num_beams=3)  # with the repetition penalty: per-beam processors
    outs, batched = definition_traces.run(llama.generate, PROMPTS, settings=settings)
    assert len(outs) == len(PROMPTS) and all(len(o) == 1 and isinstance(o[0], str) for o in outs)
    # one prompt alone scores every beam as it does inside the batch (left padding + per-row processors); which beam
    # wins is a comparison of sums of scores, so the texts are not compared across the two computations
    _, alone = definition_traces.run(llama.generate, PROMPTS[:1], settings=settings)
    rows = [r for (r,) in definition_rows(llama, PROMPTS[:1], settings)]
    assert assert_same_decoding(alone, batched, rows=rows, beams=True).compared >= 3
    _, mixed = definition_traces.run(moe.generate, PROMPTS[:2], [0, 1], settings=settings)
    for i in (0, 1):
        _, alone = definition_traces.run(moe.generate, PROMPTS[i:i + 1], [i], settings=settings)
        rows = [r for (r,) in definition_rows(moe, PROMPTS[i:i + 1], settings)]
        assert assert_same_decoding(alone, mixed, rows=rows, beams=True).compared >= 3
    with pytest.raises(ValueError, match="beam search"):
        GenerationSettings(do_sample=True, num_beams=2)


def test_eval_config_beams_apply_to_the_table_not_to_best_of_n_samples():
    from pydantic import ValidationError

    from lm_lexicon.config import EvalConfig

    ev = EvalConfig(num_beams=4, best_of_n=8)
    assert GenerationSettings.from_eval_config(ev, sample=False).num_beams == 4
    sampling = GenerationSettings.from_eval_config(ev, sample=True)
    assert (sampling.num_beams, sampling.do_sample, sampling.num_return_sequences) == (1, True, 8)
    assert GenerationSettings.from_eval_config(EvalConfig(), sample=False).num_beams == 1
    assert "num_beams" not in EvalConfig().model_dump()  # added later: old runs' fingerprints stay valid
    with pytest.raises(ValidationError, match="num_beams"):
        EvalConfig(num_beams=0)


def test_length_penalty_reaches_beam_search_from_the_eval_config(llama):
    from pydantic import ValidationError

    from lm_lexicon.config import EvalConfig

    ev = EvalConfig(num_beams=4, length_penalty=0.0)
    settings = GenerationSettings.from_eval_config(ev, sample=False)
    assert (settings.num_beams, settings.length_penalty) == (4, 0.0)
    assert llama._generation_config(settings).length_penalty == 0.0  # what model.generate receives
    assert llama._generation_config(settings.replace(length_penalty=-1.5)).length_penalty == -1.5
    assert llama._generation_config(GREEDY).length_penalty == 1.0
    assert "length_penalty" not in EvalConfig().model_dump()  # added later: old runs' fingerprints stay valid
    with pytest.raises(ValidationError, match="length_penalty"):
        EvalConfig(length_penalty=5.0)
    with pytest.raises(ValueError, match="length_penalty"):
        GenerationSettings(length_penalty=-4.5)
