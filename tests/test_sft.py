"""SFT core: label masking, truncation, length bucketing, short real training runs, resume, early stopping.

Everything runs offline on CPU with tiny models built from the bundled MiniLM files: a 2-layer Llama with the BERT
vocabulary (the production Llama code path) and a 2-layer MiniLM decoder (the default seed's code path).
"""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch

from lm_lexicon.config import TrainConfig
from lm_lexicon.data.records import Record
from lm_lexicon.seed_models import (SEED_MINILM_DECODER, STAMP_FILE, build_minilm_decoder, causal_bert_tokenizer,
                                    load_causal_lm, resolve_seed_model, tiny_llama)
from lm_lexicon.train import (IGNORE_INDEX, LengthBucketBatchSampler, collate, cpu_supports_bf16, encode_example,
                              encode_prompt, evaluate_loss, lr_factor, read_trainer_state, record_prompt, train)
from score_trace import ScoreTrace, assert_same_decoding

ROWS = [
    ("bank", "we sat on the bank of the river", "sloping land beside a body of water"),
    ("bank", "she deposited the cheque at the bank", "a financial institution that accepts deposits"),
    ("run", "he can run a mile in five minutes", "move fast by using the legs"),
    ("bright", "a bright light shone through the window", "emitting or reflecting much light"),
    ("cat", "the cat slept on the warm mat", "a small domesticated feline animal"),
    ("river", "the river flooded the valley", "a large natural stream of flowing water"),
    ("teacher", "the teacher graded the exams", "a person whose occupation is teaching"),
    ("quickly", "she answered quickly and left", "with rapid movement or in a short time"),
    ("apple", "he ate a red apple for lunch", "fruit with red or yellow or green skin and crisp flesh"),
    ("bridge", "they crossed the old stone bridge", "a structure that allows people to cross a river or road"),
    ("happy", "the children were happy at the fair", "enjoying or showing joy or pleasure"),
    ("window", "open the window to let in air", "an opening in a wall that admits light and air"),
    ("music", "music filled the small room", "an artistic form of auditory communication"),
    ("cold", "the night was cold and clear", "having a low temperature"),
    ("write", "please write your name here", "produce a text by marking letters on a surface"),
    ("garden", "tomatoes grow in her garden", "a plot of ground where plants are cultivated"),
]


def _records(rows=ROWS, split="train") -> list[Record]:
    return [Record(term=t, context=c, definition=d, source="test", split=split) for t, c, d in rows]


def _cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=4, batch_size=8, lr=3e-3, warmup_ratio=0.0, dropout=0.0, eval_every=100,
                precision="fp32", max_length=64, seeds=[0])
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine two OpenMP threads spin-wait on each
    other (measured: the file took 64 s with 2 threads next to one busy process, 9 s with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tok():
    return causal_bert_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama", tok)


@pytest.fixture(scope="module")
def minilm2_dir(tmp_path_factory) -> Path:
    return build_minilm_decoder(tmp_path_factory.mktemp("minilm") / "minilm-2l", num_hidden_layers=2)


# ------------------------------------------------------------------------------------------------ tokenisation
def test_labels_mask_prompt_and_padding_and_keep_definition_plus_eos(tok):
    prompt = record_prompt(_records()[0])
    example = encode_example(tok, prompt, "sloping land beside a body of water", max_length=64)
    prompt_ids = encode_prompt(tok, prompt)
    n_prompt = len(prompt_ids)
    ids, labels = example["input_ids"], example["labels"]

    assert ids[:n_prompt] == prompt_ids and ids[0] == tok.bos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == "sloping land beside a body of water"
    assert example["attention_mask"] == [1] * len(ids)

    short = encode_example(tok, "what is the definition of \"cat\"?", "a feline", max_length=64)
    batch = collate([example, short], tok.pad_token_id)
    width = len(ids)
    k = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, width)
    assert batch["labels"][1, :k].tolist() == short["labels"]
    assert batch["labels"][1, k:].tolist() == [IGNORE_INDEX] * (width - k)  # right padding, ignored
    assert batch["input_ids"][1, k:].tolist() == [tok.pad_token_id] * (width - k)
    assert batch["attention_mask"][1].tolist() == [1] * k + [0] * (width - k)


def test_generation_prompt_matches_plain_tokenizer_call(tok):
    """A plain ``tokenizer(prompt)`` (what batched generate() gets) must equal the training prompt tokens."""
    for r in _records()[:4]:
        prompt = record_prompt(r)
        assert tok(prompt)["input_ids"] == encode_prompt(tok, prompt)


def test_truncation_keeps_the_question_and_some_definition(tok):
    long_context = " ".join(["word"] * 300)
    prompt = f'"{long_context}" What is the definition of "zebra"?'
    definition = " ".join(["stripe"] * 200)
    ex = encode_example(tok, prompt, definition, max_length=64)
    assert len(ex["input_ids"]) == 64
    n_target = sum(t != IGNORE_INDEX for t in ex["labels"])
    assert n_target >= (64 - 1) // 4
    assert ex["input_ids"][-1] != tok.eos_token_id  # a cut definition gets no EOS
    first_target = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
    assert tok.decode(ex["input_ids"][1:first_target]).endswith('what is the definition of " zebra "?')

    ex = encode_example(tok, prompt, "an african equid", max_length=64)  # long prompt, short definition: all kept
    assert len(ex["input_ids"]) == 64 and ex["input_ids"][-1] == tok.eos_token_id
    first_target = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
    assert tok.decode(ex["input_ids"][first_target:-1]) == "an african equid"


# ------------------------------------------------------------------------------------------------ batching
def test_length_buckets_group_similar_lengths_reproducibly():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(400)]
    sampler = LengthBucketBatchSampler(lengths, 8, seed=3, pool_batches=10)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    shuffled = list(range(400))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i:i + 8] for i in range(0, 400, 8)]
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in random_batches) / 50
    assert spread < 0.25 * random_spread, (spread, random_spread)
    assert sampler.batches(0) == batches and sampler.batches(1) != batches

    ranks = [LengthBucketBatchSampler(lengths, 8, seed=3, num_replicas=2, rank=r).batches(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 25
    assert not set(i for b in ranks[0] for i in b) & set(i for b in ranks[1] for i in b)


def test_lr_schedule_warms_up_then_decays():
    total, warm = 10, 2
    f = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:])) and 0 < f[-1] < 0.1
    assert lr_factor(5, total, 0, "constant") == 1.0
    assert lr_factor(5, total, 0, "linear") == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ training
def test_tiny_llama_few_steps_reduce_loss(llama_dir, tmp_path):
    model, tok = load_causal_lm(llama_dir)
    rows = _records()
    before = evaluate_loss(model, tok, rows, max_length=64)
    metrics = train(model, tok, rows, None, _cfg(max_steps=4, lr=1e-2), tmp_path, progress=False)
    after = evaluate_loss(model, tok, rows, max_length=64)
    assert before > 10.0  # ~ln(30522) = 10.33 for a random model
    assert after < before - 1.0, (before, after)
    assert metrics["steps"] == 4 and metrics["train_loss_last"] < metrics["train_loss_first"]
    assert (Path(metrics["model_dir"]) / "model.safetensors").is_file()
    assert not list(Path(metrics["model_dir"]).glob("*.bin"))


def test_tiny_minilm_decoder_few_steps_reduce_loss(minilm2_dir, tmp_path):
    model, tok = load_causal_lm(minilm2_dir)
    rows = _records()
    before = evaluate_loss(model, tok, rows, max_length=64)
    metrics = train(model, tok, rows, None, _cfg(max_steps=4, lr=1e-3, dropout=0.1), tmp_path, progress=False)
    after = evaluate_loss(model, tok, rows, max_length=64)
    assert after < before - 1.0, (before, after)
    assert metrics["dropout_modules"] > 0


@pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU without native bf16")
def test_bf16_autocast_step_runs(llama_dir, tmp_path):
    model, tok = load_causal_lm(llama_dir)
    metrics = train(model, tok, _records(), None, _cfg(max_steps=2, precision="auto"), tmp_path, progress=False)
    assert metrics["precision"] == "bf16" and math.isfinite(metrics["train_loss_last"])


@pytest.mark.parametrize("native", [True, False])
def test_the_experts_stage_says_which_precision_auto_chose_and_why(monkeypatch, native):
    import lm_lexicon.train.precision
    from lm_lexicon.train.stage import cpu_precision_note

    monkeypatch.setattr(lm_lexicon.train.precision, "cpu_supports_bf16", lambda: native)
    note = cpu_precision_note("auto")
    if native:
        assert note == "precision bf16 autocast (native bf16 on this CPU)"
    else:
        assert note.startswith("precision fp32: this CPU has no native bf16") and "3x" in note
    assert cpu_precision_note("fp32") == "precision fp32"  # asked for: no explanation needed


def test_resume_continues_the_step_count_and_equals_an_uninterrupted_run(llama_dir, tmp_path):
    rows = _records()
    cfg = _cfg(max_steps=4, lr=3e-3, dropout=0.1, batch_size=4, warmup_ratio=0.25)  # dropout: RNG state must resume

    model, tok = load_causal_lm(llama_dir)
    first = train(model, tok, rows, None, cfg, tmp_path / "a", max_steps=2, progress=False)
    ckpt = Path(first["checkpoint_dir"])
    assert first["steps"] == 2 and read_trainer_state(ckpt)["step"] == 2

    reports = []
    model, tok = load_causal_lm(llama_dir)
    resumed = train(model, tok, rows, None, cfg, tmp_path / "b", resume_from=ckpt, max_steps=4, progress=False,
                    restore_best=False, report_fn=lambda m, c: reports.append((m["step"], c)))
    assert resumed["steps"] == 4 and [s for s, _ in reports] == [4]
    assert read_trainer_state(reports[0][1])["step"] == 4
    assert resumed["train_loss_first"] == pytest.approx(first["train_loss_first"])  # carried over

    straight, tok = load_causal_lm(llama_dir)
    train(straight, tok, rows, None, cfg, tmp_path / "c", progress=False, restore_best=False)
    resumed_state, straight_state = model.state_dict(), straight.state_dict()
    for name, tensor in straight_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_early_stopping_on_a_validation_set_that_gets_worse(llama_dir, tmp_path):
    # train on one constant definition: the model learns to say it, so unrelated validation definitions get worse
    train_rows = _records([(t, c, "zebra zebra zebra zebra") for t, c, _ in ROWS])
    valid_rows = _records(ROWS[:8], split="valid")
    model, tok = load_causal_lm(llama_dir)
    cfg = _cfg(max_steps=20, lr=1e-2, eval_every=1, early_stopping_patience=1)
    metrics = train(model, tok, train_rows, valid_rows, cfg, tmp_path, progress=False)
    assert metrics["stopped_early"] and metrics["steps"] < 20
    assert metrics["best_step"] < metrics["steps"]
    assert metrics["valid_loss"] > metrics["best_valid_loss"]
    # the returned model carries the best weights, and so does the exported one
    assert evaluate_loss(model, tok, valid_rows, max_length=64) == pytest.approx(metrics["best_valid_loss"], rel=1e-5)
    summary = json.loads((Path(metrics["model_dir"]) / "sft_summary.json").read_text())
    assert summary["weights"] == "best" and summary["best_step"] == metrics["best_step"]


# ------------------------------------------------------------------------------------------------ seed models
def test_load_causal_lm_sets_dropout_and_padding(llama_dir, minilm2_dir):
    model, tok = load_causal_lm(minilm2_dir, dropout=0.0)
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    assert tok.padding_side == "left" and tok.pad_token_id == 0 and tok.eos_token_id == tok.sep_token_id
    assert model.config.is_decoder
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model, tok = load_causal_lm(llama_dir, dropout=0.2)
    assert model.config.attention_dropout == 0.2 and tok.pad_token_id is not None


def test_left_padded_batch_generation_matches_single_prompts(minilm2_dir):
    """BERT has absolute positions: batched (left-padded) generation must give each prompt its own positions.

    A padded batch and a prompt alone are different matmul shapes, equal to float rounding: the scores each token was
    picked from are compared (tests/score_trace.py), and the tokens of every row that did not meet a near tie."""
    model, tok = load_causal_lm(minilm2_dir)
    prompts = [record_prompt(r) for r in _records()[:3]]
    batch = tok(prompts, return_tensors="pt", padding=True)
    eos = [model.generation_config.eos_token_id]
    batched = ScoreTrace(eos)
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, logits_processor=batched.processors(prompts, width))
    for i, prompt in enumerate(prompts):
        single = tok(prompt, return_tensors="pt")
        n = single["input_ids"].shape[1]
        trace = ScoreTrace(eos)
        alone = model.generate(**single, max_new_tokens=6, do_sample=False,
                               logits_processor=trace.processors([prompt], n))
        same = assert_same_decoding(trace, batched)
        if not same.diverged:
            assert out[i, width:].tolist()[:alone.shape[1] - n] == alone[0, n:].tolist()


def test_resolve_unknown_hub_id_offline_says_how_to_allow_downloads(monkeypatch):
    monkeypatch.delenv("LM_LEXICON_ALLOW_DOWNLOADS", raising=False)
    with pytest.raises(FileNotFoundError, match="LM_LEXICON_ALLOW_DOWNLOADS"):
        resolve_seed_model("lm-lexicon-test/no-such-model-anywhere")


def test_full_minilm_seed_is_cached_generates_and_learns(tmp_path, monkeypatch):
    """The default seed: built once into the cache, safetensors only, generate() runs, a few steps lower the loss."""
    monkeypatch.setenv("LM_LEXICON_CACHE", str(tmp_path / "cache"))
    path = resolve_seed_model(SEED_MINILM_DECODER)
    assert path == tmp_path / "cache" / "seed" / "minilm-decoder"
    stamp = json.loads((path / STAMP_FILE).read_text())
    assert stamp["num_hidden_layers"] is None and stamp["head_init"] == "identity"
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_seed_model(SEED_MINILM_DECODER) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt

    model, tok = load_causal_lm(path)
    assert model.config.num_hidden_layers == 6
    prompt = record_prompt(_records()[4])
    out = model.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(encode_prompt(tok, prompt))

    rows = _records()[:8]
    before = evaluate_loss(model, tok, rows, max_length=64)
    train(model, tok, rows, None, _cfg(max_steps=3, lr=2e-4, batch_size=8), tmp_path / "run", progress=False)
    after = evaluate_loss(model, tok, rows, max_length=64)
    assert after < before - 0.5, (before, after)


# ------------------------------------------------------------------------------------------------ trainable, dtype
def test_ffn_only_experts_keep_every_shared_tensor_bit_for_bit(llama_dir, tmp_path):
    """train.trainable=ffn: two experts trained on different rows differ only in the FFN tensors the merge turns into
    experts; every other tensor is the seed's, bit for bit, so the merge's average of them is exact."""
    from safetensors.torch import load_file

    from lm_lexicon.moe.ffn_spec import LLAMA

    seed = load_file(str(llama_dir / "model.safetensors"))
    ffn_keys = {k for k in seed if LLAMA.parse_dense_key(k) is not None}
    assert len(ffn_keys) == 3 * 2  # gate/up/down x 2 layers
    experts = []
    for i, rows in enumerate((ROWS[:8], ROWS[8:])):
        model, tok = load_causal_lm(llama_dir)
        metrics = train(model, tok, _records(rows), None, _cfg(trainable="ffn", save_dtype="float32"),
                        tmp_path / f"expert-{i}", progress=False)
        assert metrics["trainable_parameters"] == sum(seed[k].numel() for k in ffn_keys)
        experts.append(load_file(str(Path(metrics["model_dir"]) / "model.safetensors")))
    for key, value in seed.items():
        if key in ffn_keys:
            assert not torch.equal(experts[0][key], value) and not torch.equal(experts[0][key], experts[1][key]), key
        else:
            assert torch.equal(experts[0][key], value) and torch.equal(experts[1][key], value), key


def test_full_training_changes_shared_tensors_too(llama_dir, tmp_path):
    from safetensors.torch import load_file

    seed = load_file(str(llama_dir / "model.safetensors"))
    model, tok = load_causal_lm(llama_dir)
    metrics = train(model, tok, _records(), None, _cfg(save_dtype="float32"), tmp_path / "run", progress=False)
    assert metrics["trainable_parameters"] == sum(v.numel() for v in seed.values())
    trained = load_file(str(Path(metrics["model_dir"]) / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], seed["model.layers.0.self_attn.q_proj.weight"])


def test_models_are_saved_in_bf16_while_training_stays_float32(llama_dir, tmp_path):
    from safetensors.torch import load_file

    model, tok = load_causal_lm(llama_dir)
    metrics = train(model, tok, _records(), None, _cfg(), tmp_path / "run", progress=False)  # save_dtype default
    final = Path(metrics["model_dir"])
    saved = load_file(str(final / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((final / "sft_summary.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the in-memory model is untouched
    for key, value in model.state_dict().items():  # the file is the model rounded to bf16, nothing else
        assert torch.equal(saved[key], value.to(torch.bfloat16)), key
    checkpoint = load_file(str(next((tmp_path / "run" / "checkpoints").glob("step-*")) / "model.safetensors"))
    assert {v.dtype for v in checkpoint.values()} == {torch.float32}  # resumable checkpoints keep full precision
    reloaded, _ = load_causal_lm(final)
    assert next(reloaded.parameters()).dtype == torch.float32


def _checkpointed_layers(model) -> int:
    return sum(getattr(layer, "gradient_checkpointing", False) is True for layer in model.model.layers)


def test_gradient_checkpointing_gives_the_same_step(llama_dir, tmp_path):
    """Recomputing activations changes memory, not the update: one step with and without it agree within float
    tolerance (two different computation orders, so not bit for bit)."""
    from safetensors.torch import load_file

    weights = []
    for checkpointing in (False, True):
        model, tok = load_causal_lm(llama_dir)
        with warnings.catch_warnings():
            # the deprecated name would warn on every run; other libraries' FutureWarnings are not this test's
            warnings.filterwarnings("error", message=".*gradient_checkpointing", category=FutureWarning)
            metrics = train(model, tok, _records(), None, _cfg(max_steps=1, gradient_checkpointing=checkpointing,
                                                                save_dtype="float32"),
                            tmp_path / f"gc-{checkpointing}", progress=False)
        assert _checkpointed_layers(model) == (len(model.model.layers) if checkpointing else 0)
        weights.append(load_file(str(Path(metrics["model_dir"]) / "model.safetensors")))
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6)
