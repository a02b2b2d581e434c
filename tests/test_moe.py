"""The MoE layer and model (lm_lexicon.moe.model): parity with the dense model, routing, generation, training.

Fixtures are tiny and built in tmp dirs: a 2-layer Llama (hidden 64) and a 1-layer MiniLM decoder; fp32 on CPU.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

from lm_lexicon.moe.model import (
    LexiconMoEForCausalLM,
    MoEFeedForward,
    load_balancing_loss,
    moe_from_dense,
)
from lm_lexicon.seed_models import build_minilm_decoder, load_causal_lm, tiny_llama
from score_trace import ScoreTrace, assert_same_decoding

POLICIES = ("domain", "token", "soft-sequence", "hard-sequence")
PROMPTS = ['"a dog barks at night" What is the definition of "bark"?', "a cat", "the quick brown fox jumps over"]


# one torch thread: another process may hold the other core (two OpenMP threads then wait on each other)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, tokenizer = load_causal_lm(tiny_llama(tmp_path_factory.mktemp("llama") / "seed"))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    path = build_minilm_decoder(tmp_path_factory.mktemp("minilm") / "seed", num_hidden_layers=1)
    model, tokenizer = load_causal_lm(path)
    return model.eval(), tokenizer


def _batch(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _distinct_experts(moe: LexiconMoEForCausalLM, scale: float = 0.5, seed: int = 1) -> LexiconMoEForCausalLM:
    """Make every expert different (multiplicative noise), so routing decisions change the numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe.moe_blocks():
            for expert in block.experts:
                for p in expert.parameters():
                    p.mul_(1 + scale * torch.randn(p.shape, generator=g))
            block.gate.weight.normal_(0, 1.0, generator=g)  # decisive gates: routing differs between tokens
    return moe


# =================================================================================================== parity
@pytest.mark.parametrize("routing", POLICIES)
def test_identical_experts_equal_the_dense_llama(llama, routing):
    dense, tok = llama
    enc = _batch(tok)
    moe = moe_from_dense(dense, 4, routing=routing)
    with torch.no_grad():
        expected = dense(**enc).logits
        got = moe(**enc, domain_labels=torch.tensor([3, 0, 1])).logits
    assert got.shape == expected.shape == (3, enc["input_ids"].shape[1], dense.config.vocab_size)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["domain", "token"])
def test_identical_experts_equal_the_dense_minilm_decoder(minilm, routing):
    dense, tok = minilm
    enc = _batch(tok)
    moe = moe_from_dense(dense, 3, routing=routing)
    with torch.no_grad():
        expected = dense(**enc).logits
        got = moe(**enc, domain_labels=torch.tensor([2, 0, 2])).logits
    assert_close(got, expected, rtol=1e-5, atol=1e-4)  # logits reach ~30: 1e-4 is ~3e-6 relative
    # BERT's LayerNorm after the FFN stays shared (averaged), only intermediate.dense + output.dense are experts
    names = [n for n, _ in moe.named_parameters()]
    assert "lm.bert.encoder.layer.0.output.LayerNorm.weight" in names
    assert "lm.bert.encoder.layer.0.intermediate.experts.2.output.dense.weight" in names
    assert not any(n.endswith("layer.0.output.dense.weight") and "experts" not in n for n in names)


def test_domain_label_i_is_the_dense_model_with_expert_i(llama):
    """The key property: domain routing restricted to one sequence is a dense model (shared + expert i)."""
    dense, tok = llama
    enc = _batch(tok)
    moe = _distinct_experts(moe_from_dense(dense, 3, routing="domain"))
    labels = torch.tensor([2, 0, 1])  # every expert gets a row
    with torch.no_grad():
        mixed = moe(**enc, domain_labels=labels).logits
        expected = [_collapse(moe, dense, i)(**enc).logits for i in range(3)]
        for i in range(3):
            # one label for the batch runs expert i on the whole batch, as the dense model does: the same kernels
            assert_close(moe(**enc, domain_labels=i).logits, expected[i], rtol=0, atol=0)
            # a mixed batch runs expert i on its row only (another matmul shape): equal to float rounding
            rows = labels == i
            assert_close(mixed[rows], expected[i][rows], rtol=1e-5, atol=1e-5)
            # while another expert's model is far off, so the tolerance cannot hide a wrong route
            assert (mixed[rows] - expected[(i + 1) % 3][rows]).abs().max() > 1e-2


def _collapse(moe, dense, i):
    import copy

    model = copy.deepcopy(dense)
    for layer, block in zip(model.model.layers, moe.moe_blocks()):
        layer.mlp.load_state_dict(block.experts[i].state_dict())
    return model


# =================================================================================================== domain routing cost
def test_domain_routing_runs_only_each_sequences_expert(llama):
    dense, tok = llama
    enc = _batch(tok)
    moe = moe_from_dense(dense, 4, routing="domain")
    calls: list[tuple[int, int, int]] = []  # (layer, expert, rows)
    hooks = [e.register_forward_hook(lambda m, a, o, li=li, ei=ei: calls.append((li, ei, a[0].shape[0])))
             for li, block in enumerate(moe.moe_blocks()) for ei, e in enumerate(block.experts)]
    with torch.no_grad():
        moe(**enc, domain_labels=torch.tensor([1, 3, 1]))
        mixed, calls[:] = list(calls), []
        moe(**enc, domain_labels=torch.tensor([2, 2, 2]))
        uniform = list(calls)
    for h in hooks:
        h.remove()
    # per layer: expert 1 sees its 2 sequences, expert 3 its 1; experts 0 and 2 never run
    assert sorted(mixed) == [(0, 1, 2), (0, 3, 1), (1, 1, 2), (1, 3, 1)]
    assert sorted(uniform) == [(0, 2, 3), (1, 2, 3)]


def test_domain_labels_are_validated(llama):
    dense, tok = llama
    enc = _batch(tok)
    moe = moe_from_dense(dense, 2, routing="domain")
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs domain_labels"):
            moe(**enc)
        with pytest.raises(ValueError, match="2 domain labels for a batch of 3"):
            moe(**enc, domain_labels=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
            moe(**enc, domain_labels=torch.tensor([0, 1, 2]))
        with pytest.raises(TypeError, match="integers"):
            moe(**enc, domain_labels=torch.tensor([0.0, 1.0, 1.0]))
        # one int labels the whole batch
        assert_close(moe(**enc, domain_labels=1).logits, moe(**enc, domain_labels=torch.tensor([1, 1, 1])).logits)


# =================================================================================================== generation
# Two generations that compute the same function in different ways (a mixed batch and a batch of one domain, cached
# and uncached decoding) agree to float rounding, and a random model's next-token scores are nearly flat: the tests
# compare the scores each token was picked from (tests/score_trace.py), and the tokens of rows that never hit a tie.
def _generate_traced(model, enc, row_ids=(0, 1, 2), **kw):
    trace = ScoreTrace([model.generation_config.eos_token_id])
    out = model.generate(**enc, logits_processor=trace.processors(row_ids, enc["input_ids"].shape[1]),
                         return_dict_in_generate=True, **kw)
    return out, trace


def test_generate_batched_mixed_domains(llama):
    """Each row of a mixed-domain batch generates what it generates in a batch of its own domain."""
    dense, tok = llama
    enc = _batch(tok)
    moe = _distinct_experts(moe_from_dense(dense, 3, routing="domain"))
    labels = torch.tensor([2, 0, 1])
    kw = dict(max_new_tokens=8, do_sample=False)
    mixed, mixed_trace = _generate_traced(moe, enc, domain_labels=labels, **kw)
    assert mixed.sequences.shape == (3, enc["input_ids"].shape[1] + 8)
    for i in range(3):
        uniform, uniform_trace = _generate_traced(moe, enc, domain_labels=torch.full((3,), i), **kw)
        row = int((labels == i).nonzero())
        same = assert_same_decoding(mixed_trace, uniform_trace, rows=[row])
        assert same.compared >= 1
        if row not in same.diverged:
            assert torch.equal(mixed.sequences[row], uniform.sequences[row])
    # labels matter: under other domains every row scores its first token differently
    _, shifted = _generate_traced(moe, enc, domain_labels=(labels + 1) % 3, **kw)
    assert all((mixed_trace.scores[(r, ())] - shifted.scores[(r, ())]).abs().max() > 1e-2 for r in range(3))


def test_generate_expands_labels_for_beams_and_return_sequences(llama):
    dense, tok = llama
    enc = _batch(tok)
    moe = _distinct_experts(moe_from_dense(dense, 3, routing="domain"))
    labels = torch.tensor([2, 0, 1])
    seen: list[torch.Tensor] = []  # the domain labels of every forward of the generation
    hook = moe.moe_blocks()[0].register_forward_hook(lambda m, a, o: seen.append(m.context.domain_labels.clone()))
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2)
    mixed, mixed_trace = _generate_traced(moe, enc, domain_labels=labels, **kw)
    hook.remove()
    assert mixed.sequences.shape[0] == 6
    # every beam of a prompt keeps the prompt's label, at every step
    assert len(seen) == mixed.sequences.shape[1] - enc["input_ids"].shape[1]  # one forward per new token
    assert all(torch.equal(s, labels.repeat_interleave(2)) for s in seen)
    # and every beam both runs kept scores as in a batch of the prompt's own domain (which beams are kept and
    # returned compares sums of scores: float ties, so the returned sequences are not compared)
    for i in range(3):
        _, uniform_trace = _generate_traced(moe, enc, domain_labels=torch.full((3,), i), **kw)
        row = int((labels == i).nonzero())
        assert assert_same_decoding(mixed_trace, uniform_trace, rows=[row], beams=True).compared >= 2


@pytest.mark.parametrize("routing", ["soft-sequence", "hard-sequence"])
def test_sequence_routing_is_decided_by_the_prompt(llama, routing):
    """Cached generation fixes the route at the prefill; uncached generation with routing_mask = the prompt
    recomputes it from the prompt at every step: the same route, hence the same scores."""
    from lm_lexicon.moe import calibrate_gates

    dense, tok = llama
    enc = _batch(tok)
    moe = _distinct_experts(moe_from_dense(dense, 3, routing=routing))
    # gates that send each prompt to its own expert, decisively (top-2 probabilities >= 0.3 apart): the route is a
    # decision that float rounding cannot flip, and a route re-decided from generated tokens would change it
    calibrate_gates(moe, enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1, 2]), scale=4.0)
    routes: list[dict[int, torch.Tensor]] = []  # per forward: layer -> the [3, N] route probabilities it used
    hooks = [b.register_forward_hook(lambda m, a, o: _record_route(routes, m)) for b in moe.moe_blocks()]
    kw = dict(max_new_tokens=6, do_sample=False)
    cached, cached_trace = _generate_traced(moe, enc, **kw)
    cached_routes, routes[:] = list(routes), []
    uncached, uncached_trace = _generate_traced(moe, enc, routing_mask=enc["attention_mask"], use_cache=False, **kw)
    uncached_routes = list(routes)
    for h in hooks:
        h.remove()
    prefill = cached_routes[0]
    for layer, probs in prefill.items():
        assert probs.argmax(-1).tolist() == [0, 1, 2]
        top = probs.topk(2, dim=-1).values
        assert (top[:, 0] - top[:, 1]).min() > 0.3
    width = enc["input_ids"].shape[1]
    assert len(cached_routes) == cached.sequences.shape[1] - width  # one forward per new token
    assert len(uncached_routes) == uncached.sequences.shape[1] - width
    for step in cached_routes[1:]:  # decoding steps reuse the prefill's decision itself
        assert all(torch.equal(step[layer], prefill[layer]) for layer in prefill)
    for step in uncached_routes:  # recomputed from the prompt inside longer sequences: equal to rounding
        for layer in prefill:
            assert_close(step[layer], prefill[layer], rtol=1e-5, atol=1e-6)
    same = assert_same_decoding(cached_trace, uncached_trace)
    assert same.compared >= 3 * 2
    for row in set(range(3)) - same.diverged:
        assert torch.equal(cached.sequences[row], uncached.sequences[row])
    with torch.no_grad():  # padding does not vote: a padded row routes like the same prompt alone
        full = moe(**enc).logits
        alone = moe(**tok(PROMPTS[1:2], return_tensors="pt")).logits
    n = alone.shape[1]
    assert_close(full[1, -n:], alone[0], rtol=1e-4, atol=1e-4)


def _record_route(routes: list, block) -> None:
    if block.layer_index == 0:
        routes.append({})
    routes[-1][block.layer_index] = block.context.sequence_probs[block.layer_index].clone()


# =================================================================================================== training
def test_token_routing_aux_loss_and_gradients(llama):
    dense, tok = llama
    enc = _batch(tok)
    moe = _distinct_experts(moe_from_dense(dense, 4, routing="token", aux_loss_coef=0.1))
    moe.train()
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    out = moe(**enc, labels=labels, use_cache=False, output_router_logits=True)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) >= 1.0 - 1e-5  # 1 = perfectly balanced
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (enc["input_ids"].numel(), 4)
    plain = moe.lm(**enc, labels=labels, use_cache=False).loss  # the LM loss alone (same routing)
    assert_close(out.loss, plain + 0.1 * out.aux_loss)
    out.loss.backward()
    for block in moe.moe_blocks():
        assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
    moe.eval()
    with torch.no_grad():
        assert moe(**enc).aux_loss is None  # not computed for inference


def test_hard_sequence_gate_learns_through_straight_through(llama):
    dense, tok = llama
    enc = _batch(tok)
    moe = _distinct_experts(moe_from_dense(dense, 3, routing="hard-sequence"))
    with torch.no_grad():
        inference = moe(**enc).logits
    out = moe(**enc, use_cache=False)
    assert_close(out.logits, inference, rtol=0, atol=0)  # the straight-through weight is exactly 1 in value
    out.logits.logsumexp(-1).mean().backward()
    assert all(b.gate.weight.grad is not None and b.gate.weight.grad.abs().sum() > 0 for b in moe.moe_blocks())


def test_domain_routing_trains_experts_not_gates_and_survives_checkpointing(llama):
    dense, tok = llama
    enc = _batch(tok)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    domains = torch.tensor([1, 0, 1])
    grads = []
    for checkpointing in (False, True):
        moe = _distinct_experts(moe_from_dense(dense, 2, routing="domain"))
        moe.train()
        for m in moe.modules():  # dropout off: compare the two runs exactly
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if checkpointing:
            moe.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in moe.lm.model.layers)
        moe(**enc, labels=labels, domain_labels=domains, use_cache=False).loss.backward()
        blocks = moe.moe_blocks()
        assert all(b.gate.weight.grad is None for b in blocks)
        grads.append([p.grad.clone() for b in blocks for p in b.experts.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        assert_close(a, b)


def test_load_balancing_loss_bounds():
    n = 4
    balanced = torch.eye(n).repeat(8, 1) * 20  # each expert wins a quarter of the tokens, sharply
    collapsed = torch.zeros(32, n)
    collapsed[:, 0] = 20
    assert_close(load_balancing_loss([balanced], top_k=1), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert_close(load_balancing_loss([collapsed], top_k=1), torch.tensor(float(n)), atol=1e-4, rtol=0)
    mask = torch.zeros(32, dtype=torch.bool)
    mask[:8] = True  # only the first 8 tokens are real: 2 per expert -> balanced
    assert_close(load_balancing_loss([balanced], top_k=1, token_mask=mask), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_moe_block_shapes_and_policy_switch(llama):
    dense, tok = llama
    moe = moe_from_dense(dense, 3, routing="domain")
    blocks = moe.moe_blocks()
    assert len(blocks) == 2 and all(isinstance(b, MoEFeedForward) for b in blocks)
    assert blocks[0].gate.weight.shape == (3, 64)
    moe.set_routing("token", top_k=1)
    assert moe.config.routing == "token" and moe.config.num_experts_per_tok == 1
    assert all(b.routing == "token" and b.top_k == 1 for b in blocks)
    with pytest.raises(ValueError, match="routing must be one of"):
        moe.set_routing("expert-choice")


# =================================================================================================== import cost
def test_import_and_install_stay_light():
    code = textwrap.dedent("""
        import sys
        import lm_lexicon, lm_lexicon.moe
        from lm_lexicon.moe import hf_registration
        hf_registration.install()
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not heavy, heavy
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        assert "lm_lexicon_moe" in CONFIG_MAPPING, "config not registered after transformers' Auto import"
        assert "lm_lexicon.moe.model" not in sys.modules  # the model class waits for a config to be built
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# =================================================================================================== fine-tune plumbing
def test_routing_inputs_feed_code_that_does_not_know_about_routing(llama):
    from lm_lexicon.train import collate, definition_nll, encode_example

    dense, tok = llama
    moe = _distinct_experts(moe_from_dense(dense, 2, routing="domain"))
    batch = collate([encode_example(tok, p, "a definition", 64) for p in PROMPTS], tok.pad_token_id)
    domains = torch.tensor([1, 0, 1])
    with torch.no_grad():
        with moe.routing_inputs(domain_labels=domains):
            nll, n = definition_nll(moe, batch)
        logits = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], domain_labels=domains).logits
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum")
    assert n == int(keep.sum()) and n > 0
    assert_close(nll, expected, rtol=1e-5, atol=1e-4)
    assert moe._default_routing_inputs is None  # restored after the block


@pytest.mark.parametrize("routing,gates", [("domain", False), ("token", True)])
def test_set_trainable_freezes_all_but_experts_and_used_gates(llama, routing, gates):
    dense, _ = llama
    moe = moe_from_dense(dense, 2, routing=routing)
    n = moe.set_trainable()
    trainable = {name for name, p in moe.named_parameters() if p.requires_grad}
    assert all(".experts." in name or ".gate." in name for name in trainable)
    assert any(".gate." in name for name in trainable) == gates
    assert n == sum(p.numel() for name, p in moe.named_parameters() if name in trainable)


def test_save_pretrained_round_trip(llama, tmp_path):
    from lm_lexicon.moe import load

    dense, tok = llama
    moe = _distinct_experts(moe_from_dense(dense, 2, routing="token", top_k=1))
    moe.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.router is None and loaded.model.config.num_experts_per_tok == 1
    enc = _batch(tok)
    with torch.no_grad():
        assert_close(loaded.model(**enc).logits, moe(**enc).logits, rtol=0, atol=0)


def test_calibrate_gates_routes_like_the_domains(llama):
    from lm_lexicon.moe import calibrate_gates

    dense, _ = llama
    moe = moe_from_dense(dense, 2, routing="hard-sequence")
    g = torch.Generator().manual_seed(0)
    # two "domains", each written with its own small vocabulary
    ids = torch.cat([torch.randint(1000, 1008, (4, 12), generator=g), torch.randint(20000, 20008, (4, 12), generator=g)])
    mask = torch.ones_like(ids)
    labels = torch.tensor([0] * 4 + [1] * 4)
    calibrate_gates(moe, ids, mask, labels)
    assert moe.config.routing == "hard-sequence"  # restored
    with torch.no_grad():
        moe(input_ids=ids, attention_mask=mask)
    for layer, probs in moe.routing_context.sequence_probs.items():
        assert torch.equal(probs.argmax(-1), labels), layer
