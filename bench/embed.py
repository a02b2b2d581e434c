"""Ray Data embedding throughput against a plain single-process loop over the same model and prompts.

    python bench/embed.py [--rows 8000] [--repeats 2]

Writes the numbers to stdout and, with --write, into docs/BENCHMARKS.md (section "Embedding"). Run it on a quiet
machine: both sides use every core (the cores are shared out among the actors, one torch thread each by default).
Target: Ray overhead <= 15% on one machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--actors", type=int, default=2, help="Ray Data actors")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per actor (0: all cores / actors)")
    ap.add_argument("--write", action="store_true", help="record the result in docs/BENCHMARKS.md")
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch

    from lm_lexicon.config import EmbedConfig
    from lm_lexicon.data.prompts import format_prompt
    from lm_lexicon.data.wordnet import load_packaged_corpus
    from lm_lexicon.partition.embed import Embedder
    from lm_lexicon.partition.stage import embed_on_ray

    rows = load_packaged_corpus("train")[: args.rows]
    prompts = [format_prompt(r.term, r.context) for r in rows]
    cores = os.cpu_count() or 1
    cfg = EmbedConfig(batch_size=args.batch_size, num_actors=args.actors)
    threads = args.threads or max(1, cores // args.actors)

    torch.set_num_threads(cores)
    Embedder(batch_size=args.batch_size).encode(prompts[:256])  # warm-up (file cache, kernels)
    plain = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()  # model load included on both sides: the stage loads it too
        ref = Embedder(batch_size=args.batch_size).encode(prompts)
        plain.append(time.perf_counter() - t0)

    ray.init(num_cpus=cores, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    embed_on_ray(prompts[:256], cfg, torch_threads=threads)  # warm-up: Ray's own start-up is not the stage's cost
    on_ray = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        got = embed_on_ray(prompts, cfg, torch_threads=threads)
        on_ray.append(time.perf_counter() - t0)
    ray.shutdown()
    max_diff = float(np.abs(got - ref).max())

    p, r = min(plain), min(on_ray)
    overhead = r / p - 1
    lines = [
        f"- rows: {len(prompts):,} WordNet training prompts; model: bundled MiniLM (384-d, mean pooling); "
        f"batch {args.batch_size}; {cores} cores; best of {args.repeats}",
        f"- plain loop (model load included): {p:.1f} s ({len(prompts) / p:,.0f} prompts/s)",
        f"- Ray Data ({args.actors} actor(s) x {threads} torch thread(s); actor start and model load included): "
        f"{r:.1f} s ({len(prompts) / r:,.0f} prompts/s)",
        f"- Ray overhead: {overhead:+.1%} (target <= +15%); max |difference| of the embeddings: {max_diff:.2e}",
        f"- every run (s): plain {', '.join(f'{x:.1f}' for x in plain)}; Ray {', '.join(f'{x:.1f}' for x in on_ray)}",
    ]
    print("\n".join(lines))
    if args.write:
        from bench_docs import write_section

        write_section("Embedding (bench/embed.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
