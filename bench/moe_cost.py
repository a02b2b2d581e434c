"""What domain routing costs: tokens/s of the MoE against the dense model of the same size, on CPU.

    python bench/moe_cost.py            # print
    python bench/moe_cost.py --write    # also record the section in docs/BENCHMARKS.md
    python bench/moe_cost.py --merge-memory --write   # + peak memory of merging 4 x 250 MB experts (~1 min)
    python bench/moe_cost.py --seed bundled-smollm2 --write   # the real seed (SmolLM2-135M) instead (own section)

Model: a random Llama (hidden 256, intermediate 1024, 4 layers, 4 heads, vocab 2048 so that the FFN, not the LM
head, dominates), fp32, torch threads 1 (stable numbers on a 2-core machine). MoE: N=4 experts made from the
dense model (lm_lexicon.moe.moe_from_dense), so all variants compute the same function where they should.

Variants (one forward over batch 8 x seq 64, no KV cache; and greedy generation of 32 tokens):
* dense                 — the plain LlamaForCausalLM
* domain, one domain    — MoE, every sequence of the batch in the same domain (serving per domain)
* domain, mixed         — MoE, the 8 sequences spread over the 4 domains (2 each): grouped gather/scatter
* token top-2           — MoE, learned top-2 gate per token
* naive domain          — the official implementation's layer: every expert on the whole batch, times a 0/1 mask

Ratios: domain/dense (target >= 0.9: routing adds almost nothing), naive/domain (expected ~1/N on the FFN part).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

N_EXPERTS = 4


def build_dense(hidden: int, intermediate: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # never stop early: every variant generates the same count
    return model


def load_seed(args):
    """The seed as the dense model (fp32, eval), and its sizes into ``args`` for the FLOP share."""
    from lm_lexicon.seed_models import load_causal_lm, resolve_seed_model

    model, _ = load_causal_lm(resolve_seed_model(args.seed))
    c = model.config
    args.hidden, args.intermediate, args.layers, args.vocab = (c.hidden_size, c.intermediate_size,
                                                               c.num_hidden_layers, c.vocab_size)
    model.generation_config.eos_token_id = None  # never stop early: every variant generates the same count
    return model.eval()


def naive_domain(block, x):
    """Appendix Alg. 3 (domain-level): ``results += expert(inputs) * (domain_labels == ix)`` for every expert."""
    labels = block.context.domain_labels  # [B]
    out = torch.zeros_like(x)
    for e, expert in enumerate(block.experts):
        out = out + expert(x) * (labels == e).to(x.dtype).view(-1, 1, 1)
    return out


def timed_interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each ``fns[name]()`` over ``repeats`` rounds after two warm-ups. Rounds visit every
    variant in turn, so a slow period of the (shared) machine hits all of them alike and the ratios stay fair."""
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


MERGE_PROBE = """
import json, sys, time
from lm_lexicon.moe.merge import merge_experts


def status(field):  # kB -> MB; VmHWM is this process's peak RSS (getrusage's ru_maxrss survives exec, this does not)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


experts, out, shard = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
before = status("VmRSS")
try:  # reset the peak to the current RSS, so the peak below is the merge's alone
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
t0 = time.perf_counter()
merge_experts(experts, out, max_shard_size=shard, overwrite=True)
seconds = time.perf_counter() - t0
print(json.dumps({"before_mb": before, "peak_mb": status("VmHWM"), "seconds": seconds}))
"""


def merge_memory(n_experts: int = N_EXPERTS) -> list[str]:
    """Peak RSS of merging N experts of ~250 MB (Llama hidden 512, 8 layers, vocab 30522, fp32), in a fresh process."""
    import json
    import subprocess
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=30522, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    lines = ["", f"Merge memory: {n_experts} experts (Llama hidden 512, 8 layers, vocab 30522, fp32), peak RSS of a "
             "fresh process running merge_experts ('before': after importing torch + lm_lexicon).", "",
             "| shard size | expert | output | RSS before | peak RSS | peak - before | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for i in range(n_experts):
            torch.manual_seed(i)
            path = Path(tmp) / f"expert-{i}"
            LlamaForCausalLM(config).save_pretrained(path)
            dirs.append(str(path))

        def mb(directory):
            return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")) / 2 ** 20

        for shard in ("100MB", "2GB"):
            out = str(Path(tmp) / "moe")
            r = subprocess.run([sys.executable, "-c", MERGE_PROBE, json.dumps(dirs), out, shard], capture_output=True,
                               text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            lines.append(f"| {shard} | {mb(dirs[0]):.0f} MB | {mb(out):.0f} MB | {m['before_mb']:.0f} MB | "
                         f"{m['peak_mb']:.0f} MB | {m['peak_mb'] - m['before_mb']:.0f} MB | {m['seconds']:.1f} |")
            print(lines[-1], flush=True)
        lines.append(f"(Holding the {n_experts} experts would take {n_experts * mb(dirs[0]):.0f} MB.)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seed", default=None, help="a seed model name or directory (e.g. bundled-smollm2) instead of "
                                                 "the random Llama")
    ap.add_argument("--merge-memory", action="store_true", help="also measure the peak memory of a merge")
    ap.add_argument("--write", action="store_true", help="record the results in docs/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from lm_lexicon.moe.model import moe_from_dense

    if args.seed:
        dense = load_seed(args)  # sets args.hidden/intermediate/layers/vocab from the seed's config
    else:
        dense = build_dense(args.hidden, args.intermediate, args.layers, args.vocab)
    moe_domain = moe_from_dense(dense, N_EXPERTS, routing="domain")
    moe_token = moe_from_dense(dense, N_EXPERTS, routing="token", top_k=2)
    moe_naive = moe_from_dense(dense, N_EXPERTS, routing="domain")
    for block in moe_naive.moe_blocks():
        block._domain = types.MethodType(naive_domain, block)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    prompt = ids[:, :16]
    one_domain = torch.zeros(args.batch, dtype=torch.long)
    mixed = torch.arange(args.batch) % N_EXPERTS

    variants = {
        "dense": (dense, {}),
        "domain, one domain": (moe_domain, {"domain_labels": one_domain}),
        "domain, mixed (2 per domain)": (moe_domain, {"domain_labels": mixed}),
        "token top-2": (moe_token, {}),
        "naive domain (every expert, masked)": (moe_naive, {"domain_labels": mixed}),
    }
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for name, (model, kw) in variants.items():  # same function (identical experts): the timings compare like with like
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

    def forward(model, kw):
        return lambda: model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)

    def generate(model, kw):
        return lambda: model.generate(input_ids=prompt, attention_mask=mask[:, :16], do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)

    with torch.no_grad():
        fwd = timed_interleaved({name: forward(m, kw) for name, (m, kw) in variants.items()}, args.repeats)
        gen = timed_interleaved({name: generate(m, kw) for name, (m, kw) in variants.items()}, max(3, args.repeats // 3))
    results = {name: (args.batch * args.seq / fwd[name], args.batch * args.new_tokens / gen[name]) for name in variants}
    for name, (f, g_) in results.items():
        print(f"{name:40s} forward {f:9.0f} tok/s   generate {g_:7.0f} tok/s", flush=True)

    dense_f, dense_g = results["dense"]
    one_f, one_g = results["domain, one domain"]
    mix_f, mix_g = results["domain, mixed (2 per domain)"]
    tok_f, tok_g = results["token top-2"]
    naive_f, naive_g = results["naive domain (every expert, masked)"]
    ffn_share = ffn_flop_share(args)
    model_name = f"seed `{args.seed}` (Llama, " if args.seed else "random Llama ("
    lines = [
        f"Model: {model_name}hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}; FFN = {ffn_share:.0%} of forward FLOPs); MoE N={N_EXPERTS}; fp32, CPU, "
        f"torch threads 1. Forward: batch {args.batch} x seq {args.seq}, no cache. Generate: batch {args.batch}, "
        f"16-token prompts, {args.new_tokens} greedy tokens with KV cache. Median of {args.repeats} (generate: "
        f"{max(3, args.repeats // 3)}) interleaved rounds.",
        "",
        "| variant | forward tok/s | generate tok/s |",
        "| --- | ---: | ---: |",
    ]
    for name, (f, gen) in results.items():
        lines.append(f"| {name} | {f:,.0f} | {gen:,.0f} |")
    lines += [
        "",
        "| ratio | forward | generate |",
        "| --- | ---: | ---: |",
        f"| domain (one domain) / dense | {one_f / dense_f:.2f} | {one_g / dense_g:.2f} |",
        f"| domain (mixed) / dense | {mix_f / dense_f:.2f} | {mix_g / dense_g:.2f} |",
        f"| token top-2 / dense | {tok_f / dense_f:.2f} | {tok_g / dense_g:.2f} |",
        f"| naive / domain (mixed) | {naive_f / mix_f:.2f} | {naive_g / mix_g:.2f} |",
        "",
        f"Target: domain/dense >= 0.9. Expected naive/domain with an FFN share s of the FLOPs: "
        f"1 / (1 + (N-1) s) = {1 / (1 + (N_EXPERTS - 1) * ffn_share):.2f} (-> 1/N = {1 / N_EXPERTS:.2f} as s -> 1).",
        "",
        "Reading: the forward (many tokens per sequence) is compute-bound, and domain routing costs what the dense "
        "model costs whether the batch holds one domain or all of them. A decoding step (one token per sequence) is "
        "bound by reading weights: a batch that mixes all N domains must read N experts' FFN weights per step, "
        "whatever the implementation (the naive layer, computing N times the FLOPs, is barely slower there). Batches "
        "of one domain — one serving deployment per domain, or grouping requests by domain — decode at the dense "
        "model's speed.",
    ]
    print("\n".join(lines))
    if args.merge_memory:
        lines += merge_memory()
    if args.write:
        from bench_docs import write_section

        title = f"MoE routing cost on {args.seed}" if args.seed else "MoE routing cost"
        write_section(f"{title} (bench/moe_cost.py)", lines)


def ffn_flop_share(args) -> float:
    """Share of a forward's multiply-adds spent in the FFNs (projections only; attention scores included)."""
    h, i, L, v, s = args.hidden, args.intermediate, args.layers, args.vocab, args.seq
    ffn = 3 * h * i * L
    attn = (4 * h * h + 2 * s * h) * L
    return ffn / (ffn + attn + h * v)


if __name__ == "__main__":
    main()
