"""The paper's ablations on a recipe: partition method (Table 3: semantic / lexical / random / none) and routing
policy (Table 4: domain / token top-1 / token top-2 / soft- and hard-sequence), over seeds, with mean ± std and a
paired permutation test against the default arm. Writes {study}.md, {study}.png and {study}.json under --out.

    python jobs/ablate.py --config configs/ablation.yaml --study all --seeds 21,42,84 --out runs/ablation
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
    parser.add_argument("--study", choices=["partition", "routing", "all"], default="all")
    parser.add_argument("--seeds", default="21,42,84", help="comma-separated seeds (paper: 21, 42, 84)")
    parser.add_argument("--metrics", default="bleu_a,rouge_l", help="metrics in the tables")
    parser.add_argument("--out", default=None, help="ablation directory (default: <output_dir>-ablation)")
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
    studies = ["partition", "routing"] if args.study == "all" else [args.study]
    for study in studies:
        run_ablation(study, args.config, args.overrides, seeds, out, metrics=metrics)
    print(f"ablations finished: {', '.join(str(out.resolve() / f'{s}.md') for s in studies)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
