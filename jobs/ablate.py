"""The paper's ablations on a recipe: partition method (Table 3: semantic / lexical / random / none), routing
policy (Table 4: domain / token top-1 / token top-2 / soft- and hard-sequence) and what the semantic clusters are
made of (features: prompt / definition / prompt+definition), over seeds, with mean ± std and a paired permutation
test against the default arm. Writes {study}.md, {study}.png and {study}.json under --out.

    python jobs/ablate.py --config configs/ablation.yaml --study all --seeds 21,42,84 --out runs/ablation

An evaluated arm keeps its metrics, predictions and configs; its model weights are deleted unless --keep-weights.
Interrupted? Run the same command again: finished arms are skipped (their ARM_DONE.json marker).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="configs/ablation.yaml", help="YAML recipe")
    parser.add_argument("--study", choices=["partition", "routing", "features", "all"], default="all",
                        help="all = partition, routing, features (in that order)")
    parser.add_argument("--seeds", default="21,42,84", help="comma-separated seeds (paper: 21, 42, 84)")
    parser.add_argument("--metrics", default="bleu_a,rouge_l", help="metrics in the tables")
    parser.add_argument("--out", default=None, help="ablation directory (default: <output_dir>-ablation)")
    parser.add_argument("--keep-weights", action="store_true",
                        help="keep every arm's model weights (default: delete them once the arm is evaluated)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, applied to every arm")
    args = parser.parse_args(argv)
    from lm_lexicon.config import load_config
    from lm_lexicon.experiments import run_ablation

    try:
        cfg = load_config(args.config, args.overrides)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not seeds:
            raise ConfigError("--seeds is empty")
    except (ConfigError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    out = Path(args.out or f"{cfg.output_dir}-ablation")
    metrics = [m for m in args.metrics.split(",") if m]
    studies = ["partition", "routing", "features"] if args.study == "all" else [args.study]
    for study in studies:
        # the default partition arm's experts feed the routing arms: kept until the routing study has used them
        run_ablation(study, args.config, args.overrides, seeds, out, metrics=metrics, keep_weights=args.keep_weights,
                     keep_shared_upstream=study == "partition" and "routing" in studies)
    print(f"ablations finished: {', '.join(str(out.resolve() / f'{s}.md') for s in studies)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
