"""llama.cpp (through llama-cpp-python) runs an exported GGUF like transformers runs the checkpoint (slow suite).

The model is the real seed, SmolLM2-135M-Instruct, stored in bfloat16 as the pipeline stores every expert, so the
file is the architecture, tokenizer and size of a real domain checkpoint. If llama-cpp-python is missing, the module
installs it first (it compiles llama.cpp from source: ~10-20 min on 2 cores; the time is printed).

What "the same" means here (two different computations, never compared bit for bit):

* tokens: llama.cpp's tokenizer (the GGUF's ``smollm`` pre-tokenizer) gives the Hugging Face tokenizer's ids;
* logits after the prompt: the f32 file within 5e-2 of transformers' float32 logits (measured: 0.0197; llama.cpp
  keeps its KV cache in float16 by default, and sums in another order); the bf16 file within 0.5 -- ggml also
  rounds the activations to bfloat16 before each bf16 matmul (its vec-dot type), which transformers does not do:
  a real difference in arithmetic, not a bug;
* greedy definitions, against the pipeline's own generator (:class:`lm_lexicon.evaluate.generate.DefinitionGenerator`,
  same rules: repetition penalty 1.05 over prompt and output, no repeated 3-gram in the output): the scores of every
  step both decoded within the bf16 tolerance, and the same pick unless transformers' top-2 margin is within twice that
  (a near tie: the two then continue from different prefixes and the comparison of that prompt stops).
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = [
    '"we sat on the bank of the river and watched the boats" What is the definition of "bank"?',
    '"the cat slept on the warm mat all afternoon" What is the definition of "mat"?',
    '"she felt a deep sense of nostalgia for her childhood home" What is the definition of "nostalgia"?',
    'What is the definition of "photosynthesis"?',
    '"the café\'s crème brûlée — “perfect”, they said" What is the definition of "crème brûlée"?',
    '"he ran 3.5 km in 17\'20\'\' at the 2024 city race" What is the definition of "race"?',
]
MAX_NEW = 24
F32_TOLERANCE = 5e-2
BF16_TOLERANCE = 0.5
RULES = {"repetition_penalty": 1.05, "no_repeat_ngram_size": 3}


def _ensure_llama_cpp():
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "llama-cpp-python>=0.3"],
                          capture_output=True, text=True, timeout=3600)
    print(f"\ninstalled llama-cpp-python from source in {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


@pytest.fixture(scope="module")
def llama_cpp():
    return _ensure_llama_cpp()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The seed as the pipeline exports a domain: LlamaForCausalLM in bfloat16, tied embeddings."""
    from lm_lexicon.seed_models import SEED_SMOLLM2, load_causal_lm, resolve_seed_model

    model, tokenizer = load_causal_lm(resolve_seed_model(SEED_SMOLLM2), dtype="bfloat16")
    out = tmp_path_factory.mktemp("smollm2-bf16") / "domain-0"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def gguf_files(checkpoint, tmp_path_factory) -> dict:
    from lm_lexicon.moe.gguf import write_gguf
    from lm_lexicon.seed_models import smollm2_gguf_path

    out = tmp_path_factory.mktemp("smollm2-gguf")
    files = {dtype: out / f"domain-0.{dtype}.gguf" for dtype in ("bf16", "f32")}
    for dtype, path in files.items():
        write_gguf(checkpoint, path, metadata_source=smollm2_gguf_path(), dtype=dtype)
    return files


@pytest.fixture(scope="module")
def hf(checkpoint):
    from lm_lexicon.seed_models import load_causal_lm

    model, tokenizer = load_causal_lm(checkpoint, dtype="float32")
    return model.eval(), tokenizer


def test_tokenizer_matches(llama_cpp, gguf_files, hf):
    from lm_lexicon.serving.gguf_runtime import GGUFModel

    _, tokenizer = hf
    model = GGUFModel(gguf_files["bf16"], n_threads=2)
    for prompt in PROMPTS:
        assert model.tokenize(prompt) == tokenizer(prompt)["input_ids"], prompt


@pytest.mark.parametrize("dtype,tolerance", [("f32", F32_TOLERANCE), ("bf16", BF16_TOLERANCE)])
def test_prompt_logits_match(llama_cpp, gguf_files, hf, dtype, tolerance):
    from lm_lexicon.serving.gguf_runtime import GGUFModel

    model, tokenizer = hf
    cpp = GGUFModel(gguf_files[dtype], n_threads=2)
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].numpy()
        cpp.llm.reset()
        got = cpp.logits_after(ids)
        worst = max(worst, float(np.abs(got - expected).max()))
    print(f"\n{dtype}: largest |logit difference| after the prompt {worst:.4f} (tolerance {tolerance})")
    assert worst < tolerance


def test_greedy_definitions_match_the_pipeline(llama_cpp, gguf_files, checkpoint, definition_traces):
    """The GGUF runtime's greedy decoding against the pipeline's (DefinitionGenerator, same rules): at every step
    both decoded, the scores agree within ``BF16_TOLERANCE``; a different pick is only allowed where transformers'
    top-2 margin is within twice that (a near tie), and ends that prompt's comparison. Outputs that never parted
    are the same text."""
    from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings
    from lm_lexicon.serving.gguf_runtime import GGUFModel

    settings = GenerationSettings(do_sample=False, max_new_tokens=MAX_NEW, batch_size=1, **RULES)
    generator = DefinitionGenerator(checkpoint, kind="dense", dtype="float32", settings=settings)
    cpp = GGUFModel(gguf_files["bf16"], n_threads=2)
    identical, compared, worst = 0, 0, 0.0
    for prompt in PROMPTS:
        (definition,), trace = definition_traces.run(generator.generate, [prompt])
        steps: dict[tuple, np.ndarray] = {}
        ids = cpp.greedy(cpp.tokenize(prompt), MAX_NEW, on_step=lambda prefix, s: steps.__setitem__(prefix, s),
                         **RULES)
        (row,) = trace.rows()
        parted = None
        for key in trace.keys_of(row):
            if key[1] not in steps:
                break
            hf_scores, cpp_scores = trace.scores[key].numpy(), steps[key[1]]
            both = np.isfinite(hf_scores) & np.isfinite(cpp_scores)
            assert (np.isfinite(hf_scores) == np.isfinite(cpp_scores)).all(), f"{prompt!r}: different tokens banned"
            diff = float(np.abs(hf_scores[both] - cpp_scores[both]).max())
            worst, compared = max(worst, diff), compared + 1
            assert diff <= BF16_TOLERANCE, f"{prompt!r} after {len(key[1])} tokens: scores differ by {diff:.3f}"
            if int(np.argmax(hf_scores)) != int(np.argmax(cpp_scores)):
                top2 = np.sort(hf_scores[np.isfinite(hf_scores)])[-2:]
                assert top2[1] - top2[0] <= 2 * BF16_TOLERANCE
                parted = len(key[1])
                break
        if parted is None:
            assert cpp.detokenize(ids) == definition[0], prompt
            identical += 1
        print(f"\n{prompt[:60]!r}: {'identical' if parted is None else f'parted at a near tie, step {parted}'}: "
              f"{definition[0]!r}")
    print(f"{compared} steps compared, largest score difference {worst:.3f} (tolerance {BF16_TOLERANCE})")
    assert compared >= len(PROMPTS) * 4
