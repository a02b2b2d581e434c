"""Load test of the Serve application on loopback: concurrency sweep, dynamic batching vs max_batch_size=1, and
served throughput vs offline batch generation of the same checkpoints on the same prompts.

    python bench/serve_load.py [--output-dir runs/tiny] [--prompts 384] [--concurrency 1,8,32,128] [--rounds 3] [--write]

Bounded: a sweep point with concurrency c sends min(--prompts, max(16, 8c)) test prompts once
(``--items-per-request`` per request), with at most c requests in flight. Reported: throughput (definitions/s),
request latency p50/p95/p99, errors, the mean generation batch the experts ran.

* **offline**: the same collapsed checkpoints in this process (``DefinitionGenerator.generate``, batches of
  ``--max-batch-size`` prompts of one domain, one torch thread: the served replicas' setting; under CPU contention
  two threads measured 9x slower than one here), the prompts routed by the same router first (reported apart).
* **served**: two Ray Serve applications deployed side by side, identical except ``max_batch_size``
  (``--max-batch-size`` vs 1): one replica per deployment, 0 CPUs reserved, one torch thread per replica.

The targets compare offline, batched and unbatched at the highest concurrency. Other jobs share this machine and
its load moves by a factor of several within minutes, so the three are measured in interleaved rounds (offline,
batched, unbatched, repeated ``--rounds`` times over the same ``--prompts`` prompts) and each ratio is taken within a
round; the 1-minute load average is recorded around every measurement.

Targets (issue 8): served >= 0.8x offline at high concurrency; batching >= 3x over max_batch_size=1.
Writes docs/BENCHMARKS.md (section "Serving load") with --write.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load1() -> float:
    return round(os.getloadavg()[0], 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_items(output_dir: Path, n: int) -> list[dict]:
    rows = []
    with open(output_dir / "data" / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append({"term": r["term"], "context": r.get("context") or "", "lang": r.get("lang") or "en"})
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"{output_dir}/data/test.jsonl has only {len(rows)} rows")
    return rows


class Offline:
    """The collapsed checkpoints in this process; prompts routed once by the same router."""

    def __init__(self, output_dir: Path, items: list[dict], batch_size: int, generation: dict, threads: int):
        import torch

        from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings
        from lm_lexicon.serving.app_config import PipelineLayout
        from lm_lexicon.serving.engines import RouterEngine
        from lm_lexicon.serving.schemas import DefinitionItem, item_prompt

        torch.set_num_threads(threads)
        self.threads = threads
        layout = PipelineLayout.discover(output_dir)
        self.prompts = [item_prompt(DefinitionItem(**it), layout.prompt_templates) for it in items]  # as served
        router = RouterEngine(layout.router_dir, torch_threads=threads)
        router.route(self.prompts[:8])  # warm-up
        t0 = time.perf_counter()
        self.domains = router.route(self.prompts)
        self.route_s = time.perf_counter() - t0
        self.settings = GenerationSettings.from_any(generation).replace(batch_size=batch_size)
        self.gens = {e.domain: DefinitionGenerator(e.model_path, kind=e.kind) for e in layout.experts}
        for d, g in self.gens.items():  # warm-up
            g.generate(self.prompts[:2], domains=[d] * 2 if g.needs_domains else None, settings=self.settings)

    def per_domain(self) -> dict:
        return {d: self.domains.count(d) for d in sorted(set(self.domains))}

    def run(self) -> dict:
        t0 = time.perf_counter()
        for d, g in self.gens.items():
            mine = [p for p, dd in zip(self.prompts, self.domains) if dd == d]
            if mine:
                g.generate(mine, domains=[d] * len(mine) if g.needs_domains else None, settings=self.settings)
        gen_s = time.perf_counter() - t0
        n = len(self.prompts)
        return {"definitions_per_s": n / gen_s, "with_routing_per_s": n / (gen_s + self.route_s)}


async def load_point(url: str, items: list[dict], concurrency: int, per_request: int) -> dict:
    import httpx
    import numpy as np

    chunks = [items[i:i + per_request] for i in range(0, len(items), per_request)]
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    failed = 0
    batch_sizes: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900.0, limits=limits) as client:
        async def one(chunk):
            nonlocal failed
            async with sem:
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/definitions", json={"items": chunk})
                except Exception as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    failed += len(chunk)
                    return
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    failed += len(chunk)
                else:
                    batch_sizes.extend(d["batch_size"] for d in r.json()["definitions"])

        load = load1()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chunks))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000.0 if latencies else np.array([float("nan")])
    return {"concurrency": concurrency, "definitions": len(items), "definitions_per_s": (len(items) - failed) / wall,
            "wall_s": wall, "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors, "load_before": load, "load_after": load1(),
            "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else float("nan")}


def app_args(output_dir: Path, max_batch_size: int, wait_s: float, generation: dict) -> dict:
    z = {"num_cpus": 0}
    return {"output_dir": str(output_dir), "ingress": {**z, "max_ongoing_requests": 512, "max_batch_size": 1},
            "router": {**z, "max_batch_size": 64, "max_ongoing_requests": 512},
            "scorer": {**z, "max_batch_size": 64, "max_ongoing_requests": 512},
            "expert": {**z, "max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s,
                       "max_ongoing_requests": max(2 * max_batch_size, 32), "torch_threads": 1},
            "generation": generation, "auth_token_env": None, "request_timeout_s": 900.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default=str(REPO / "runs" / "tiny"))
    ap.add_argument("--prompts", type=int, default=384)
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved offline / batched / unbatched rounds")
    ap.add_argument("--items-per-request", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-s", type=float, default=0.02)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override the pipeline's (default: its)")
    ap.add_argument("--offline-threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="record the result in docs/BENCHMARKS.md")
    args = ap.parse_args()

    import ray
    from ray import serve

    from lm_lexicon.serving.app_config import PipelineLayout, generation_settings, resolve_args
    from serve_app.app import build_app

    output_dir = Path(args.output_dir).resolve()
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    items = test_items(output_dir, args.prompts)
    generation = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    layout = PipelineLayout.discover(output_dir)
    resolved = generation_settings(resolve_args({"output_dir": str(output_dir), "generation": generation},
                                                layout.pipeline_config))
    gen = {k: resolved[k] for k in ("max_new_tokens", "repetition_penalty", "no_repeat_ngram_size") if k in resolved}
    load_start = load1()
    print(f"load average at start: {load_start}", flush=True)
    off = Offline(output_dir, items, args.max_batch_size, gen, args.offline_threads)

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    urls = {"batched": f"{base}/b{args.max_batch_size}", "unbatched": f"{base}/b1"}
    sweep: list[dict] = []
    rounds: list[dict] = []
    try:
        t0 = time.perf_counter()
        serve.run(build_app(app_args(output_dir, args.max_batch_size, args.batch_wait_s, gen)),
                  name=f"bench-b{args.max_batch_size}", route_prefix=f"/b{args.max_batch_size}")
        serve.run(build_app(app_args(output_dir, 1, 0.0, gen)), name="bench-b1", route_prefix="/b1")
        print(f"both applications ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for url in urls.values():  # warm-up
            asyncio.run(load_point(url, items[:16], 16, args.items_per_request))
        for c in levels:
            if c == top:
                continue  # measured in the rounds
            n = min(len(items), max(16, 8 * c))
            res = asyncio.run(load_point(urls["batched"], items[:n], c, args.items_per_request))
            sweep.append(res)
            print(f"  batched c={c}: {res}", flush=True)
        for r in range(args.rounds):
            rd = {"offline_load": load1(), "offline": off.run()}
            print(f"round {r}: offline {rd['offline']}", flush=True)
            for kind, url in urls.items():
                rd[kind] = asyncio.run(load_point(url, items, top, args.items_per_request))
                print(f"round {r}: {kind} c={top}: {rd[kind]}", flush=True)
            rd["vs_offline"] = rd["batched"]["definitions_per_s"] / rd["offline"]["definitions_per_s"]
            rd["vs_offline_routed"] = rd["batched"]["definitions_per_s"] / rd["offline"]["with_routing_per_s"]
            rd["speedup"] = rd["batched"]["definitions_per_s"] / rd["unbatched"]["definitions_per_s"]
            rounds.append(rd)
    finally:
        serve.shutdown()
        ray.shutdown()

    def row(label, r):
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        return (f"| {label} | {r['concurrency']} | {r['definitions']} | {r['definitions_per_s']:.2f} | "
                f"{r['p50_ms']:,.0f} | {r['p95_ms']:,.0f} | {r['p99_ms']:,.0f} | {r['mean_batch']:.1f} | {errs} | "
                f"{r['load_before']} -> {r['load_after']} |")

    vs = statistics.median(rd["vs_offline"] for rd in rounds)
    vs_routed = statistics.median(rd["vs_offline_routed"] for rd in rounds)
    speedup = statistics.median(rd["speedup"] for rd in rounds)
    rel = output_dir.relative_to(REPO) if output_dir.is_relative_to(REPO) else output_dir
    mb = args.max_batch_size
    lines = [
        f"Model: the pipeline's collapsed experts ({rel}, {len(layout.experts)} domains, {layout.experts[0].kind}), "
        f"greedy, max_new_tokens {gen.get('max_new_tokens')} (a definition ends at EOS or there); test "
        f"prompts per domain {off.per_domain()}; {args.items_per_request} item per request; {cores} cores. Serve: "
        f"one replica per deployment, one torch thread each, 0 CPUs reserved; expert batch wait "
        f"{args.batch_wait_s * 1000:.0f} ms. Offline: the same checkpoints in process, batches of {mb} prompts of one "
        f"domain, {off.threads} torch thread(s); routing the {len(items)} prompts took {off.route_s:.1f} s.",
        f"1-minute load average (`uptime`, the benchmark's own processes included) {load_start} at the start, and "
        "per measurement in the tables. Ratios are taken within interleaved rounds (same load, roughly).",
        "",
        "| served | concurrency | definitions | definitions/s | p50 ms | p95 ms | p99 ms | mean batch | errors | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        *[row(f"max_batch_size={mb}", r) for r in sweep],
        *[row(f"max_batch_size={mb} (round {i})", rd["batched"]) for i, rd in enumerate(rounds)],
        *[row(f"max_batch_size=1 (round {i})", rd["unbatched"]) for i, rd in enumerate(rounds)],
        "",
        "| round | load at offline | offline definitions/s (with routing) | served/offline (with routing) | batching speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {i} | {rd['offline_load']} | {rd['offline']['definitions_per_s']:.2f} "
          f"({rd['offline']['with_routing_per_s']:.2f}) | {rd['vs_offline']:.2f} ({rd['vs_offline_routed']:.2f}) | "
          f"{rd['speedup']:.2f} |" for i, rd in enumerate(rounds)],
        "",
        f"- served / offline at concurrency {top} (median of rounds): {vs:.2f}x of offline generation, "
        f"{vs_routed:.2f}x of offline routing + generation; target >= 0.8x: "
        f"{'met' if vs >= 0.8 else 'NOT met'} (generation alone), {'met' if vs_routed >= 0.8 else 'NOT met'} "
        "(routing + generation).",
        f"- dynamic batching speed-up at concurrency {top} (median of rounds): {speedup:.2f}x over max_batch_size=1; "
        f"target >= 3x: {'met' if speedup >= 3 else 'NOT met'}.",
    ]
    print("\n".join(lines))
    if args.write:
        sys.path.insert(0, str(REPO / "bench"))
        from bench_docs import write_section

        write_section("Serving load (bench/serve_load.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
