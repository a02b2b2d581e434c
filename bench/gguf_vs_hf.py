"""Definitions per second on CPU: one domain checkpoint through llama-cpp-python (GGUF) against Hugging Face generate.

    python bench/gguf_vs_hf.py --domain-dir runs/tiny/export/collapsed/domain-0            # print
    python bench/gguf_vs_hf.py --domain-dir runs/tiny/export/collapsed/domain-0 --write    # + docs/BENCHMARKS.md

Needs llama-cpp-python (``pip install 'lm-lexicon[gguf-runtime]'``). The domain checkpoint is written to GGUF here
(bf16, the exact weights; f16; and q8_0 through llama.cpp's own quantiser when this llama-cpp-python exposes it).

Both sides decode the same test prompts (the tiny recipe's WordNet test split, the run's template) greedily under
the pipeline's rules -- repetition penalty 1.05, no repeated 3-gram, at most 32 new tokens, stop at EOS:

* HF: :class:`lm_lexicon.evaluate.generate.DefinitionGenerator` in float32 (what serving runs), batch 1 and batch 16
  (length-sorted, left-padded), torch threads = --threads;
* llama.cpp: :class:`lm_lexicon.serving.gguf_runtime.GGUFModel`, one prompt at a time, and
  :class:`lm_lexicon.serving.gguf_runtime.BatchDecoder`, 16 sequences per ``llama_decode`` (as llama.cpp's server
  batches), n_threads = --threads.

Timing: interleaved rounds (every variant once per round, so a busy period of the shared machine hits all alike),
median seconds per round after a warm-up; definitions/s = prompts / median seconds. The 1-minute load average is
recorded before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = {"do_sample": False, "repetition_penalty": 1.05, "no_repeat_ngram_size": 3, "max_new_tokens": 32}


def test_prompts(n: int) -> list[str]:
    from lm_lexicon.config import load_config
    from lm_lexicon.data.corpus import load_corpus
    from lm_lexicon.train import record_prompt

    rows = load_corpus(load_config(None, []).data)["test"]
    return [record_prompt(r) for r in rows[:n]]


def quantize_q8(src: Path, dst: Path) -> bool:
    """llama.cpp's quantiser (llama_model_quantize) to Q8_0; False when this llama-cpp-python lacks it."""
    import llama_cpp

    if not hasattr(llama_cpp, "llama_model_quantize"):
        return False
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = 2
    return llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0 and dst.is_file()


def hf_runner(domain_dir: Path, prompts: list[str], batch: int, threads: int):
    from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings

    gen = DefinitionGenerator(domain_dir, kind="dense", dtype="float32", torch_threads=threads,
                              settings=GenerationSettings(batch_size=batch, **SETTINGS))
    tok = gen.tokenizer
    outputs: list = []

    def run():
        outputs[:] = [o[0] for o in gen.generate(prompts)]
        return sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    return run, outputs


def cpp_runner(path: Path, prompts: list[str], threads: int):
    from lm_lexicon.serving.gguf_runtime import GGUFModel

    model = GGUFModel(path, n_threads=threads, n_ctx=512)
    encoded = [model.tokenize(p) for p in prompts]
    outputs: list = []

    def run():
        ids = [model.greedy(e, SETTINGS["max_new_tokens"], SETTINGS["repetition_penalty"],
                            SETTINGS["no_repeat_ngram_size"]) for e in encoded]
        outputs[:] = [model.detokenize(i) for i in ids]
        return sum(len(i) for i in ids)
    return run, outputs


def cpp_batch_runner(path: Path, prompts: list[str], threads: int, batch: int):
    from lm_lexicon.serving.gguf_runtime import BatchDecoder, GGUFModel

    model = GGUFModel(path, n_threads=threads, n_ctx=512)
    decoder = BatchDecoder(model, max_batch=batch)
    encoded = [model.tokenize(p) for p in prompts]
    outputs: list = []

    def run():
        ids = decoder.greedy(encoded, SETTINGS["max_new_tokens"], SETTINGS["repetition_penalty"],
                             SETTINGS["no_repeat_ngram_size"])
        outputs[:] = [model.detokenize(i) for i in ids]
        return sum(len(i) for i in ids)
    return run, outputs


def timed(runs: dict, rounds: int) -> dict:
    """``{name: (median seconds, new tokens of the last round)}`` over interleaved rounds after one warm-up."""
    tokens = {name: fn() for name, fn in runs.items()}
    times = {name: [] for name in runs}
    for r in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{rounds} {name}: {times[name][-1]:.2f} s", flush=True)
    return {name: (statistics.median(t), tokens[name]) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain-dir", type=Path, required=True, help="A collapsed domain checkpoint (bf16 Llama).")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="record the results in docs/BENCHMARKS.md")
    args = ap.parse_args()

    from lm_lexicon.serving.gguf_runtime import import_llama_cpp
    from lm_lexicon.moe.gguf import write_gguf
    from lm_lexicon.seed_models import smollm2_gguf_path

    llama_cpp = import_llama_cpp()
    prompts = test_prompts(args.prompts)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for dtype in ("bf16", "f16"):
            files[dtype] = Path(tmp) / f"domain.{dtype}.gguf"
            t0 = time.perf_counter()
            write_gguf(args.domain_dir, files[dtype], metadata_source=smollm2_gguf_path(), dtype=dtype)
            print(f"wrote {dtype} GGUF in {time.perf_counter() - t0:.1f} s", flush=True)
        if quantize_q8(files["f16"], Path(tmp) / "domain.q8_0.gguf"):
            files["q8_0"] = Path(tmp) / "domain.q8_0.gguf"
        runs, outputs = {}, {}
        for batch in (1, 16):
            runs[f"HF generate, batch {batch}"], outputs[f"hf{batch}"] = hf_runner(args.domain_dir, prompts, batch,
                                                                                  args.threads)
        for dtype, path in files.items():
            runs[f"llama.cpp {dtype}, batch 1"], outputs[dtype] = cpp_runner(path, prompts, args.threads)
        runs["llama.cpp bf16, batch 16"], outputs["bf16 batched"] = cpp_batch_runner(files["bf16"], prompts,
                                                                                    args.threads, 16)
        results = timed(runs, args.rounds)
        sizes = {dtype: path.stat().st_size / 1e6 for dtype, path in files.items()}
    load_after = os.getloadavg()

    n = len(prompts)
    base1, base16 = results["HF generate, batch 1"][0], results["HF generate, batch 16"][0]
    same = {d: sum(a == b for a, b in zip(outputs[d], outputs["hf1"])) for d in [*files, "bf16 batched"]}
    lines = [
        f"Model: `{args.domain_dir}` (SmolLM2-135M expert, bf16 checkpoint). {n} WordNet test prompts, greedy "
        f"(repetition penalty 1.05, no repeated 3-gram, <= 32 new tokens, stop at EOS), {args.threads} threads, "
        f"median of {args.rounds} interleaved rounds after a warm-up. llama-cpp-python {llama_cpp.__version__}. "
        f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        "",
        "| variant | definitions/s | new tokens/s | x HF batch 1 | x HF batch 16 | file | same text as HF |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (seconds, tokens) in results.items():
        dtype = name.split()[1].rstrip(",") if name.startswith("llama.cpp") else None
        key = "bf16 batched" if name == "llama.cpp bf16, batch 16" else dtype
        lines.append(f"| {name} | {n / seconds:.1f} | {tokens / seconds:.0f} | {base1 / seconds:.2f} | "
                     f"{base16 / seconds:.2f} | {f'{sizes[dtype]:.0f} MB' if dtype else '-'} | "
                     f"{f'{same[key]}/{n}' if dtype else '-'} |")
    lines += ["", "'same text as HF': llama.cpp's definition equals HF batch 1's, character for character (they "
              "part only at near ties: bf16 activations in ggml's matmuls, see docs/GGUF.md)."]
    print("\n".join(lines))
    if args.write:
        from bench_docs import write_section

        write_section("GGUF on llama.cpp vs HF generate (bench/gguf_vs_hf.py)", lines)


if __name__ == "__main__":
    main()
