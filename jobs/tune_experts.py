"""Ray Tune scan over the number of experts (paper Fig. 5): each trial is the whole pipeline at its N, evaluated on
the validation split; writes scan.md (table), scan.png (metric vs N) and scan.json under --out.

    python jobs/tune_experts.py --config configs/tiny.yaml --ns 1,2,4,8 --out runs/scan [section.field=value ...]
    ray job submit --working-dir . -- python jobs/tune_experts.py --config configs/tiny.yaml --max-concurrent 4

On a 2-CPU machine keep --max-concurrent 1 (the default): a trial's stages need both CPUs, and the trial itself
reserves --trial-cpus (default 0). On a cluster, raise --max-concurrent to run pipelines side by side.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.config import ConfigError  # noqa: E402
from lm_lexicon.ray_utils import STOP_TIMEOUT_S, clean_exit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="configs/tiny.yaml", help="YAML recipe (the base of every trial)")
    parser.add_argument("--ns", default="1,2,4,8", help="comma-separated expert counts")
    parser.add_argument("--out", default=None, help="scan directory (default: <output_dir>-scan)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials at once")
    parser.add_argument("--trial-cpus", type=float, default=0.0, help="CPUs the trial actor itself reserves")
    parser.add_argument("overrides", nargs="*", help="section.field=value, applied to every trial")
    args = parser.parse_args(argv)
    from lm_lexicon.config import load_config
    from lm_lexicon.experiments import expert_count_scan

    try:
        cfg = load_config(args.config, args.overrides)
        ns = [int(n) for n in args.ns.split(",") if n.strip()]
        if not ns or min(ns) < 1:
            raise ConfigError(f"--ns must list expert counts >= 1, got {args.ns!r}")
    except (ConfigError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    out = Path(args.out or f"{cfg.output_dir}-scan")
    with clean_exit() as stop:  # SIGTERM / Ctrl-C: the trials' pipelines and Ray are gone within STOP_TIMEOUT_S
        try:
            result = expert_count_scan(args.config, args.overrides, ns, out, max_concurrent_trials=args.max_concurrent,
                                       trial_cpus=args.trial_cpus, name=cfg.name)
        except KeyboardInterrupt:
            print(f"scan interrupted ({stop['signal'] or 'SIGINT'}): stopping its trials and Ray (at most "
                  f"{STOP_TIMEOUT_S:.0f} s); finished trials are under {out.resolve()}", file=sys.stderr)
            return stop["exit_code"]
    print(f"scan of N={ns} finished: {out.resolve() / 'scan.md'}, plot {out.resolve() / 'scan.png'}")
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
