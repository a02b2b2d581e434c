"""Merging experts into an MoE checkpoint, loading it, and exporting it (lm_lexicon.moe.merge / model.load / export).

Three tiny Llama experts (2 layers, hidden 64, different random weights) and two 1-layer MiniLM decoders stand in
for fine-tuned experts; everything is fp32 on CPU and written to tmp dirs.
"""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from lm_lexicon.moe import export_collapsed, export_mixtral, load
from lm_lexicon.moe.merge import ExpertMismatchError, merge_experts
from lm_lexicon.partition.routing import DomainRouter
from lm_lexicon.seed_models import build_minilm_decoder, causal_bert_tokenizer, tiny_llama
from score_trace import ScoreTrace, assert_same_decoding

N = 3
HIDDEN = 64
PROMPTS = ['"a dog barks at night" What is the definition of "bark"?', "a cat", "the quick brown fox jumps over"]


# one torch thread: another process may hold the other core (two OpenMP threads then wait on each other)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="module")
def experts(root, perturb_weights) -> list[Path]:
    tokenizer = causal_bert_tokenizer()
    return [perturb_weights(tiny_llama(root / f"expert-{i}", tokenizer=tokenizer, seed=i), 100 + i, 0.02)
            for i in range(N)]


@pytest.fixture(scope="module")
def router() -> DomainRouter:
    return DomainRouter(np.random.default_rng(0).normal(size=(N, HIDDEN)).astype(np.float32),
                        meta={"embedder": {"model_id": "test-embedder", "kind": "Embedder"}})


@pytest.fixture(scope="module")
def merged(root, experts, router) -> Path:
    return merge_experts(experts, root / "moe-domain", router=router, seed=7)


@pytest.fixture(scope="module")
def loaded(merged):
    return load(merged)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _batch(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


# =================================================================================================== merge
def test_merged_tensors_are_experts_and_exact_means(merged, experts):
    moe = _tensors(merged)
    sources = [load_file(str(e / "model.safetensors")) for e in experts]
    n_ffn = n_shared = 0
    for key in sources[0]:
        parts = key.split(".")
        if key.startswith("model.layers.") and parts[3] == "mlp":  # model.layers.{l}.mlp.{proj}.weight
            for i, src in enumerate(sources):
                expert_key = f"lm.model.layers.{parts[2]}.mlp.experts.{i}.{parts[4]}.{parts[5]}"
                assert torch.equal(moe[expert_key], src[key])
            n_ffn += 1
        else:
            expected = (sum(s[key].double() for s in sources) / N).to(sources[0][key].dtype)
            assert torch.equal(moe["lm." + key], expected), key
            assert not torch.equal(moe["lm." + key], sources[0][key])  # really averaged
            n_shared += 1
    gates = sorted(k for k in moe if k.endswith("mlp.gate.weight"))
    assert gates == ["lm.model.layers.0.mlp.gate.weight", "lm.model.layers.1.mlp.gate.weight"]
    assert all(moe[g].shape == (N, HIDDEN) for g in gates)
    assert (n_ffn, n_shared) == (6, 15)  # 2 layers x 3 projections; embed, head, norm + 2 x (4 attn + 2 norms)
    assert len(moe) == n_shared + N * n_ffn + len(gates)
    # sizes: shared once, FFN N times, plus the gates (fp32)
    src_bytes = {k: v.numel() * 4 for k, v in sources[0].items()}
    ffn_bytes = sum(b for k, b in src_bytes.items() if ".mlp." in k)
    expected_bytes = sum(src_bytes.values()) - ffn_bytes + N * ffn_bytes + 2 * N * HIDDEN * 4
    assert sum(v.numel() * v.element_size() for v in moe.values()) == expected_bytes


def test_merge_config_records_experts_policy_router_and_seed(merged, experts):
    raw = json.loads((merged / "config.json").read_text())
    assert raw["model_type"] == "lm_lexicon_moe" and raw["architectures"] == ["LexiconMoEForCausalLM"]
    assert raw["text_config"]["model_type"] == "llama" and raw["text_config"]["hidden_size"] == HIDDEN
    section = raw["lm_lexicon_moe"]
    assert section["n_experts"] == N and section["routing"] == "domain" and section["top_k"] == 2
    assert section["ffn_spec"] == "llama" and section["seed"] == 7
    assert [e["source"] for e in section["experts"]] == [str(e.resolve()) for e in experts]
    assert section["router_dir"] == "router" and section["centroids_file"] == "router/router.safetensors"
    assert section["embedder"]["model_id"] == "test-embedder"
    assert section["gate_init_effective"] == "centroids"
    assert section["tensors"] == {"shared": 15, "expert": 18, "gate": 2}
    assert (merged / "router" / "router.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not list(merged.glob("*.bin"))


def test_gate_init_from_centroids_or_seeded_random(merged, root, experts, router):
    moe = _tensors(merged)
    centroids = torch.from_numpy(router.centroids)
    assert_close(moe["lm.model.layers.0.mlp.gate.weight"], centroids / HIDDEN ** 0.5, rtol=0, atol=0)
    # centroids in another space (dim 32 != hidden 64) cannot seed the gate: seeded random instead, and said so
    other = DomainRouter(np.random.default_rng(1).normal(size=(N, 32)).astype(np.float32))
    a = merge_experts(experts, root / "gates-a", router=other, seed=3)
    b = merge_experts(experts, root / "gates-b", gate_init="random", seed=3)
    ga, gb = _tensors(a)["lm.model.layers.1.mlp.gate.weight"], _tensors(b)["lm.model.layers.1.mlp.gate.weight"]
    assert torch.equal(ga, gb) and 0.005 < float(ga.std()) < 0.05  # N(0, 0.02), reproducible from the seed
    note = json.loads((a / "config.json").read_text())["lm_lexicon_moe"]["gate_init_effective"]
    assert note.startswith("random (centroid dim 32")


def test_merge_takes_the_merge_config_fields(root, experts, router):
    from lm_lexicon.config import MergeConfig

    cfg = MergeConfig(routing="hard-sequence", top_k=1, gate_init="random", aux_loss_coef=0.05)
    out = merge_experts(experts, root / "from-config", router=router, **cfg.model_dump())
    section = json.loads((out / "config.json").read_text())["lm_lexicon_moe"]
    assert (section["routing"], section["top_k"], section["gate_init"], section["aux_loss_coef"]) == \
        ("hard-sequence", 1, "random", 0.05)
    assert load(out).model.moe_blocks()[0].routing == "hard-sequence"


def test_sharded_merge_loads_the_same_model(root, experts, loaded):
    sharded = merge_experts(experts, root / "moe-sharded", seed=7, max_shard_size="4MB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 2
    model = load(sharded).model
    enc = _batch(loaded.tokenizer)
    with torch.no_grad():
        assert_close(model(**enc, domain_labels=1).logits, loaded.model(**enc, domain_labels=1).logits, rtol=0, atol=0)


# =================================================================================================== validation
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_merge_refuses_mismatched_experts(root, experts, router):
    bad = root / "bad"
    bad.mkdir()
    # a different architecture
    other = tiny_llama(bad / "wide", tokenizer=causal_bert_tokenizer(), seed=5)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExpertMismatchError, match=r"expert 1 .*different architecture.*intermediate_size: 128 != 256"):
        merge_experts([experts[0], other], bad / "out")
    # same config, a tensor missing
    missing = _copy(experts[1], bad / "missing")
    t = load_file(str(missing / "model.safetensors"))
    del t["model.layers.1.self_attn.q_proj.weight"]
    save_file(t, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExpertMismatchError, match=r"different tensor names.*model\.layers\.1\.self_attn\.q_proj"):
        merge_experts([experts[0], missing], bad / "out")
    # same names, a different shape
    shaped = _copy(experts[1], bad / "shaped")
    t = load_file(str(shaped / "model.safetensors"))
    t["model.norm.weight"] = torch.ones(HIDDEN + 1)
    save_file(t, str(shaped / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExpertMismatchError, match=r"different tensor shapes.*model\.norm\.weight: \(64,\) != \(65,\)"):
        merge_experts([experts[0], shaped], bad / "out")
    # same shapes, a different dtype
    typed = _copy(experts[1], bad / "typed")
    t = load_file(str(typed / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.bfloat16)
    save_file(t, str(typed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExpertMismatchError, match="different tensor dtypes"):
        merge_experts([experts[0], typed], bad / "out")
    # one centroid per expert
    with pytest.raises(ExpertMismatchError, match="router has 3 domains but 2 experts"):
        merge_experts(experts[:2], bad / "out", router=router)
    # pickled weights are never read
    pickled = _copy(experts[1], bad / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickled weights"):
        merge_experts([experts[0], pickled], bad / "out")
    assert not (bad / "out").exists()  # nothing half-written
    with pytest.raises(FileExistsError):
        merge_experts(experts, root / "moe-domain")


def test_the_experts_prompt_templates_travel_through_merge_and_exports(root, experts, router):
    """Experts trained with custom templates (saved with them): the MoE, its router and every export carry them;
    experts trained with different templates are not merged."""
    from lm_lexicon.data.prompts import PromptTemplates, parse_templates

    custom = parse_templates({"en": {"context": 'Context: {context}. Define "{term}".'}, "es": "¿Qué es '{term}'?"})
    work = root / "templated"
    mine = [_copy(e, work / e.name) for e in experts]
    for e in mine:
        custom.save(e)
    moe = merge_experts(mine, work / "moe", router=router, seed=7)
    token_moe = merge_experts(mine, work / "moe-token", routing="token", gate_init="random", seed=1)
    collapsed = export_collapsed(moe, work / "collapsed")
    mixtral = export_mixtral(token_moe, work / "mixtral")
    for d in (moe, moe / "router", collapsed / "domain-0", collapsed / f"domain-{N - 1}", collapsed / "router",
              mixtral):
        assert PromptTemplates.load(d) == custom, d
    assert PromptTemplates.load(experts[0]) == PromptTemplates()  # no file (an external checkpoint): the defaults
    PromptTemplates().save(mine[1])  # one expert trained with the default templates, the other with custom ones
    with pytest.raises(ExpertMismatchError, match="other prompt templates"):
        merge_experts(mine, work / "refused")
    assert not (work / "refused").exists()


# =================================================================================================== loading
def test_load_returns_model_tokenizer_router(loaded, router):
    assert type(loaded.model).__name__ == "LexiconMoEForCausalLM" and not loaded.model.training
    assert loaded.model.config.n_experts == N and loaded.model.config.routing == "domain"
    np.testing.assert_array_equal(loaded.router.centroids, router.centroids)
    assert loaded.tokenizer.padding_side == "left"


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(__import__("tempfile").gettempdir()) / "lm_lexicon_moe_unpickled",))


def test_loading_never_unpickles(merged, root):
    marker = Path(__import__("tempfile").gettempdir()) / "lm_lexicon_moe_unpickled"
    marker.unlink(missing_ok=True)
    trap = _copy(merged, root / "trap")
    for f in trap.glob("model*.safetensors"):
        f.unlink()
    (trap / "pytorch_model.bin").write_bytes(pickle.dumps({"lm.model.norm.weight": _Boom()}))
    with pytest.raises(Exception):
        load(trap)
    assert not marker.exists()


def test_auto_model_for_causal_lm_loads_the_moe_after_import_lm_lexicon(merged):
    code = textwrap.dedent(f"""
        import lm_lexicon
        from lm_lexicon.moe import hf_registration
        hf_registration.install()  # what `import lm_lexicon` does (lm_lexicon/__init__.py)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(merged)!r})
        print(type(model).__name__, model.config.n_experts)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["LexiconMoEForCausalLM", str(N)]


# =================================================================================================== collapse
@pytest.fixture(scope="module")
def collapsed(merged, root) -> Path:
    return export_collapsed(merged, root / "collapsed")


def test_collapsed_layout_needs_no_project_code(collapsed, router):
    manifest = json.loads((collapsed / "collapsed.json").read_text())
    assert manifest["format"] == "lm-lexicon-collapsed" and manifest["n_domains"] == N
    assert [d["path"] for d in manifest["domains"]] == [f"domain-{i}" for i in range(N)]
    assert manifest["embedder"]["model_id"] == "test-embedder"
    np.testing.assert_array_equal(DomainRouter.load(collapsed / manifest["router_dir"]).centroids, router.centroids)
    cfg = json.loads((collapsed / "domain-0" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "lm_lexicon" not in json.dumps(cfg)
    with safe_open(str(collapsed / "domain-0" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.weight" in keys and not any("experts" in k or "gate.weight" in k for k in keys)


def test_domain_routing_equals_collapsed_dense(loaded, collapsed, experts):
    enc = _batch(loaded.tokenizer)
    labels = torch.tensor([2, 0, 1])  # every expert gets a row
    with torch.no_grad():
        mixed = loaded.model(**enc, domain_labels=labels).logits
        for i in range(N):
            dense = AutoModelForCausalLM.from_pretrained(collapsed / f"domain-{i}").eval()
            assert type(dense).__name__ == "LlamaForCausalLM"
            expected = dense(**enc).logits
            # one label for the batch: expert i on the whole batch, the dense model's kernels exactly
            assert_close(loaded.model(**enc, domain_labels=i).logits, expected, rtol=0, atol=0)
            # a mixed batch runs expert i on its row alone (another matmul shape): equal to float rounding
            rows = labels == i
            assert_close(mixed[rows], expected[rows], rtol=1e-5, atol=1e-5)
            # the collapsed model's FFN is expert i's own
            src = load_file(str(experts[i] / "model.safetensors"))
            assert torch.equal(dense.model.layers[1].mlp.down_proj.weight, src["model.layers.1.mlp.down_proj.weight"])


def _generate_traced(model, enc, **kw):
    """Greedy generation recording its scores (tests/score_trace.py): two implementations of one function agree to
    float rounding, so their tokens are compared only where no near tie was decided differently."""
    trace = ScoreTrace([model.generation_config.eos_token_id])
    out = model.generate(**enc, logits_processor=trace.processors(range(enc["input_ids"].shape[0]),
                                                                  enc["input_ids"].shape[1]), **kw)
    return out, trace


def test_generate_mixed_domains_equals_collapsed_dense(loaded, collapsed):
    enc = _batch(loaded.tokenizer)
    labels = torch.tensor([1, 2, 0])
    kw = dict(max_new_tokens=8, do_sample=False)
    mixed, mixed_trace = _generate_traced(loaded.model, enc, domain_labels=labels, **kw)
    for i in range(N):
        dense = AutoModelForCausalLM.from_pretrained(collapsed / f"domain-{i}").eval()
        row = int((labels == i).nonzero())
        alone, dense_trace = _generate_traced(dense, enc, **kw)
        same = assert_same_decoding(mixed_trace, dense_trace, rows=[row])
        if row not in same.diverged:
            assert torch.equal(mixed[row], alone[row])


# =================================================================================================== mixtral
def test_mixtral_export_equals_token_routed_moe(root, experts):
    moe_dir = merge_experts(experts, root / "moe-token", routing="token", top_k=2, gate_init="random", seed=1)
    ours = load(moe_dir)
    out = export_mixtral(moe_dir, root / "mixtral")
    mixtral = MixtralForCausalLM.from_pretrained(out).eval()
    assert mixtral.config.num_local_experts == N and mixtral.config.num_experts_per_tok == 2
    enc = _batch(ours.tokenizer)
    kw = dict(max_new_tokens=6, do_sample=False)
    mixtral.generation_config.pad_token_id = ours.tokenizer.pad_token_id
    generated, ours_trace = _generate_traced(ours.model, enc, **kw)
    with torch.no_grad():
        assert_close(mixtral(**enc).logits, ours.model(**enc).logits, rtol=1e-5, atol=1e-5)
        # Token routing picks 2 of 3 experts per token: a near tie between the 2nd and 3rd gate logit would be decided
        # by float rounding. This fixture's 2nd and 3rd are >= 1e-4 apart (4.6e-4 measured) at every real token of the
        # prompts and of what they generate, 1000x the ~1e-7 by which two implementations round gate logits below
        # 0.5: the comparisons of the two models are not comparisons of ties.
        mask = torch.cat([enc["attention_mask"], torch.ones_like(generated[:, enc["input_ids"].shape[1]:])], dim=1)
        router_logits = ours.model(input_ids=generated, attention_mask=mask, output_router_logits=True).router_logits
    for layer in router_logits:
        top = layer[mask.reshape(-1).bool()].topk(3, dim=-1).values
        assert (top[:, 1] - top[:, 2]).min() > 1e-4
    theirs, mixtral_trace = _generate_traced(mixtral, enc, **kw)
    same = assert_same_decoding(ours_trace, mixtral_trace)
    for row in set(range(3)) - same.diverged:
        assert torch.equal(generated[row], theirs[row])


def test_mixtral_export_refuses_other_policies_and_families(merged, root, bert_moe):
    with pytest.raises(ValueError, match="routes by 'domain'"):
        export_mixtral(merged, root / "no-mixtral")
    with pytest.raises(ValueError, match="cannot export as Mixtral"):
        export_mixtral(bert_moe, root / "no-mixtral", force_policy=True)
    assert not (root / "no-mixtral").exists()


# =================================================================================================== MiniLM decoder
@pytest.fixture(scope="module")
def bert_moe(root, perturb_weights) -> Path:
    first = build_minilm_decoder(root / "bert-0", num_hidden_layers=1)
    second = perturb_weights(_copy(first, root / "bert-1"), 0, 0.02)
    return merge_experts([first, second], root / "bert-moe", routing="domain")


def test_minilm_decoder_merge_keeps_layernorm_shared_and_collapses_exactly(bert_moe, root):
    moe = _tensors(bert_moe)
    assert "lm.bert.encoder.layer.0.output.LayerNorm.weight" in moe  # shared, averaged
    assert "lm.bert.encoder.layer.0.intermediate.experts.1.output.dense.weight" in moe
    assert "lm.bert.encoder.layer.0.output.dense.weight" not in moe
    loaded = load(bert_moe)
    lm = loaded.model.lm
    assert lm.cls.predictions.decoder.weight.data_ptr() == lm.bert.embeddings.word_embeddings.weight.data_ptr()
    out = export_collapsed(bert_moe, root / "bert-collapsed")
    enc = _batch(loaded.tokenizer)
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        mixed = loaded.model(**enc, domain_labels=labels).logits
        for i in range(2):
            dense = AutoModelForCausalLM.from_pretrained(out / f"domain-{i}").eval()
            assert type(dense).__name__ == "BertLMHeadModel"
            expected = dense(**enc).logits
            assert_close(loaded.model(**enc, domain_labels=i).logits, expected, rtol=0, atol=0)  # the same kernels
            # a mixed batch runs each expert on its rows only (another matmul shape); logits reach ~30
            rows = labels == i
            assert_close(mixed[rows], expected[rows], rtol=1e-5, atol=1e-4)
