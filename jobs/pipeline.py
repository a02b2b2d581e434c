"""The whole LM-Lexicon pipeline on the embedded default or any recipe.

    python jobs/pipeline.py --config configs/tiny.yaml [--verbose] [section.field=value ...]
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/tiny.yaml
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.config import ConfigError, load_config  # noqa: E402
from lm_lexicon.console import pipeline_terminal  # noqa: E402
from lm_lexicon.pipeline import STAGES, run_pipeline  # noqa: E402
from lm_lexicon.ray_utils import STOP_TIMEOUT_S, clean_exit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="configs/tiny.yaml", help="YAML recipe")
    parser.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--force", default="", help="comma-separated stages to recompute even if finished")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show Ray's, Tune's, transformers' and MLflow's logs live (they always go to "
                             "<output_dir>/logs/pipeline.log)")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    stages = tuple(s for s in args.stages.split(",") if s) if args.stages else None
    with clean_exit() as stop:  # SIGTERM / Ctrl-C: every process the run started is gone within STOP_TIMEOUT_S
        return run(cfg, args, stages, stop)


def run(cfg, args, stages, stop: dict) -> int:
    from lm_lexicon.seed_models import SeedUnavailable

    with pipeline_terminal(cfg.output_dir, verbose=args.verbose) as term:
        term.line(f"lm-lexicon pipeline {cfg.name!r}: logs of Ray, Tune, transformers and MLflow go to "
                  f"{term.log_path}" + ("" if args.verbose else " (--verbose shows them)"))
        try:
            results = run_pipeline(cfg, stages=stages, force=tuple(s for s in args.force.split(",") if s),
                                   log=term.line)
        except KeyboardInterrupt:
            term.notice("error", f"interrupted ({stop['signal'] or 'SIGINT'}): stopping every process of the run "
                                 f"(at most {STOP_TIMEOUT_S:.0f} s); a re-run resumes after the last finished stage")
            return stop["exit_code"]
        except (ValueError, SeedUnavailable) as e:  # bad input or a missing package: what to do, in full
            term.err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True, style="bold red")
            return 2
        except Exception as e:  # one line here, the traceback in the log
            term.fail(e)
            return 1
        print_summary(cfg, results, term.console)
        term.line(f"pipeline finished in {results['_seconds']:.1f}s; artifacts under "
                  f"{Path(cfg.output_dir).resolve()}; {term.summary()}")
    return 0


def print_summary(cfg, results: dict, console) -> None:
    """The evaluation's headline table (or the data statistics when the run stopped before evaluate)."""
    from lm_lexicon.cli import print_stats

    if "evaluate" in results:
        from rich.table import Table

        ev = results["evaluate"]
        headline = ev.summary["headline"]
        metrics = sorted({m for res in headline.values() for m in res})
        table = Table(title=f"{cfg.name}: {ev.summary['split']} split, {ev.summary['n_rows']} rows")
        table.add_column("model")
        for m in metrics:
            table.add_column(m, justify="right")
        for model, res in headline.items():
            table.add_row(model, *[f"{res[m]:.2f}" if res.get(m) is not None else "skipped" for m in metrics])
        console.print(table)
        from lm_lexicon.stages.evaluate import example_rows

        examples = example_rows(ev.path)
        if examples:
            shown = Table(title="What the models write (5 test lines spread over the sample)", show_lines=True)
            for column in examples[0]:
                shown.add_column(column, overflow="fold")
            for row in examples:
                shown.add_row(*[str(v) for v in row.values()])
            console.print(shown)
        console.print(f"report: {ev.path / 'report.html'} (markdown: {ev.path / 'report.md'})", markup=False,
                      highlight=False, soft_wrap=True)
    elif "data" in results:
        print_stats(results["data"].summary["stats"], out=console)


if __name__ == "__main__":
    sys.exit(main())
