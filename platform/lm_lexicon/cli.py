"""`lm-lexicon`: the command line. Each command is a thin wrapper over a library function; the scripts under jobs/
(what ``ray job submit`` runs) call these commands."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from lm_lexicon.config import ConfigError, load_config
from lm_lexicon.pipeline import STAGES

app = typer.Typer(help="LM-Lexicon: Split-then-Merge definition modeling on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Build, summarise and browse the definition-modeling data.", no_args_is_help=True)
config_app = typer.Typer(help="Show and validate recipes.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
# A pipe or a CI log is not 80 columns wide in spirit: keep the tables readable there.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

_options = {"verbose": False}


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="Stage commands: also show Ray's, Tune's, transformers' and MLflow's logs "
                                           "live (they always go to <output_dir>/logs/pipeline.log).")) -> None:
    """LM-Lexicon: Split-then-Merge definition modeling on Ray."""
    _options["verbose"] = verbose


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe (default: the built-in tiny defaults).")
OverridesArg = typer.Argument(None, help="Overrides: section.field=value ...")


def _recipe_option(default: str, help: str = "YAML recipe."):
    return typer.Option(Path(default), "--config", "-c", help=help)


def say(message: str) -> None:
    """A line as it is: no markup, no highlighting, never wrapped (a path stays whole)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def say_error(message: str) -> None:
    """One line on stderr (red on a terminal)."""
    err_console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)


def _config(path: Optional[Path], overrides: Optional[List[str]]):
    """The recipe with its overrides, or its error in one line on stderr and exit 2."""
    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        _usage_error(str(e))


def _comma_list(text: Optional[str]) -> tuple[str, ...]:
    return tuple(s for s in (text or "").split(",") if s)


def _usage_error(message: str) -> NoReturn:
    say_error(message)
    raise typer.Exit(2)


def _int_list(text: str) -> list[int]:
    """Comma-separated whole numbers (spaces allowed), or the parse error in one line and exit 2."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        _usage_error(str(e))


def _load_corpus(cfg):
    """The recipe's corpus, or a red message and exit 2 for input that cannot be read (a missing file or
    dictionary, which names the package to install): a message, not a stack trace."""
    from lm_lexicon.data.corpus import load_corpus
    from lm_lexicon.data.records import LoadError

    try:
        return load_corpus(cfg.data)
    except LoadError as e:
        console.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(2)


def print_reports(reports) -> None:
    table = Table(title="Loaded sources")
    for col in ("source", "read", "kept", "rejected", "reasons"):
        table.add_column(col, justify="right" if col in ("read", "kept", "rejected") else "left")
    for r in reports:
        reasons = "; ".join(f"{k}: {v}" + (f" (first at {r.examples[k]})" if k in r.examples else "")
                            for k, v in r.rejected.most_common())
        table.add_row(r.source, str(r.read), str(r.kept), str(r.n_rejected), reasons or "-")
    console.print(table)


def print_stats(stats: dict, hist: dict | None = None, out: Console | None = None) -> None:
    out = out or console
    table = Table(title="Corpus by split")
    cols = ("split", "rows", "terms", "definitions", "with context", "def. words mean", "median", "p95", "max", "sources")
    for col in cols:
        table.add_column(col, justify="left" if col in ("split", "sources") else "right")
    for split, s in stats["splits"].items():
        d = s["definition_words"]
        sources = ", ".join(f"{k} {v}" for k, v in list(s["sources"].items())[:4])
        table.add_row(split, f"{s['rows']:,}", f"{s['terms']:,}", f"{s['definitions']:,}", f"{s['with_context']:,}",
                      f"{d['mean']}", f"{d['median']}", f"{d['p95']}", f"{d['max']}", sources)
    out.print(table)
    ov = Table(title="Overlap across splits (a leak-free split has 0 shared terms)")
    for col in ("splits", "shared terms", "shared definitions"):
        ov.add_column(col)
    for pair, o in stats["overlap"].items():
        ov.add_row(pair, str(o["shared_terms"]), str(o["shared_definitions"]))
    out.print(ov)
    if hist:
        h = Table(title="Definition length (words)")
        h.add_column("bucket")
        for split in hist:
            h.add_column(split, justify="right")
        labels = [b for b, _ in next(iter(hist.values()))]
        for i, label in enumerate(labels):
            h.add_row(label, *[str(hist[s][i][1]) for s in hist])
        out.print(h)


@data_app.command("build")
def data_build(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
               out: Optional[Path] = typer.Option(None, help="Output dir (default: <output_dir>/data).")) -> None:
    """Load the recipe's sources, split and subsample them, and write {split}.jsonl + data.json."""
    from lm_lexicon.data.corpus import corpus_stats, length_histogram, save_corpus

    cfg = _config(config, overrides)
    corpus = _load_corpus(cfg)
    target = save_corpus(corpus, out or Path(cfg.output_dir) / "data", cfg.model_dump(mode="json"))
    print_reports(corpus.reports)
    for split, s in corpus.subsampled.items():
        console.print(f"{split}: seeded sample of {s['kept']:,} of {s['available']:,} rows (seed {s['seed']})")
    print_stats(corpus_stats(corpus.splits), length_histogram(corpus.splits))
    console.print(f"wrote {target}")


@data_app.command("build-wordnet")
def data_build_wordnet(
        wordnet_dir: Optional[Path] = typer.Option(None, help="WordNet 3.0 dict dir (default: auto-detect)."),
        out: Optional[Path] = typer.Option(None, help="Output dir (default: the package's resources/)."),
        seed: int = typer.Option(0, help="Seed of the split assignment.")) -> None:
    """Rebuild the embedded WordNet definition-modeling corpus from a WordNet dict directory."""
    from lm_lexicon.data import wordnet

    try:
        paths = wordnet.write_packaged_corpus(wordnet_dir=wordnet_dir, out_dir=out, seed=seed)[:2]
    except FileNotFoundError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")


@data_app.command("stats")
def data_stats(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
               as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Summarise the recipe's data: rows read/kept/rejected per source, counts per split, lengths, overlaps."""
    from lm_lexicon.data.corpus import corpus_stats, length_histogram

    cfg = _config(config, overrides)
    corpus = _load_corpus(cfg)
    stats = corpus_stats(corpus.splits)
    if as_json:
        json.dump({"reports": [r.to_dict() for r in corpus.reports], "stats": stats,
                   "subsampled": corpus.subsampled}, sys.stdout, indent=2)
        print()
        return
    print_reports(corpus.reports)
    for split, s in corpus.subsampled.items():
        console.print(f"{split}: seeded sample of {s['kept']:,} of {s['available']:,} rows (seed {s['seed']})")
    print_stats(stats, length_histogram(corpus.splits))


@data_app.command("show")
def data_show(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
              split: str = typer.Option("train", help="train, valid or test."),
              term: Optional[str] = typer.Option(None, help="Only rows of this term (case-insensitive)."),
              n: int = typer.Option(10, help="Rows to show."),
              prompts: bool = typer.Option(False, help="Show the formatted prompt (the recipe's templates) instead of "
                                                       "the raw context.")) -> None:
    """Print a few rows of a split."""
    from lm_lexicon.data.prompts import PromptTemplates, record_prompt

    if split not in ("train", "valid", "test"):
        console.print(f"[red]unknown split {split!r}; expected train, valid or test[/red]")
        raise typer.Exit(2)
    cfg = _config(config, overrides)
    rows = _load_corpus(cfg)[split]
    if term:
        rows = [r for r in rows if r.term.lower() == term.lower()]
    table = Table(title=f"{split}: {len(rows):,} rows" + (f" for {term!r}" if term else ""), show_lines=True)
    for col in ("term", "prompt" if prompts else "context", "definition", "source"):
        table.add_column(col, overflow="fold")
    templates = PromptTemplates.from_config(cfg)
    for r in rows[:n]:
        shown = record_prompt(r, templates) if prompts else r.context
        table.add_row(r.term, shown, r.definition, r.source)
    console.print(table)


@contextlib.contextmanager
def _pipeline_run(cfg, stages: Optional[tuple[str, ...]], force: tuple[str, ...], verbose: bool,
                  stop: Optional[dict] = None, announce: bool = False):
    """Run stages under the quiet terminal (:mod:`lm_lexicon.console`): the project's lines and bars here, every
    library's output in <output_dir>/logs/pipeline.log (``--verbose`` shows it live too). Yields (terminal, results).

    Exit 2 with the message for bad input, 1 with one line (the traceback in the log) for any other failure, and,
    inside :func:`~lm_lexicon.ray_utils.clean_exit` (``stop``), 128 + the signal when interrupted."""
    from lm_lexicon.console import pipeline_terminal
    from lm_lexicon.pipeline import run_pipeline
    from lm_lexicon.ray_utils import STOP_TIMEOUT_S
    from lm_lexicon.seed_models import SeedUnavailable

    with pipeline_terminal(cfg.output_dir, verbose=verbose) as term:
        if announce:
            term.line(f"lm-lexicon pipeline {cfg.name!r}: logs of Ray, Tune, transformers and MLflow go to "
                      f"{term.log_path}" + ("" if verbose else " (--verbose shows them)"))
        try:
            results = run_pipeline(cfg, stages=stages, force=force, log=term.line)
        except KeyboardInterrupt:
            if stop is None:
                raise
            term.notice("error", f"interrupted ({stop['signal'] or 'SIGINT'}): stopping every process of the run "
                                 f"(at most {STOP_TIMEOUT_S:.0f} s); a re-run resumes after the last finished stage")
            raise typer.Exit(stop["exit_code"])
        except (ValueError, SeedUnavailable) as e:  # bad input (empty split, N > rows, a missing package, ...)
            term.err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True, style="bold red")
            raise typer.Exit(2)
        except Exception as e:  # one line here, the traceback in the log
            term.fail(e)
            raise typer.Exit(1)
        yield term, results


def _run_stages(config, overrides, stages: tuple[str, ...], force: bool):
    """One stage (and those it needs) for a stage command; its tables are printed after the terminal closed."""
    cfg = _config(config, overrides)
    with _pipeline_run(cfg, stages, stages if force else (), _options["verbose"]) as (term, results):
        term.line(term.summary())
    return cfg, results


@app.command("run")
def run_cmd(config: Path = _recipe_option("configs/tiny.yaml"), overrides: Optional[List[str]] = OverridesArg,
            stages: Optional[str] = typer.Option(None, help=f"Comma-separated subset of {','.join(STAGES)}."),
            force: str = typer.Option("", help="Comma-separated stages to recompute even if finished."),
            verbose: bool = typer.Option(False, "--verbose", "-v",
                                         help="Also show Ray's, Tune's, transformers' and MLflow's logs live (they "
                                              "always go to <output_dir>/logs/pipeline.log).")) -> None:
    """Run the whole pipeline: data, partition, experts, merge, evaluate, export (resumable).

    A re-run skips the finished stages. Ctrl-C or SIGTERM stops every process of the run within 30 s.
    `ray job submit -- python jobs/pipeline.py` runs this command."""
    from lm_lexicon.ray_utils import clean_exit

    cfg = _config(config, overrides)
    verbose = verbose or _options["verbose"]
    with clean_exit() as stop:  # SIGTERM / Ctrl-C: every process the run started is gone within STOP_TIMEOUT_S
        with _pipeline_run(cfg, _comma_list(stages) or None, _comma_list(force), verbose, stop,
                           announce=True) as (term, results):
            print_summary(cfg, results, term.console)
            term.line(f"pipeline finished in {results['_seconds']:.1f}s; artifacts under "
                      f"{Path(cfg.output_dir).resolve()}; {term.summary()}")


def print_summary(cfg, results: dict, out: Console) -> None:
    """The evaluation's headline table and example lines (or the data statistics when the run stopped before
    evaluate)."""
    if "evaluate" in results:
        from lm_lexicon.evaluate.stage import example_rows

        ev = results["evaluate"]
        headline = ev.summary["headline"]
        metrics = sorted({m for res in headline.values() for m in res})
        table = Table(title=f"{cfg.name}: {ev.summary['split']} split, {ev.summary['n_rows']} rows")
        table.add_column("model")
        for m in metrics:
            table.add_column(m, justify="right")
        for model, res in headline.items():
            table.add_row(model, *[f"{res[m]:.2f}" if res.get(m) is not None else "skipped" for m in metrics])
        out.print(table)
        examples = example_rows(ev.path)
        if examples:
            shown = Table(title="What the models write (5 test lines spread over the sample)", show_lines=True)
            for column in examples[0]:
                shown.add_column(column, overflow="fold")
            for row in examples:
                shown.add_row(*[str(v) for v in row.values()])
            out.print(shown)
        out.print(f"report: {ev.path / 'report.html'} (markdown: {ev.path / 'report.md'})", markup=False,
                  highlight=False, soft_wrap=True)
    elif "data" in results:
        print_stats(results["data"].summary["stats"], out=out)


@app.command("partition")
def partition_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
                  force: bool = typer.Option(False, help="Recompute even if a finished stage matches.")) -> None:
    """Embed the training prompts on Ray Data and split them into balanced semantic domains (resumable)."""
    cfg, results = _run_stages(config, overrides, ("partition",), force)
    res = results["partition"]
    s = res.summary
    table = Table(title=f"Partition: {s['method']}, N={s['n_experts']} ({'reused' if res.reused else 'computed'})")
    for col in ("domain", "rows"):
        table.add_column(col, justify="right")
    for d, n in enumerate(s["sizes"]):
        table.add_row(str(d), f"{n:,}")
    console.print(table)
    console.print(f"mean cohesion {s['cohesion_mean']:.3f}, mean separation {s['separation_mean']:.3f}; "
                  f"report: {res.path / 'cluster_report.md'}, plot: {res.path / 'clusters.png'}")


@app.command("seed")
def seed_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Build (once) and cache the recipe's seed model; print where it is."""
    from lm_lexicon.seed_models import resolve_seed_model

    from lm_lexicon.seed_models import SeedUnavailable

    cfg = _config(config, overrides)
    try:
        console.print(f"seed model {cfg.seed_model.name!r}: {resolve_seed_model(cfg.seed_model.name)}")
    except SeedUnavailable as e:
        console.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(2)


@app.command("train-experts")
def train_experts_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
                      force: bool = typer.Option(False, help="Retrain even if a finished stage matches.")) -> None:
    """Train one expert per domain plus the dense baseline on Ray Train (resumable; partitions first if needed)."""
    cfg, results = _run_stages(config, overrides, ("experts",), force)
    res = results["experts"]
    table = Table(title=f"Experts ({'reused' if res.reused else 'trained'}): validation loss on each domain")
    for col in ("domain", "rows", "expert", "dense", "expert better"):
        table.add_column(col, justify="right")
    for row in res.summary["own_domain_validation"]:
        table.add_row(str(row["domain"]), str(row["n_valid"]), f"{row['expert_loss']:.3f}",
                      f"{row.get('dense_loss', float('nan')):.3f}", str(row.get("expert_better", "-")))
    console.print(table)
    console.print(f"models under {res.path}")


@app.command("merge")
def merge_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
              force: bool = typer.Option(False, help="Re-merge even if a finished stage matches.")) -> None:
    """Merge the experts into one MoE and fine-tune its router and experts (earlier stages run first if needed)."""
    cfg, results = _run_stages(config, overrides, ("merge",), force)
    res = results["merge"]
    ft = res.summary.get("finetune") or {}
    console.print(f"MoE ({res.summary['routing']} routing, {res.summary['n_experts']} experts): {res.path / 'model'}"
                  + (f"; fine-tune {ft.get('steps')} steps, valid loss {ft.get('valid_loss')}" if ft else ""))


@app.command("evaluate")
def evaluate_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
                 force: bool = typer.Option(False, help="Re-evaluate even if a finished stage matches.")) -> None:
    """Evaluate the MoE, the dense model and the baselines on the recipe's split (earlier stages run first if needed).

    Prints the headline table and a few example lines; writes report.html and report.md."""
    cfg, results = _run_stages(config, overrides, ("evaluate",), force)
    print_summary(cfg, results, console)


EXPORT_FORMATS = ("hf", "gguf")


@app.command("export")
def export_cmd(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
               force: bool = typer.Option(False, help="Re-export even if a finished stage matches."),
               export_format: str = typer.Option("hf", "--format", help="hf: the Hugging Face checkpoints only. "
                                                 "gguf: also one GGUF file + Ollama Modelfile per domain, with the "
                                                 "router, under <output_dir>/export/gguf (llama.cpp, Ollama)."),
               gguf_dtype: str = typer.Option("bf16", help="GGUF tensor type: bf16 (exact for bf16 experts), f16 "
                                                           "or f32. Quantise afterwards with llama-quantize."),
               gguf_metadata: Optional[Path] = typer.Option(None, help="A GGUF of the same base model to copy the "
                                                                       "tokenizer from (default: the seed's own GGUF, "
                                                                       "for bundled-smollm2).")) -> None:
    """Export the MoE for the ecosystem: per-domain dense checkpoints + router (domain), or Mixtral (token);
    with --format gguf also GGUF files for llama.cpp and Ollama."""
    from lm_lexicon.moe.gguf import GGUF_DTYPES

    if export_format not in EXPORT_FORMATS or gguf_dtype not in GGUF_DTYPES:
        console.print(f"--format must be one of {', '.join(EXPORT_FORMATS)} and --gguf-dtype one of "
                      f"{', '.join(GGUF_DTYPES)}", style="red", markup=False, highlight=False)
        raise typer.Exit(2)
    cfg, results = _run_stages(config, overrides, ("export",), force)
    for kind, path in results["export"].summary.items():
        console.print(f"{kind}: {path}")
    if export_format == "gguf":
        _export_gguf(cfg, results["export"].path, gguf_dtype, gguf_metadata)


def _export_gguf(cfg, export_dir: Path, dtype: str, metadata: Optional[Path]) -> None:
    from lm_lexicon.seed_models import SeedUnavailable
    from lm_lexicon.moe.stage import export_gguf_files

    try:
        manifest = export_gguf_files(cfg, export_dir, dtype=dtype, metadata_from=metadata,
                                     log=lambda m: console.print(m, markup=False, highlight=False))
    except (ValueError, FileNotFoundError, SeedUnavailable) as e:  # GGUFExportError is a ValueError
        console.print(f"error: {e}", style="bold red", markup=False, highlight=False)
        raise typer.Exit(2)
    console.print(f"gguf: {export_dir / 'gguf'} ({manifest['n_domains']} domains, {manifest['dtype']}; "
                  f"README.md there says how to run them)", markup=False, highlight=False)


@app.command("scan")
def scan_cmd(config: Path = _recipe_option("configs/tiny.yaml", "YAML recipe (the base of every trial)."),
             overrides: Optional[List[str]] = typer.Argument(None, help="section.field=value, applied to every trial."),
             ns: str = typer.Option("1,2,4,8", help="Comma-separated expert counts."),
             out: Optional[Path] = typer.Option(None, help="Scan directory (default: <output_dir>-scan)."),
             max_concurrent: int = typer.Option(1, help="Trials at once."),
             trial_cpus: float = typer.Option(0.0, help="CPUs the trial actor itself reserves."),
             seeds: str = typer.Option("", help="Comma-separated seeds: one trial per N and seed, mean ± std over "
                                                "them (default: the recipe's seeds, one trial per N)."),
             keep_weights: bool = typer.Option(False, help="Keep every trial's model weights (default: delete them "
                                                           "once the trial is evaluated).")) -> None:
    """Scan the number of experts with Ray Tune (paper Fig. 5): one whole pipeline per N (and seed).

    Each trial is evaluated on the validation split; writes scan.md, scan.png and scan.json under --out; a re-run
    skips finished trials. On a 2-CPU machine keep --max-concurrent 1 (a trial's stages need both CPUs).
    `ray job submit -- python jobs/tune_experts.py` runs this command."""
    from lm_lexicon.experiments import expert_count_scan
    from lm_lexicon.ray_utils import STOP_TIMEOUT_S, clean_exit

    cfg = _config(config, overrides)
    counts = _int_list(ns)
    if not counts or min(counts) < 1:
        _usage_error(f"--ns must list expert counts >= 1, got {ns!r}")
    out = Path(out or f"{cfg.output_dir}-scan")
    with clean_exit() as stop:  # SIGTERM / Ctrl-C: the trials' pipelines and Ray are gone within STOP_TIMEOUT_S
        try:
            result = expert_count_scan(str(config), overrides or [], counts, out, max_concurrent_trials=max_concurrent,
                                       trial_cpus=trial_cpus, name=cfg.name, seeds=_int_list(seeds),
                                       keep_weights=keep_weights)
        except KeyboardInterrupt:
            say_error(f"scan interrupted ({stop['signal'] or 'SIGINT'}): stopping its trials and Ray (at most "
                      f"{STOP_TIMEOUT_S:.0f} s); finished trials are under {out.resolve()}")
            raise typer.Exit(stop["exit_code"])
    say(f"scan of N={counts} finished: {out.resolve() / 'scan.md'}, plot {out.resolve() / 'scan.png'}")
    raise typer.Exit(0 if result["rows"] else 1)


ABLATION_STUDIES = ("partition", "routing", "features", "recipe")


@app.command("ablate")
def ablate_cmd(config: Path = _recipe_option("configs/ablation.yaml"),
               overrides: Optional[List[str]] = typer.Argument(None, help="section.field=value, applied to every arm."),
               study: str = typer.Option("all", help="partition, routing, features, recipe or all (all "
                                                     "four, in that order)."),
               seeds: str = typer.Option("21,42,84", help="Comma-separated seeds (paper: 21, 42, 84)."),
               metrics: str = typer.Option("bleu_a,rouge_l", help="Metrics in the tables."),
               out: Optional[Path] = typer.Option(None, help="Ablation directory (default: <output_dir>-ablation)."),
               keep_weights: bool = typer.Option(False, help="Keep every arm's model weights (default: delete them "
                                                             "once the arm is evaluated).")) -> None:
    """Run the paper's ablations: partition method, routing policy, cluster features, training recipe (over seeds).

    Partition method (Table 3), routing policy (Table 4), what the clusters are made of, and the training recipe (the
    MoE against dense, no router fine-tune, compute-matched experts, full training), with mean ± std and a paired
    permutation test against the default arm. Writes {study}.md, .png and .json under --out; a re-run skips
    finished arms. `ray job submit -- python jobs/ablate.py` runs this command."""
    from lm_lexicon.experiments import run_ablation

    if study not in (*ABLATION_STUDIES, "all"):
        _usage_error(f"--study must be one of {', '.join(ABLATION_STUDIES)} or all, got {study!r}")
    cfg = _config(config, overrides)
    seed_list = _int_list(seeds)
    if not seed_list:
        _usage_error("--seeds is empty")
    out = Path(out or f"{cfg.output_dir}-ablation")
    studies = list(ABLATION_STUDIES) if study == "all" else [study]
    for name in studies:
        # the default partition arm's experts feed the routing arms: kept until the routing study has used them
        run_ablation(name, str(config), overrides or [], seed_list, out, metrics=list(_comma_list(metrics)),
                     keep_weights=keep_weights, keep_shared_upstream=name == "partition" and "routing" in studies)
    say(f"ablations finished: {', '.join(str(out.resolve() / f'{s}.md') for s in studies)}")


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied) as YAML."""
    import yaml

    cfg = _config(config, overrides)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), markup=False, highlight=False)


@config_app.command("validate")
def config_validate(paths: List[Path] = typer.Argument(..., help="Recipes to validate.")) -> None:
    """Validate recipes; exit 2 on the first invalid one."""
    bad = 0
    for p in paths:
        try:
            load_config(p)
            console.print(f"[green]ok[/green] {p}")
        except ConfigError as e:
            bad += 1
            console.print(f"[red]{e}[/red]")
    raise typer.Exit(2 if bad else 0)


@app.command("serve")
def serve_cmd(
        output_dir: Path = typer.Argument(..., help="Pipeline output directory (e.g. runs/tiny)."),
        host: str = typer.Option("127.0.0.1", help="HTTP bind address."),
        port: int = typer.Option(8000, help="HTTP port."),
        args_file: Optional[Path] = typer.Option(None, "--args", help="YAML/JSON of ServeArgs fields (see "
                                                                      "serve_app/serve_config.yaml's args)."),
        max_batch_size: Optional[int] = typer.Option(None, help="@serve.batch size of every expert."),
        auth_token_env: Optional[str] = typer.Option(None, help="Env var holding the bearer token (default "
                                                                "LM_LEXICON_API_TOKEN; auth is off when unset)."),
        address: Optional[str] = typer.Option(None, help="Connect to a running Ray cluster instead of starting one."),
        reserve_cpus: bool = typer.Option(False, help="Keep the args' CPU reservations (default: 0 per replica "
                                                      "locally, so every expert fits on a laptop)."),
        insecure: bool = typer.Option(False, "--insecure", help="Serve without a bearer token on a non-loopback "
                                                                "--host (refused otherwise).")) -> None:
    """Serve a pipeline's experts over HTTP with Ray Serve (router + one expert per domain + scorer). Ctrl-C or
    SIGTERM stops it and every process it started (Ray's included) within 30 s."""
    import yaml

    from lm_lexicon.ray_utils import STOP_TIMEOUT_S, clean_exit
    from lm_lexicon.serving.local import serve_local

    overrides: dict = {}
    if args_file is not None:
        try:
            overrides = yaml.safe_load(args_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            console.print(f"[red]cannot read {args_file}: {e}[/red]")
            raise typer.Exit(2)
        if not isinstance(overrides, dict):
            console.print(f"[red]{args_file} must hold a mapping of ServeArgs fields[/red]")
            raise typer.Exit(2)
    if max_batch_size is not None:
        overrides.setdefault("expert", {})["max_batch_size"] = max_batch_size
    if auth_token_env is not None:
        overrides["auth_token_env"] = auth_token_env
    code = 0
    with clean_exit(STOP_TIMEOUT_S) as stop:
        try:
            serve_local(output_dir, host=host, port=port, overrides=overrides, address=address,
                        local_resources=not reserve_cpus, insecure=insecure, log=say)
        except KeyboardInterrupt:  # during start-up (serve_local handles it once serving)
            say("interrupted; shutting down")
        except (FileNotFoundError, ValueError, RuntimeError) as e:  # pydantic's ValidationError is a ValueError
            console.print(str(e), style="red", markup=False, highlight=False, soft_wrap=True)
            code = 2
    done = stop["stopped"]
    if done and done["owned_ray"]:
        say(f"stopped: Ray shut down and {done['terminated']} leftover processes ended ({done['killed']} needed "
             f"SIGKILL) in {done['seconds']:.1f} s")
    if code:
        raise typer.Exit(code)


FORMATS = ("table", "json", "csv")
RESULT_COLUMNS = ("term", "context", "lang", "definition", "domain", "score", "selection")


@app.command("define")
def define_cmd(
        term: Optional[str] = typer.Argument(None, help="The term (omit with --input)."),
        context: str = typer.Option("", "--context", "-c", help="A usage example of the term."),
        lang: str = typer.Option("en", "--lang", "-l", help="Language code."),
        n: int = typer.Option(1, "--n", "-n", help="Best-of-n (1: greedy)."),
        scores: bool = typer.Option(False, "--scores", help="Return reward-model scores."),
        input_path: Optional[Path] = typer.Option(None, "--input", "-i", help="JSONL of {term, context?, lang?}, or "
                                                                              "a CSV with a term column."),
        output_path: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file (batch mode; default "
                                                                                "<input>.defined.jsonl / .csv)."),
        output_format: str = typer.Option("table", "--format", "-f",
                                          help="table | json | csv. One term: how it is printed. Batch mode: csv "
                                               "writes a CSV file, table and json a JSONL file (table also prints "
                                               "the first rows)."),
        batch_size: int = typer.Option(16, help="Rows per request (batch mode)."),
        concurrency: int = typer.Option(2, help="Requests in flight (batch mode)."),
        url: str = typer.Option("http://127.0.0.1:8000", envvar="LM_LEXICON_URL", help="Server URL."),
        token: Optional[str] = typer.Option(None, envvar="LM_LEXICON_API_TOKEN", help="Bearer token."),
        as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
        progress: bool = typer.Option(True, help="Progress bar (batch mode)."),
        backend: str = typer.Option("server", help="server: ask `lm-lexicon serve` at --url. gguf: run the GGUF "
                                                   "files of --export-dir here, on the CPU, with llama-cpp-python "
                                                   "(routing with the bundled router)."),
        export_dir: Optional[Path] = typer.Option(None, help="--backend gguf: the GGUF bundle (<output_dir>/export/"
                                                             "gguf, written by `lm-lexicon export --format gguf`)."),
        domain: Optional[int] = typer.Option(None, help="--backend gguf: use this domain instead of routing."),
        threads: Optional[int] = typer.Option(None, help="--backend gguf: llama.cpp threads (default: its own).")) -> None:
    """Ask a running server (`lm-lexicon serve`) for a definition, or define every row of a JSONL or CSV file;
    --backend gguf runs the exported GGUF files locally instead."""
    from lm_lexicon.serving.client import ApiClientError

    fmt = "json" if as_json else output_format.lower()
    if fmt not in FORMATS:
        console.print(f"unknown --format {output_format!r}; expected one of {', '.join(FORMATS)}", style="red",
                      markup=False, highlight=False)
        raise typer.Exit(2)
    if (term is None) == (input_path is None):
        console.print("[red]give a TERM or --input FILE (not both)[/red]")
        raise typer.Exit(2)
    client_cm = _define_client(backend, url, token, export_dir, domain, threads, n, scores)
    if backend == "gguf":
        concurrency = 1  # one llama.cpp context, one row at a time
    with client_cm as client:
        try:
            if input_path is not None:
                _define_batch(client, input_path, output_path, fmt, n=n, return_scores=scores,
                              batch_size=batch_size, concurrency=concurrency, progress=progress)
            res = client.define_one(term, context, lang, n=n, return_scores=scores)
        except ApiClientError as e:
            console.print(str(e), style="red", markup=False, highlight=False)
            raise typer.Exit(2 if 400 <= e.status < 500 else 1)
    if fmt == "json":
        print(json.dumps(res, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        _print_csv([res], context, lang)
    else:
        _print_definition(res)


def _define_client(backend: str, url: str, token: Optional[str], export_dir: Optional[Path], domain: Optional[int],
                   threads: Optional[int], n: int, scores: bool):
    """The server's client, or the local GGUF backend behind the same interface (exit 2 with a message when it
    cannot run: no bundle, llama-cpp-python missing, options it does not support)."""
    from lm_lexicon.serving.client import LexiconClient

    def fail(message: str):
        console.print(message, style="red", markup=False, highlight=False)
        raise typer.Exit(2)

    if backend == "server":
        return LexiconClient(url, token=token)
    if backend != "gguf":
        fail(f"unknown --backend {backend!r}; expected server or gguf")
    if export_dir is None:
        fail("--backend gguf needs --export-dir (the GGUF bundle: <output_dir>/export/gguf)")
    if n != 1 or scores:
        fail("--backend gguf decodes greedily and has no reward model: --n must be 1, no --scores")
    from lm_lexicon.serving.gguf_runtime import GGUFDefiner, GGUFRuntimeUnavailable, LocalClient

    try:
        definer = GGUFDefiner(export_dir, n_threads=threads)
        if domain is not None:
            definer.model(domain)  # an unknown domain fails here, before any row
    except (FileNotFoundError, ValueError, GGUFRuntimeUnavailable) as e:
        fail(str(e))
    return LocalClient(definer, domain=domain)


def _print_csv(results: list[dict], context: str, lang: str) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for r in results:
        row = {**r, "context": context, "lang": r.get("lang") or lang}
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in RESULT_COLUMNS])


def _print_definition(res: dict) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("term", res["term"])
    table.add_row("definition", res["definition"])
    table.add_row("domain", str(res["domain"]))
    if res.get("score") is not None:
        table.add_row("score", f"{res['score']:.3f}")
    table.add_row("selection", f"{res['selection']} ({res['timing_ms']['total']:.0f} ms)")
    console.print(table)
    if res.get("candidates"):
        alts = Table(title=f"{len(res['candidates'])} alternatives")
        for col, justify in (("#", "right"), ("definition", "left"), ("score", "right")):
            alts.add_column(col, justify=justify, overflow="fold")
        for i, c in enumerate(res["candidates"], start=1):
            mark = " (chosen)" if c["definition"] == res["definition"] else ""
            alts.add_row(str(i), c["definition"] + mark, "-" if c["score"] is None else f"{c['score']:.3f}")
        console.print(alts)


def _define_batch(client, input_path: Path, output_path: Optional[Path], fmt: str, **kw) -> None:
    """Batch mode of ``define``: exits 0 when some (or no) rows were defined, 1 when every row failed."""
    from lm_lexicon.serving.client import define_file

    file_format = "csv" if fmt == "csv" else "jsonl"
    out = output_path or input_path.with_name(f"{input_path.stem}.defined.{file_format}")
    try:
        s = define_file(client, input_path, out, output_format=file_format, **kw)
    except (OSError, ValueError) as e:  # unreadable file, a CSV without a term column
        console.print(str(e), style="red", markup=False, highlight=False)
        raise typer.Exit(2)
    console.print(f"{s.defined:,} of {s.rows:,} rows defined in {s.seconds:.1f} s -> {s.output}",
                  markup=False, highlight=False)
    if fmt == "table" and s.defined:
        rows = [json.loads(line) for line in Path(s.output).read_text(encoding="utf-8").splitlines()[:20]]
        table = Table(title=f"first {len(rows)} of {s.defined:,} definitions")
        for col in ("term", "definition", "domain"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(str(r.get("term")), str(r.get("definition")), str(r.get("domain")))
        console.print(table)
    if s.rejected:
        table = Table(title=f"{len(s.rejected)} rejected rows (all in {s.rejected_path})")
        table.add_column("line", justify="right")
        table.add_column("reason", overflow="fold")
        for r in s.rejected[:20]:
            table.add_row(str(r.line), r.reason)
        console.print(table)
    raise typer.Exit(0 if s.defined or not s.rows else 1)


def job_main(command: str) -> None:
    """What a script under jobs/ runs: ``python jobs/<script>.py ARGS`` is ``lm-lexicon COMMAND ARGS``."""
    app(args=[command, *sys.argv[1:]])


if __name__ == "__main__":
    app()
