"""GGUF export (lm_lexicon.moe.gguf, lm_lexicon.moe.gguf_bundle) and the GGUF runtime's decoding rules.

Two tiny Llama experts (2 layers, hidden 64) with SmolLM2's real tokenizer (taken from the seed's GGUF, a few
seconds) are merged and collapsed as the pipeline does, saved in bfloat16 like the real experts, and exported. The
round trip reads every file back with the ``gguf`` reader; transformers' own GGUF loader is the independent check
that the file is a llama.cpp-layout Llama (tensor names, RoPE row order, hyper-parameters). llama.cpp itself runs in
the slow suite (tests/test_gguf_llama_cpp.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from typer.testing import CliRunner

from lm_lexicon.data.prompts import PromptTemplates, parse_templates
from lm_lexicon.moe import export_collapsed
from lm_lexicon.moe.gguf import (RAW_CHAT_TEMPLATE, GGUFExportError, check_llama, read_gguf_metadata,
                                 read_gguf_tensors, rope_rows_from_gguf, rope_rows_to_gguf, write_gguf)
from lm_lexicon.moe.gguf_bundle import GGUF_MANIFEST, export_gguf, load_manifest
from lm_lexicon.moe.merge import SafetensorsCheckpoint, merge_experts, read_config
from lm_lexicon.partition.routing import DomainRouter
from lm_lexicon.seed_models import causal_bert_tokenizer, smollm2_gguf_path, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N = 2
CUSTOM_TEMPLATES = {"en": {"context": 'Context: {context}. Define "{term}".'}}


def _to_bf16(directory: Path) -> Path:
    """Store a checkpoint in bfloat16, as the pipeline exports experts."""
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(directory / "model.safetensors")).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def source_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2_tokenizer(source_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source_gguf.parent), gguf_file=source_gguf.name, local_files_only=True)


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory, smollm2_tokenizer, perturb_weights) -> Path:
    """A collapsed export of a domain-routed MoE of two tiny bf16 experts, with its router; the experts were trained
    with a custom English template (saved with them), which the merge and the export carry on."""
    root = tmp_path_factory.mktemp("gguf")
    experts = [_to_bf16(perturb_weights(tiny_llama(root / f"expert-{i}", tokenizer=smollm2_tokenizer, seed=i),
                                        10 + i, 0.05)) for i in range(N)]
    for e in experts:
        parse_templates(CUSTOM_TEMPLATES).save(e)
    router = DomainRouter(np.random.default_rng(0).normal(size=(N, 8)).astype(np.float32),
                          meta={"embedder": {"model_id": "test-embedder", "kind": "Embedder"}})
    moe = merge_experts(experts, root / "moe", router=router, seed=0)
    return export_collapsed(moe, root / "collapsed")


@pytest.fixture(scope="module")
def domain0(collapsed) -> Path:
    return collapsed / "domain-0"


@pytest.fixture(scope="module")
def bf16_file(domain0, source_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-files") / "domain-0.bf16.gguf"
    write_gguf(domain0, out, metadata_source=source_gguf, dtype="bf16", name="test domain 0")
    return out


# =================================================================================================== round trip
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_round_trip_names_shapes_values(domain0, source_gguf, bf16_file, tmp_path, dtype):
    """Every tensor comes back under its name, with its shape; bf16 and f32 files hold the bf16 checkpoint exactly
    (a copy), f16 within float16's rounding of bf16 values (exact in its normal range, 2^-25 below)."""
    path = bf16_file if dtype == "bf16" else tmp_path / f"d0.{dtype}.gguf"
    if dtype != "bf16":
        write_gguf(domain0, path, metadata_source=source_gguf, dtype=dtype)
    config = read_config(domain0)
    ckpt = SafetensorsCheckpoint(domain0)
    back = read_gguf_tensors(path, config, ckpt.keys())
    assert config["tie_word_embeddings"] is False  # tiny_llama: an untied head, written as output.weight
    assert sorted(back) == sorted(ckpt.keys())
    for key in ckpt.keys():
        original = ckpt.get(key).float()
        assert back[key].shape == original.shape, key
        if dtype == "f16" and original.ndim == 2:
            assert_close(back[key], original, rtol=0, atol=2 ** -24, msg=key)
        else:
            assert torch.equal(back[key], original), key


def test_layout_is_llama_cpp(bf16_file, domain0):
    """llama.cpp's tensor names, GGUF's reversed dimension order, f32 norms, and the q/k rows interleaved for
    llama.cpp's RoPE: row i of each head's first half lands at 2i, row i of its second half at 2i + 1."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(bf16_file)).tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(tensors) == expected
    ckpt = SafetensorsCheckpoint(domain0)
    assert list(tensors["token_embd.weight"].shape) == [64, 49152]  # ne[0] = columns
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "BF16"
    hf_k = ckpt.get("model.layers.1.self_attn.k_proj.weight").float()  # 2 KV heads of 16 dims
    stored_k = torch.from_numpy(np.array(dequantize(tensors["blk.1.attn_k.weight"].data, tensors[
        "blk.1.attn_k.weight"].tensor_type)))
    d = 16
    for head in range(2):
        for i in range(d // 2):
            assert torch.equal(stored_k[head * d + 2 * i], hf_k[head * d + i])
            assert torch.equal(stored_k[head * d + 2 * i + 1], hf_k[head * d + d // 2 + i])
    w = torch.randn(4 * 16, 8)
    assert torch.equal(rope_rows_from_gguf(rope_rows_to_gguf(w, 4), 4), w)


def test_transformers_reads_the_file_as_the_same_model(bf16_file, domain0):
    """transformers' GGUF loader (its own name map, RoPE un-permutation and hyper-parameter keys) gives the
    checkpoint's logits: the file is a Llama in llama.cpp's layout, not just something our reader understands."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    ids = torch.tensor([[12, 345, 6789, 1011, 40000, 7, 99]])
    hf = AutoModelForCausalLM.from_pretrained(str(domain0), dtype=torch.float32).eval()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from_gguf = AutoModelForCausalLM.from_pretrained(str(bf16_file.parent), gguf_file=bf16_file.name,
                                                         dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    with torch.no_grad():
        a, b = hf(ids).logits, from_gguf(ids).logits
    # the same float32 computation on the same (bf16-exact) weights: only summation-order noise
    assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_metadata(bf16_file, domain0, source_gguf):
    meta = read_gguf_metadata(bf16_file, keys=("tokenizer.ggml.tokens",))
    config = read_config(domain0)
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "test domain 0"
    assert meta["general.file_type"] == 32  # MOSTLY_BF16
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.feed_forward_length"] == 128
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert meta["llama.context_length"] == config["max_position_embeddings"]
    source = read_gguf_metadata(source_gguf, keys=("tokenizer.ggml.tokens",))
    assert meta["tokenizer.ggml.tokens"] == source["tokenizer.ggml.tokens"]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "general.license"):
        assert meta[key] == source[key], key
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the experts were trained without BOS
    assert meta["tokenizer.chat_template"] == RAW_CHAT_TEMPLATE


def test_refuses_another_vocabulary_and_non_llama(tmp_path, source_gguf):
    bert_vocab = tiny_llama(tmp_path / "bert-vocab", tokenizer=causal_bert_tokenizer())
    with pytest.raises(GGUFExportError, match="not a GGUF of the same base model"):
        write_gguf(bert_vocab, tmp_path / "x.gguf", metadata_source=source_gguf)
    assert not (tmp_path / "x.gguf").exists() or (tmp_path / "x.gguf").stat().st_size == 0
    with pytest.raises(GGUFExportError, match="model_type is 'bert'"):
        check_llama({"model_type": "bert"})
    with pytest.raises(GGUFExportError, match="RoPE scaling 'llama3'"):
        check_llama({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_gguf(bert_vocab, tmp_path / "y.gguf", metadata_source=source_gguf, dtype="q4")


# =================================================================================================== bundle
@pytest.fixture(scope="module")
def bundle(collapsed, source_gguf, tmp_path_factory) -> tuple[Path, dict]:
    """The GGUF bundle of the collapsed export (written once: each file carries SmolLM2's 49,152-token vocabulary)."""
    out = tmp_path_factory.mktemp("bundle") / "gguf"
    manifest = export_gguf(collapsed, out, metadata_source=source_gguf, generation={"max_new_tokens": 24},
                           evaluated_num_beams=4, log=lambda m: None)
    return out, manifest


def test_bundle(bundle, collapsed, source_gguf):
    out, manifest = bundle
    assert load_manifest(out) == manifest == json.loads((out / GGUF_MANIFEST).read_text())
    assert [d["file"] for d in manifest["domains"]] == ["domain-0.gguf", "domain-1.gguf"]
    assert all((out / d["file"]).stat().st_size == d["bytes"] > 0 for d in manifest["domains"])
    assert manifest["stop"] == ["<|im_end|>"] and manifest["add_bos"] is False
    assert manifest["prompt"]["templates"]["en"]["context"] == 'Context: {context}. Define "{term}".'
    assert manifest["prompt"]["overrides"] == {"en": {"context": 'Context: {context}. Define "{term}".',
                                                      "term_only": 'What is the definition of "{term}"?'}}
    assert PromptTemplates.load(out) == parse_templates(CUSTOM_TEMPLATES)  # the bundle carries them as a file too
    assert manifest["generation"] == {"max_new_tokens": 24, "repetition_penalty": 1.05, "no_repeat_ngram_size": 3}
    modelfile = (out / "domain-1.Modelfile").read_text()
    for line in ("FROM ./domain-1.gguf", 'TEMPLATE """{{ .Prompt }}"""', 'PARAMETER stop "<|im_end|>"',
                 "PARAMETER temperature 0", "PARAMETER num_predict 24", "PARAMETER repeat_penalty 1.05"):
        assert line in modelfile.splitlines(), line
    readme = (out / "README.md").read_text()
    assert 'Context: {context}. Define "{term}".' in readme and "ollama create" in readme and "untested" in readme
    assert manifest["evaluated_num_beams"] == 4 and "beam-searched (4 beams)" in readme  # the bundle stays greedy
    router = DomainRouter.load(out / "router")
    assert router.n_clusters == N
    # the two domains hold different experts: their FFN tensors differ, their shared tensors do not
    d0 = read_gguf_tensors(out / "domain-0.gguf", read_config(collapsed / "domain-0"),
                           SafetensorsCheckpoint(collapsed / "domain-0").keys())
    d1 = read_gguf_tensors(out / "domain-1.gguf", read_config(collapsed / "domain-1"),
                           SafetensorsCheckpoint(collapsed / "domain-1").keys())
    assert not torch.equal(d0["model.layers.0.mlp.up_proj.weight"], d1["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(d0["model.layers.0.self_attn.q_proj.weight"], d1["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(FileExistsError):
        export_gguf(collapsed, out, metadata_source=source_gguf, log=lambda m: None)


def test_metadata_source_of_a_run(tmp_path):
    from lm_lexicon.config import load_config
    from lm_lexicon.moe.stage import export_gguf_files, gguf_metadata_source

    assert gguf_metadata_source(load_config(None, [])) == smollm2_gguf_path()  # bundled-smollm2: its own GGUF
    other = load_config(None, [f"seed_model.name={tmp_path}"])
    with pytest.raises(ValueError, match="--gguf-metadata"):
        gguf_metadata_source(other)
    with pytest.raises(FileNotFoundError, match="no such file"):
        gguf_metadata_source(other, tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="routes by 'token'"):
        export_gguf_files(load_config(None, ["merge.routing=token"]), tmp_path)


# =================================================================================================== runtime rules
def test_decoding_rules_match_transformers():
    """The GGUF runtime's repetition penalty and no-repeat-n-gram rule are Hugging Face's processors (the
    pipeline's greedy decoding), applied to numpy logits."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from lm_lexicon.serving.gguf_runtime import banned_by_ngrams, penalise_repeats

    rng = np.random.default_rng(0)
    prompt, generated = [5, 9, 9, 3], [7, 8, 5, 7, 8, 2, 7, 8]
    logits = rng.normal(size=50).astype(np.float32)
    ids = torch.tensor([prompt + generated])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, torch.from_numpy(logits.copy())[None])[0].numpy()
    assert np.allclose(penalise_repeats(logits.copy(), prompt + generated, 1.3), expected)
    for n in (2, 3):
        hf_banned = NoRepeatNGramLogitsProcessor(n)(torch.tensor([generated]), torch.zeros(1, 50))[0]
        assert sorted(set(banned_by_ngrams(generated, n))) == torch.nonzero(torch.isinf(hf_banned)).flatten().tolist()
    assert sorted(set(banned_by_ngrams(generated, 3))) == [2, 5]  # what followed "7 8" before
    assert banned_by_ngrams([1, 2], 3) == [] and banned_by_ngrams([4, 4, 4], 0) == []


# =================================================================================================== CLI
def test_define_gguf_backend_errors(tmp_path, monkeypatch, bundle):
    from lm_lexicon.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["define", "bank", "--backend", "gguf"])
    assert res.exit_code == 2 and "--export-dir" in res.output
    res = runner.invoke(app, ["define", "bank", "--backend", "gguf", "--export-dir", str(tmp_path)])
    assert res.exit_code == 2 and "gguf.json" in res.output and "lm-lexicon export --format gguf" in res.output
    res = runner.invoke(app, ["define", "bank", "--backend", "nope"])
    assert res.exit_code == 2 and "unknown --backend" in res.output
    bundle_dir, _ = bundle
    res = runner.invoke(app, ["define", "bank", "--backend", "gguf", "--export-dir", str(bundle_dir), "--n", "4"])
    assert res.exit_code == 2 and "greedily" in res.output
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    res = runner.invoke(app, ["define", "bank", "--backend", "gguf", "--export-dir", str(bundle_dir)])
    assert res.exit_code == 2 and "llama-cpp-python" in res.output and "pip install" in res.output
