"""Tokens/s of the experts' training loop against a bare PyTorch loop, and model-FLOPs utilisation (MFU).

    python bench/train_throughput.py             # print
    python bench/train_throughput.py --write     # also record the section in docs/BENCHMARKS.md

Same model (the seed, default bundled-smollm2), same batches (the first ``--steps`` length-bucketed batches of the
tiny recipe's WordNet rows, ``--batch`` 16, prompts + definitions, loss on the definition and EOS), same precision (bf16
autocast over float32 master weights), same threads (2), same AdamW, clipping and LR schedule:

* **bare**: a minimal loop written here with plain torch calls: collate, forward (logits only where a label is),
  cross-entropy, backward, clip, fused AdamW step;
* **experts loop**: ``lm_lexicon.train.train`` inside one Ray Train worker (``TorchTrainer``, 2 CPUs), as the experts
  stage runs it; its ``tokens_per_s`` is the loop's own step time (collate .. optimizer step). The worker's
  end-to-end time (Ray start, model load, final save) is reported beside it.

Both load the seed with eager attention (the recipes' `seed_model.attn_implementation`) and count every step's
non-padding tokens over the whole run (no warm-up excluded: the experts loop does not exclude one). MFU: ``6 * N * tokens/s`` (N = all parameters, the
embedding included as it is also the LM head; the "6N rule") over the machine's bf16 matmul peak, measured here as
the best of a few 2048^3 bf16 matmuls on 2 threads. Rounds interleave bare and experts loop, so load on the
machine hits both alike; the ratio is the median over rounds. ``--trainable ffn`` measures FFN-only training (its
MFU is not reported: frozen weights skip their gradient matmuls, so 6N overstates the work).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

THREADS = 2


def bf16_gemm_gflops(m: int = 2048, k: int = 2048, n: int = 2048, repeats: int = 5) -> float:
    """Best of ``repeats`` bf16 (m x k) @ (k x n) products on THREADS threads, in GFLOPS."""
    torch.set_num_threads(THREADS)
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(k, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * m * k * n / best / 1e9


def records(n: int):
    from lm_lexicon.config import load_config
    from lm_lexicon.data.corpus import load_corpus

    corpus = load_corpus(load_config("configs/tiny.yaml").data)
    return corpus["train"][:n]


def train_cfg(steps: int, trainable: str, batch: int = 16):
    from lm_lexicon.config import TrainConfig

    return TrainConfig(max_steps=steps, batch_size=batch, max_length=96, lr=1e-4, warmup_ratio=0.0, dropout=0.0,
                       eval_every=10 ** 6, precision="bf16", seeds=[0], trainable=trainable)


def bare_loop(seed_dir: Path, rows, cfg) -> dict:
    """The same steps as lm_lexicon.train.train, written out with nothing else: tokens/s over all steps."""
    import torch.nn.functional as F

    from lm_lexicon.seed_models import load_causal_lm
    from lm_lexicon.train import (IGNORE_INDEX, LengthBucketBatchSampler, SFTDataset, collate, lr_factor,
                                  param_groups, train_only_ffn)

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model, tok = load_causal_lm(seed_dir, attn_implementation="eager")
    if cfg.trainable == "ffn":
        train_only_ffn(model)
    model.train()
    data = SFTDataset(tok, rows, cfg.max_length)
    batches = LengthBucketBatchSampler(data.lengths, cfg.batch_size, seed=0).batches(0)[:cfg.max_steps]
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                  fused=True)
    tokens, seconds = 0, 0.0
    for step, idx in enumerate(batches):
        t0 = time.perf_counter()
        batch = collate([data[i] for i in idx], tok.pad_token_id)
        next_labels = batch["labels"][:, 1:]
        is_target = next_labels != IGNORE_INDEX
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[:, :-1] = is_target
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg.max_steps, 0, cfg.schedule)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                           logits_to_keep=keep).logits
        loss = F.cross_entropy(logits.float(), next_labels[is_target], reduction="sum") / int(is_target.sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum())
    return {"tokens_per_s": tokens / seconds, "n_parameters": sum(p.numel() for p in model.parameters())}


def _worker(config: dict) -> None:
    import ray.train

    from lm_lexicon.seed_models import load_causal_lm
    from lm_lexicon.train import train

    torch.set_num_threads(THREADS)
    model, tok = load_causal_lm(config["seed_dir"], attn_implementation="eager")
    with tempfile.TemporaryDirectory() as out:
        metrics = train(model, tok, config["rows"], None, config["cfg"], out, progress=False)
        # Train V2 keeps the metrics of reports that carry a checkpoint: a one-file one
        done = Path(out) / "done"
        done.mkdir()
        ray.train.report({"tokens_per_s": metrics["tokens_per_s"], "seconds": metrics["seconds"]},
                         checkpoint=ray.train.Checkpoint.from_directory(str(done)))


def experts_loop(seed_dir: Path, rows, cfg, storage: str) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _worker, train_loop_config={"seed_dir": str(seed_dir), "rows": rows, "cfg": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": THREADS}),
        run_config=ray.train.RunConfig(name=f"throughput-{time.time_ns()}", storage_path=storage))
    result = trainer.fit()
    if result.error:
        raise result.error
    return {"tokens_per_s": result.metrics["tokens_per_s"], "wall_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", default="bundled-smollm2", help="seed model name or directory")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (the recipes' train.batch_size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trainable", choices=("all", "ffn"), default="all")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import os

    import ray

    from lm_lexicon.seed_models import resolve_seed_model

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    seed_dir = resolve_seed_model(args.seed)
    rows = records(args.steps * args.batch * 2)
    cfg = train_cfg(args.steps, args.trainable, args.batch)
    ray.init(num_cpus=THREADS, object_store_memory=200 * 2 ** 20, include_dashboard=False, log_to_driver=False)
    peak = bf16_gemm_gflops()
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(seed_dir))
    shaped = bf16_gemm_gflops(args.batch * 28, c.hidden_size, c.intermediate_size)  # an FFN product of one step
    rounds = []
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.rounds):
            bare = bare_loop(seed_dir, rows, cfg)
            loop = experts_loop(seed_dir, rows, cfg, storage)
            rounds.append((bare, loop))
            print(f"round {r}: bare {bare['tokens_per_s']:.0f} tok/s, experts loop {loop['tokens_per_s']:.0f} tok/s "
                  f"(ratio {loop['tokens_per_s'] / bare['tokens_per_s']:.2f}; worker wall {loop['wall_seconds']:.0f} s)",
                  flush=True)
    ray.shutdown()
    n = rounds[0][0]["n_parameters"]
    bare_tps = statistics.median(b["tokens_per_s"] for b, _ in rounds)
    loop_tps = statistics.median(l["tokens_per_s"] for _, l in rounds)
    ratio = statistics.median(l["tokens_per_s"] / b["tokens_per_s"] for b, l in rounds)
    lines = [f"Seed `{args.seed}` ({n / 1e6:.1f}M parameters), trainable={args.trainable}, batch {args.batch} (WordNet rows, "
             f"length-bucketed), bf16 autocast, {THREADS} threads, {args.steps} steps per run, {args.rounds} "
             f"interleaved rounds. bf16 matmul peak measured: {peak:.0f} GFLOPS (2048^3); the model's own FFN product "
             f"({args.batch * 28} x {c.hidden_size} x {c.intermediate_size}, a step's tokens) runs at {shaped:.0f}.",
             "", "| loop | tokens/s (median) | MFU (6N / 2048^3 peak) | 6N / FFN-shaped product |",
             "| --- | ---: | ---: | ---: |"]
    for name, tps in (("bare PyTorch", bare_tps), ("experts loop (train.train in a Ray Train worker)", loop_tps)):
        full = args.trainable == "all"
        mfu = f"{6 * n * tps / (peak * 1e9):.0%}" if full else "—"
        mfu_shaped = f"{6 * n * tps / (shaped * 1e9):.0%}" if full else "—"
        lines.append(f"| {name} | {tps:.0f} | {mfu} | {mfu_shaped} |")
    lines += ["", f"Experts loop / bare: **{ratio:.2f}** (median of per-round ratios: "
              + ", ".join(f"{l['tokens_per_s'] / b['tokens_per_s']:.2f}" for b, l in rounds) + ")."]
    print("\n".join(lines))
    if args.write:
        from bench_docs import write_section

        write_section(f"Training throughput, trainable={args.trainable}, batch {args.batch} "
                      "(bench/train_throughput.py)", lines)


if __name__ == "__main__":
    main()
