"""Ray Data embedding throughput against a plain single-process loop over the same model and prompts.

    python bench/embed.py [--rows 8000] [--repeats 2]

Writes the numbers to stdout and, with --write, into docs/BENCHMARKS.md (section "Embedding"). Run it on a quiet
machine: both sides use every core (the Ray actor sets torch's threads to the machine's core count).
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
    ap.add_argument("--write", action="store_true", help="record the result in docs/BENCHMARKS.md")
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch

    from lm_lexicon.config import EmbedConfig
    from lm_lexicon.data.prompts import format_prompt
    from lm_lexicon.data.wordnet import load_packaged_corpus
    from lm_lexicon.embed import Embedder
    from lm_lexicon.stages.partition import embed_on_ray

    rows = load_packaged_corpus("train")[: args.rows]
    prompts = [format_prompt(r.term, r.context) for r in rows]
    cores = os.cpu_count() or 1
    cfg = EmbedConfig(batch_size=args.batch_size, num_actors=1)

    torch.set_num_threads(cores)
    emb = Embedder(batch_size=args.batch_size)
    emb.encode(prompts[:256])  # warm-up
    plain = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = emb.encode(prompts)
        plain.append(time.perf_counter() - t0)

    ray.init(num_cpus=cores, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    embed_on_ray(prompts[:256], cfg, torch_threads=cores)  # warm-up (actor start, model load) not timed twice
    on_ray = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        got = embed_on_ray(prompts, cfg, torch_threads=cores)
        on_ray.append(time.perf_counter() - t0)
    ray.shutdown()
    max_diff = float(np.abs(got - ref).max())

    p, r = min(plain), min(on_ray)
    overhead = r / p - 1
    lines = [
        f"- rows: {len(prompts):,} WordNet training prompts; model: bundled MiniLM (384-d, mean pooling); "
        f"batch {args.batch_size}; {cores} cores; best of {args.repeats}",
        f"- plain loop: {p:.1f} s ({len(prompts) / p:,.0f} prompts/s)",
        f"- Ray Data (1 actor, actor start and model load included): {r:.1f} s ({len(prompts) / r:,.0f} prompts/s)",
        f"- Ray overhead: {overhead:+.1%} (target <= +15%); max |difference| of the embeddings: {max_diff:.2e}",
    ]
    print("\n".join(lines))
    if args.write:
        from bench_docs import write_section

        write_section("Embedding (bench/embed.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
