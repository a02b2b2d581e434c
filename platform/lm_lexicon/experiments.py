"""Experiments over whole pipelines: the Ray Tune scan over the expert count (paper Fig. 5) and the ablations of the
partition method (Table 3), the routing policy (Table 4), the cluster features and the training recipe, with seeds,
mean ± std and a significance test.

**Scan** (:func:`expert_count_scan`): a Ray Tune grid over N; each trial runs ``jobs/pipeline.py`` at its N as a
subprocess that joins the same Ray cluster (``RAY_ADDRESS``), so the trial's own stages (Ray Data, a Tune grid of Ray
Train runs) are ordinary jobs of the cluster rather than a Tune run nested inside a Tune trial. The trial actor
reserves ``trial_cpus`` (default 0: it only waits, and asks Tune for 64 MB of memory instead), so on a 2-CPU machine one trial at a time
(``max_concurrent_trials=1``) leaves both CPUs to the stages and nothing deadlocks; on a cluster, raise
``max_concurrent_trials`` and the pipelines run side by side. Each trial evaluates on the validation split and
reports the MoE's metrics to Tune. Given seeds, the grid is N x seed and each N's row is the mean ± std over its
seeds. Trials keep their metrics and predictions and, like ablation arms, lose their weights once evaluated.

**Ablations** (:func:`run_ablation`): variants x seeds, each a pipeline in its own output directory. Routing
variants differ only from the merge stage on, so they link the data / partition / experts stages of the default
variant of the same seed (a symlink; the stage fingerprints prove they are the same) and compute merge, evaluate and
export only. Per variant: mean ± sample std over seeds of each metric (the seed's mean over test items); against the
default variant, a paired sign-flip permutation test on the per-item scores averaged over seeds (same test items in
every variant: ``data.seed`` is fixed). The ``features`` study compares what the semantic clusters are made of
(prompt / definition / prompt+definition); its prompt arm *is* the partition study's semantic arm (same directory).
The ``recipe`` study puts the default MoE beside the dense model (the partition study's ``none`` arm) and beside
other training choices: no router fine-tune, compute-matched experts, full training of MoE and dense.

Disk: an evaluated arm keeps its metrics, predictions, reports and configs, and its model weights (experts, dense,
merged model, exports; see :func:`prune_weights`) are deleted unless ``keep_weights``. Its ``ARM_DONE.json`` marker
records that it is complete (and what was deleted), so a resumed ablation skips it; if the arm's configuration has
changed since, its weight-bearing stages are recomputed from scratch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from lm_lexicon.metrics.statistics import mean_std, paired_permutation_test

REPO = Path(__file__).resolve().parents[2]
PIPELINE_SCRIPT = REPO / "jobs" / "pipeline.py"
SCAN_METRICS = ("bleu_a", "rouge_l", "bertscore")


# =================================================================================================== reading results
def evaluation(output_dir: str | Path) -> dict:
    """``evaluate/metrics.json`` of a finished pipeline: ``{"meta": ..., "results": {model: {metric: {...}}}}``."""
    path = Path(output_dir) / "evaluate" / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the pipeline did not finish its evaluate stage")
    return json.loads(path.read_text())


def per_item_scores(output_dir: str | Path, model: str = "moe", metrics: Sequence[str] = ("bleu_a", "rouge_l"),
                    settings=None) -> dict[str, np.ndarray]:
    """Per-test-item scores of one model's predictions (recomputed from ``predictions/{model}.jsonl`` with the
    headword references of the run's split), for paired tests."""
    from lm_lexicon.data.records import read_jsonl
    from lm_lexicon.metrics import compute_metrics
    from lm_lexicon.metrics.bleu import headword_references

    out = Path(output_dir)
    preds = [json.loads(line) for line in (out / "evaluate" / "predictions" / f"{model}.jsonl").open()]
    split = evaluation(out)["meta"]["split"]
    groups = headword_references(list(read_jsonl(out / "data" / f"{split}.jsonl")))
    res = compute_metrics(preds, list(metrics), settings, reference_groups=groups)
    return {m: np.asarray(res[m]["per_item"], dtype=np.float64) for m in metrics if res[m].get("per_item") is not None}


# =================================================================================================== a pipeline run
def run_pipeline_process(config: str | Path, overrides: Sequence[str], log_file: str | Path,
                         env: Optional[dict] = None, timeout: Optional[float] = None) -> None:
    """``python jobs/pipeline.py --config config overrides...`` in a child process; its output goes to
    ``log_file``; raises with the log's tail when it fails."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(PIPELINE_SCRIPT), "--config", str(Path(config).resolve()), *overrides]
    with log_file.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                              cwd=str(REPO), timeout=timeout, preexec_fn=_stop_with_parent())
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"pipeline failed (exit {proc.returncode}); log {log_file}:\n{tail}")


def _stop_with_parent():
    """A ``preexec_fn`` (Linux; None elsewhere): the child gets SIGTERM when its parent dies. A scan trial's actor is
    killed when the scan stops, and its pipeline must not live on as an orphan (``jobs/pipeline.py`` stops cleanly on
    SIGTERM). Everything is looked up here, in the parent: between fork and exec the child only calls prctl (an import
    there could deadlock on a lock another thread of this Ray worker held at the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl, pr_set_pdeathsig, sigterm = ctypes.CDLL(None, use_errno=True).prctl, 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


# =================================================================================================== Tune scan
def scan_run_dir(scan_dir: str | Path, n: int, seed: Optional[int] = None) -> Path:
    """Where the scan's pipeline at N experts (and seed) runs: ``n4`` or ``n4-s21``."""
    return Path(scan_dir) / (f"n{n}" if seed is None else f"n{n}-s{seed}")


def scan_trial_dirname(trial) -> str:
    """``n4-s21-<trial id>``, named as the trial's run directory: Tune's default directory name spells out the param
    space, with the MLflow run id and the Ray address in it."""
    return f"{scan_run_dir('', trial.config['n'], trial.config.get('seed')).name}-{trial.trial_id}"


def _scan_trial(trial: dict) -> None:
    """One Tune trial: the whole pipeline at ``trial['n']`` experts (and seed ``trial['seed']``, if any), evaluated on
    the validation split. A trial whose marker says it finished with this configuration is read, not rerun; an
    evaluated trial's weights are deleted unless ``trial['keep_weights']``."""
    from ray import tune

    from lm_lexicon.config import load_config

    n, seed = int(trial["n"]), trial.get("seed")
    out = scan_run_dir(trial["scan_dir"], n, seed)
    overrides = [*trial["overrides"], *([] if seed is None else _seed_overrides(int(seed))),
                 f"partition.n_experts={n}", f"output_dir={out}", f"resources.storage_path={out / 'ray'}",
                 "evaluate.split=valid", f"tracking.mlflow_uri={trial['mlflow_uri']}",
                 f"name={trial['name']}-{out.name}"]
    cfg_hash = config_hash(load_config(trial["config"], overrides))
    t0 = time.perf_counter()
    marker = read_arm_marker(out)
    if marker is not None and marker.get("config_hash") != cfg_hash:
        forget_finished_run(out, marker)
        marker = None
    if marker is None:
        try:
            run_pipeline_process(trial["config"], overrides, out / "pipeline.log", env=trial["env"])
        except RuntimeError as e:  # reported, not raised: Tune retries only trials whose node died
            tune.report({"n": n, "trial_error": str(e)})
            return
        seconds = round(time.perf_counter() - t0, 1)
        _write_arm_marker(out, cfg_hash, f"n{n}", seed, seconds=seconds,
                          pruned=None if trial.get("keep_weights") else prune_weights(out))
        marker = read_arm_marker(out)
    results = evaluation(out)["results"]
    report = {"n": n, "seconds": marker.get("seconds", time.perf_counter() - t0)}
    if seed is not None:
        report["seed"] = int(seed)
    for model in ("moe", "dense"):
        for m in SCAN_METRICS:
            value = results.get(model, {}).get(m, {}).get("value")
            if value is not None:
                report[f"{model}_{m}"] = float(value)
    tune.report(report)


def expert_count_scan(config: str | Path, overrides: Sequence[str], ns: Sequence[int], scan_dir: str | Path,
                      max_concurrent_trials: int = 1, trial_cpus: float = 0.0, name: str = "scan",
                      seeds: Sequence[int] = (), keep_weights: bool = False,
                      log: Callable[[str], None] = print) -> dict:
    """Ray Tune grid over N, and over ``seeds`` if given (module docstring); returns ``{"rows": [...], "trials":
    [...], "table": markdown}`` and writes ``scan.json``, ``scan.md`` and ``scan.png`` (metric vs N, mean ± std over
    the seeds) under ``scan_dir``. A rerun reads the trials that finished instead of running them again."""
    import ray
    from ray import tune

    from lm_lexicon.config import load_config
    from lm_lexicon.ray_utils import init_ray
    from lm_lexicon.tracking import mlflow_uri, parent_env, tracked_run

    scan_dir = Path(scan_dir).resolve()
    scan_dir.mkdir(parents=True, exist_ok=True)
    base = load_config(config, list(overrides))  # validate before launching anything
    init_ray(base.resources)
    uri = mlflow_uri(base.tracking, scan_dir)
    tracking = base.tracking.model_copy(update={"mlflow_uri": None})
    with tracked_run(tracking, scan_dir, f"{name}-expert-count", tags={"kind": "scan"}) as parent:
        parent.log_params({"ns": list(ns), "config": str(config), "overrides": list(overrides)})
        env = {**parent_env(parent), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        # Tune refuses an empty resource request; a trial that only waits on its subprocess asks for a little
        # memory instead of a CPU, which leaves every CPU to the pipeline it runs
        request = {"cpu": trial_cpus} if trial_cpus > 0 else {"cpu": 0, "memory": 64 * 1024 * 1024}
        trainable = tune.with_resources(_scan_trial, request)
        tuner = tune.Tuner(
            trainable,
            param_space={"n": tune.grid_search(sorted(set(int(n) for n in ns))), "scan_dir": str(scan_dir),
                         **({"seed": tune.grid_search([int(s) for s in seeds])} if seeds else {}),
                         "config": str(Path(config).resolve()), "overrides": list(overrides), "mlflow_uri": uri,
                         "env": env, "name": name, "keep_weights": keep_weights},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials, metric="moe_bleu_a",
                                        mode="max", trial_dirname_creator=scan_trial_dirname),
            run_config=tune.RunConfig(name=f"{name}-expert-count", storage_path=str(scan_dir / "tune"),
                                      verbose=0,
                                      # a trial whose node dies is run again: its pipeline resumes after the
                                      # stages it had finished
                                      failure_config=tune.FailureConfig(max_failures=base.resources.max_failures)))
        grid = tuner.fit()
        errors = [str(r.error or r.metrics.get("trial_error")) for r in grid
                  if r.error or (r.metrics or {}).get("trial_error")]
        if errors:
            raise RuntimeError(f"{len(errors)} scan trial(s) failed: {errors[0][:2000]}")
        trials = sorted((dict(r.metrics) for r in grid), key=lambda m: (m["n"], m.get("seed", 0)))
        trials = [{k: v for k, v in r.items() if k in ("n", "seed", "seconds") or k.startswith(("moe_", "dense_"))}
                  for r in trials]
        rows = add_paired_tests(aggregate_scan(trials), scan_paired_items(scan_dir, trials))
        for r in rows:
            parent.log_metrics({k: v for k, v in r.items() if k not in ("n", "seeds") and v is not None},
                               step=int(r["n"]))
        table = scan_table(rows)
        (scan_dir / "scan.json").write_text(json.dumps({"config": str(config), "overrides": list(overrides),
                                                        "seeds": list(seeds), "rows": rows, "trials": trials},
                                                       indent=2))
        (scan_dir / "scan.md").write_text(table + "\n")
        plot_scan(rows, scan_dir / "scan.png", title=f"{base.name}: validation metrics vs number of experts")
        for f in ("scan.md", "scan.png", "scan.json"):
            parent.log_artifact(scan_dir / f)
    log(table)
    return {"rows": rows, "trials": trials, "table": table}


def aggregate_scan(trials: Sequence[dict]) -> list[dict]:
    """One row per N: each metric's mean over the N's trials (one per seed) and, with two or more, its sample std
    (``{key}_std``); ``seconds`` is the trials' mean wall time."""
    rows = []
    for n in sorted({int(t["n"]) for t in trials}):
        group = [t for t in trials if int(t["n"]) == n]
        row: dict = {"n": n, "seeds": [t["seed"] for t in group if "seed" in t]}
        for key in sorted({k for t in group for k in t if k.startswith(("moe_", "dense_"))}):
            mean, std = mean_std([t[key] for t in group if key in t])
            row[key] = mean
            if std is not None:
                row[f"{key}_std"] = std
        row["seconds"] = float(np.mean([t.get("seconds", 0.0) for t in group]))
        rows.append(row)
    return rows


def scan_paired_items(scan_dir: str | Path, trials: Sequence[dict]) -> dict[int, dict[str, np.ndarray]]:
    """Each N's MoE per-item validation scores, averaged over its seeds (the rows are the same for every trial)."""
    items: dict[int, dict[str, np.ndarray]] = {}
    for n in sorted({int(t["n"]) for t in trials}):
        runs = [per_item_scores(scan_run_dir(scan_dir, n, t.get("seed")), "moe")
                for t in trials if int(t["n"]) == n]
        items[n] = {m: np.mean([r[m] for r in runs], axis=0) for m in runs[0]}
    return items


def add_paired_tests(rows: list[dict], items: dict[int, dict[str, np.ndarray]]) -> list[dict]:
    """``moe_{m}_delta`` and ``moe_{m}_p`` on every row after the first: the mean per-item difference from the
    smallest N and its two-sided paired sign-flip permutation p."""
    base = items[rows[0]["n"]]
    for r in rows[1:]:
        for m, scores in items[r["n"]].items():
            r[f"moe_{m}_delta"] = float(np.mean(scores - base[m]))
            r[f"moe_{m}_p"] = paired_permutation_test(scores, base[m])
    return rows


def _scan_cell(row: dict, key: str) -> str:
    if key not in row:
        return ""
    return f"{row[key]:.2f}" + (f" ± {row[key + '_std']:.2f}" if f"{key}_std" in row else "")


def _delta_cell(row: dict, key: str) -> str:
    return f"{row[key + '_delta']:+.2f} ({row[key + '_p']:.3f})" if f"{key}_p" in row else ""


def scan_table(rows: Sequence[dict]) -> str:
    """MoE columns, the dense model's where the trials trained one, and each MoE metric's difference from the
    smallest N with its paired p where the scan computed them."""
    metrics = [m for m in SCAN_METRICS if any(f"moe_{m}" in r for r in rows)]
    dense = [m for m in metrics if any(f"dense_{m}" in r for r in rows)]
    deltas = [m for m in metrics if any(f"moe_{m}_p" in r for r in rows)]
    head = ([f"MoE {m}" for m in metrics] + [f"dense {m}" for m in dense] +
            [f"Δ MoE {m} vs N={rows[0]['n']} (p)" for m in deltas] + ["minutes"])
    lines = ["| N | " + " | ".join(head) + " |", "|---:|" + "---:|" * len(head)]
    for r in rows:
        cells = ([_scan_cell(r, f"moe_{m}") for m in metrics] + [_scan_cell(r, f"dense_{m}") for m in dense] +
                 [_delta_cell(r, f"moe_{m}") for m in deltas] + [f"{r.get('seconds', 0) / 60:.1f}"])
        lines.append(f"| {r['n']} | " + " | ".join(cells) + " |")
    seeds = sorted({s for r in rows for s in r.get("seeds", [])})
    notes = []
    if len(seeds) > 1:
        notes.append(f"Mean ± sample std over seeds {', '.join(map(str, seeds))}")
    if deltas:
        notes.append("p: two-sided paired sign-flip permutation test on per-item validation scores (averaged over "
                     "seeds)")
    return "\n".join(lines + ([f"\n{'; '.join(notes)}; minutes: mean per trial."] if notes else []))


def plot_scan(rows: Sequence[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [m for m in SCAN_METRICS if any(f"moe_{m}" in r for r in rows)]
    fig = Figure(figsize=(4.0 * len(metrics), 3.6))
    FigureCanvasAgg(fig)
    ns = [r["n"] for r in rows]
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for model, style in (("moe", {"marker": "o", "label": "LM-Lexicon MoE"}),
                             ("dense", {"linestyle": "--", "marker": ".", "label": "dense"})):
            if not any(f"{model}_{m}" in r for r in rows):
                continue  # a scan without a dense model gets no empty legend entry
            ax.errorbar(ns, [r.get(f"{model}_{m}", math.nan) for r in rows],
                        yerr=[r.get(f"{model}_{m}_std", 0.0) for r in rows], capsize=3, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("number of experts N")
        ax.set_ylabel(f"{m} (×100)")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# =================================================================================================== ablations
@dataclass
class Variant:
    """One ablation arm: a name, its config overrides, and whether it reuses the default arm's upstream stages.

    ``same_as``: ``"study/variant"`` of an arm with the same configuration, whose run this arm reads (and runs,
    if it has not run yet) instead of repeating it."""

    name: str
    overrides: list[str]
    shares_upstream: bool = False
    label: str = ""
    same_as: Optional[str] = None


PARTITION_VARIANTS = [Variant("semantic", ["partition.method=semantic"], label="semantic (default)"),
                      Variant("lexical", ["partition.method=lexical"], label="lexical (TF-IDF)"),
                      Variant("random", ["partition.method=random"], label="random"),
                      Variant("none", ["partition.method=none", "partition.n_experts=1"], label="none (1 domain = dense)")]
ROUTING_VARIANTS = [Variant("domain", ["merge.routing=domain"], True, "domain (default)"),
                    Variant("token-top1", ["merge.routing=token", "merge.top_k=1"], True, "token top-1"),
                    Variant("token-top2", ["merge.routing=token", "merge.top_k=2"], True, "token top-2"),
                    Variant("soft-sequence", ["merge.routing=soft-sequence"], True, "soft-sequence"),
                    Variant("hard-sequence", ["merge.routing=hard-sequence"], True, "hard-sequence")]
FEATURE_VARIANTS = [Variant("prompt", ["partition.method=semantic", "partition.features=prompt"],
                            label="prompt (default)", same_as="partition/semantic"),
                    Variant("definition", ["partition.method=semantic", "partition.features=definition"],
                            label="definition (classifier-routed)"),
                    Variant("prompt+definition", ["partition.method=semantic", "partition.features=prompt+definition"],
                            label="prompt+definition (classifier-routed)")]
# does the method get a fair shot? The default MoE against the dense model (N=1) and against the training choices the
# paper could have made instead; the two arms that add `train.dense_baseline` also train a dense model on every
# domain, so their experts stage reports each expert's own-domain validation loss beside the dense model's (at equal
# epochs, and compute-matched: each expert as many steps as the dense model)
RECIPE_VARIANTS = [Variant("default", ["partition.method=semantic"], label="MoE: 1 epoch, FFN-only, router fine-tune "
                           "(default)", same_as="partition/semantic"),
                   Variant("dense", ["partition.method=none", "partition.n_experts=1"], label="dense (N=1)",
                           same_as="partition/none"),
                   Variant("no-finetune", ["finetune.enabled=false", "train.dense_baseline=true"],
                           label="MoE without the router fine-tune"),
                   Variant("compute-matched", ["train.expert_budget=steps", "train.dense_baseline=true"],
                           label="MoE, experts compute-matched (N passes over their domain)"),
                   Variant("full", ["train.trainable=all"], label="MoE, full training (non-FFN tensors averaged)"),
                   Variant("dense-full", ["partition.method=none", "partition.n_experts=1", "train.trainable=all"],
                           label="dense (N=1), full training")]
STUDIES = {"partition": PARTITION_VARIANTS, "routing": ROUTING_VARIANTS, "features": FEATURE_VARIANTS,
           "recipe": RECIPE_VARIANTS}
UPSTREAM = ("data", "partition", "experts")
ARM_DONE = "ARM_DONE.json"
WEIGHT_STAGES = ("experts", "merge", "export")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass
class AblationResult:
    study: str
    rows: list[dict] = field(default_factory=list)
    table: str = ""


def _seed_overrides(seed: int) -> list[str]:
    # the partition's k-means init and the training seed vary; data.seed stays, so every arm sees the same test rows
    return [f"partition.seed={seed}", f"train.seeds=[{seed}]"]


def _link_upstream(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for stage in UPSTREAM:
        link = target / stage
        if link.is_symlink() or link.exists():
            continue
        if not (source / stage / "_SUCCESS.json").exists():
            raise FileNotFoundError(f"{source / stage}: run the default arm first (it provides the shared stages)")
        link.symlink_to((source / stage).resolve(), target_is_directory=True)


def run_ablation(study: str, config: str | Path, overrides: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
                 metrics: Sequence[str] = ("bleu_a", "rouge_l"), model: str = "moe",
                 variants: Optional[Sequence[Variant]] = None, log: Callable[[str], None] = print,
                 keep_weights: bool = False, keep_shared_upstream: bool = False) -> AblationResult:
    """Every variant x seed of ``study`` (``partition``, ``routing``, ``features`` or ``recipe``), in process; writes
    ``{study}.json``, ``{study}.md`` and ``{study}.png`` under ``out_dir``. The first variant is the default the
    others are tested against. Routing arms link the upstream stages of ``out_dir/partition/semantic-s{seed}`` (run
    that study first, or let this function run the default partition arm when it is missing).

    Weights: each evaluated arm's are deleted unless ``keep_weights`` (module docstring). The default partition
    arm's experts are the routing arms' shared upstream: ``keep_shared_upstream`` keeps them after the partition
    study (pass it when the routing study follows), and the routing study deletes them once a seed's routing arms
    are done; when they were already deleted, the routing study retrains them first."""
    from lm_lexicon.config import load_config
    from lm_lexicon.pipeline import run_pipeline
    from lm_lexicon.tracking import tracked_run

    if study not in STUDIES:
        raise ValueError(f"study must be one of {list(STUDIES)}, got {study!r}")
    variants = list(variants or STUDIES[study])
    out_dir = Path(out_dir).resolve()
    base = load_config(config, list(overrides))
    found = StudyResults(study, variants, list(metrics), model)
    arm = _ArmRunner(base, config, overrides, out_dir, keep_weights, run_pipeline, load_config, log)
    with tracked_run(base.tracking, out_dir, f"{base.name}-ablation-{study}", tags={"kind": "ablation"}) as parent:
        parent.log_params({"study": study, "seeds": list(seeds), "variants": [v.name for v in variants]})
        for seed in seeds:
            default_arm = out_dir / "partition" / f"semantic-s{seed}"
            for v in variants:
                arm_dir = out_dir / (v.same_as or f"{study}/{v.name}")
                run_dir = arm_dir.parent / f"{arm_dir.name}-s{seed}"
                t0 = time.perf_counter()
                if v.shares_upstream and not arm.done(v, seed, run_dir):
                    arm.ensure_upstream(seed, default_arm)
                    _link_upstream(default_arm, run_dir)
                keep = WEIGHT_STAGES[:1] if (study == "partition" and v is variants[0] and keep_shared_upstream) \
                    else ()
                arm.run(v, seed, run_dir, keep_stages=keep)
                scores = found.read_arm(v, seed, run_dir)
                log(f"[ablate] {study}/{v.name} seed {seed}: " + ", ".join(f"{m} {scores[m]:.2f}" for m in metrics)
                    + f" ({time.perf_counter() - t0:.0f}s)")
            if study == "routing" and not keep_weights and default_arm.is_dir():
                arm.prune(default_arm)  # every routing arm of this seed is done with the shared experts
        details = found.details()
        rows, table = found.summary(list(seeds), details["by_source"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{study}.json").write_text(json.dumps(
            {"study": study, "seeds": list(seeds), "rows": rows, **details, "config": str(config),
             "overrides": list(overrides)}, indent=2))
        (out_dir / f"{study}.md").write_text(table + "\n")
        plot_ablation(study, rows, metrics, out_dir / f"{study}.png")
        written = [f"{study}.md", f"{study}.png", f"{study}.json"]
        if found.has_sources():
            plot_by_source(study, variants, details["by_source"], metrics, out_dir / f"{study}-by-source.png")
            written.append(f"{study}-by-source.png")
        for f in written:
            parent.log_artifact(out_dir / f)
    log(table)
    return AblationResult(study, rows, table)


class StudyResults:
    """What each arm x seed of a study found: test scores and per-item scores, each item's source, the clusters'
    facts and the own-domain losses; :meth:`summary` turns them into the study's rows and markdown."""

    def __init__(self, study: str, variants: Sequence[Variant], metrics: Sequence[str], model: str = "moe"):
        self.study, self.variants, self.metrics, self.model = study, list(variants), list(metrics), model
        names = [v.name for v in self.variants]
        self.scores: dict[str, dict[int, dict]] = {n: {} for n in names}
        self.items: dict[str, dict[int, dict[str, np.ndarray]]] = {n: {} for n in names}
        self.sources: dict[str, dict[int, list[str]]] = {n: {} for n in names}
        self.clusters: dict[str, dict[int, dict]] = {n: {} for n in names}
        self.own: dict[str, dict[int, list[dict]]] = {n: {} for n in names}

    def read_arm(self, variant: Variant, seed: int, run_dir: Path) -> dict:
        results = evaluation(run_dir)["results"][self.model]
        self.scores[variant.name][seed] = {m: results[m]["value"] for m in self.metrics}
        self.items[variant.name][seed] = per_item_scores(run_dir, self.model, self.metrics)
        self.sources[variant.name][seed] = item_sources(run_dir, self.model)
        self.clusters[variant.name][seed] = cluster_facts(run_dir)
        self.own[variant.name][seed] = own_domain_rows(run_dir)
        return self.scores[variant.name][seed]

    def has_sources(self) -> bool:
        """Whether the test items come from more than one source (a multi-source recipe)."""
        return len({src for per_seed in self.sources.values() for srcs in per_seed.values() for src in srcs}) > 1

    def details(self) -> dict:
        return {"by_source": summarize_by_source(self.variants, self.items, self.sources, self.metrics),
                "clusters": self.clusters, "own_domain": self.own}

    def summary(self, seeds: Sequence[int], by_source: dict) -> tuple[list[dict], str]:
        """The study's rows and markdown; ``by_source`` is :meth:`details`' per-source summary."""
        rows = summarize(self.variants, self.scores, self.items, self.metrics)
        parts = [ablation_table(self.study, rows, self.metrics, list(seeds))]
        if self.has_sources():
            parts.append("By source (test rows in brackets; mean ± std over seeds of the source's mean):\n\n" +
                         "\n\n".join(source_table(self.study, self.variants, by_source, m) for m in self.metrics))
        clusters = cluster_table(self.study, self.variants, self.clusters)
        if self.study in ("partition", "features") and clusters:
            parts.append("The clusters (purity: share of training rows whose domain's commonest value is theirs; "
                         "separation: mean inter-centroid cosine distance; router_accuracy: the prompt -> domain "
                         "classifier's held-out accuracy, where the clusters are not made of prompts):\n\n" + clusters)
        own = own_domain_table(self.variants, self.own)
        if own:
            parts.append("Experts against the dense model on their own domain (validation loss per definition "
                         "token):\n\n" + own)
        return rows, "\n\n".join(parts)


class _ArmRunner:
    """Runs one arm's pipeline, skips arms whose marker says they are complete, and deletes evaluated arms' weights."""

    def __init__(self, base, config, overrides, out_dir: Path, keep_weights: bool, run_pipeline, load_config, log):
        self.base, self.config, self.overrides, self.out_dir = base, config, list(overrides), out_dir
        self.keep_weights, self.run_pipeline, self.load_config, self.log = keep_weights, run_pipeline, load_config, log

    def arm_config(self, variant: Variant, seed: int, run_dir: Path):
        return self.load_config(self.config, [
            *self.overrides, *variant.overrides, *_seed_overrides(seed), f"output_dir={run_dir}",
            f"name={self.base.name}-{run_dir.name.rsplit('-s', 1)[0]}-s{seed}",
            f"resources.storage_path={run_dir / 'ray'}",
            f"tracking.mlflow_uri=sqlite:///{run_dir.parents[1] / 'mlflow.db'}"])

    def done(self, variant: Variant, seed: int, run_dir: Path) -> bool:
        """True when the arm finished with this configuration; a stale marker of a pruned arm clears its
        weight-bearing stages (they cannot be reused without their weights) so that they rerun."""
        marker = read_arm_marker(run_dir)
        if marker is None:
            return False
        if marker.get("config_hash") == config_hash(self.arm_config(variant, seed, run_dir)):
            return True
        self.log(f"[ablate] {run_dir.name}: its configuration changed since it ran; recomputing it")
        forget_finished_run(run_dir, marker)
        return False

    def run(self, variant: Variant, seed: int, run_dir: Path, keep_stages: Sequence[str] = ()) -> None:
        if self.done(variant, seed, run_dir):
            self.log(f"[ablate] {run_dir.name}: complete ({ARM_DONE}); reusing its results")
            if not self.keep_weights:
                self.prune(run_dir, keep_stages)  # a no-op unless a kept stage is no longer needed
            return
        cfg = self.arm_config(variant, seed, run_dir)
        self.run_pipeline(cfg, log=self.log)
        _write_arm_marker(run_dir, config_hash(cfg), variant.name, seed)
        if not self.keep_weights:
            self.prune(run_dir, keep_stages)

    def prune(self, run_dir: Path, keep_stages: Sequence[str] = ()) -> None:
        freed = prune_weights(run_dir, keep_stages)
        marker = read_arm_marker(run_dir)
        if marker is not None:
            before = marker.get("pruned") or {"stages": [], "files": 0, "checkpoints": 0, "bytes": 0}
            marker["pruned"] = {"stages": [st for st in WEIGHT_STAGES if st in {*before["stages"], *freed["stages"]}],
                                **{k: before.get(k, 0) + freed[k] for k in ("files", "checkpoints", "bytes")}}
            (run_dir / ARM_DONE).write_text(json.dumps(marker, indent=2))
        if freed["files"] or freed["checkpoints"]:
            self.log(f"[ablate] {run_dir.name}: deleted {freed['files']} weight file(s) "
                     f"({', '.join(freed['stages']) or 'none'}) and {freed['checkpoints']} Ray Train checkpoint(s), "
                     f"{freed['bytes'] / 1e6:.0f} MB; metrics, predictions and configs kept "
                     "(--keep-weights keeps the weights)")

    def ensure_upstream(self, seed: int, default_arm: Path) -> None:
        """The default partition arm's experts, with their weights, for the routing arms to link."""
        if (default_arm / "experts" / "_SUCCESS.json").exists() and not _has_weights(default_arm / "experts"):
            self.log(f"[ablate] seed {seed}: the default arm's experts were deleted; retraining them for the "
                     "routing arms")
            shutil.rmtree(default_arm / "experts")
        if not (default_arm / "experts" / "_SUCCESS.json").exists():
            self.log(f"[ablate] seed {seed}: running the default partition arm first (shared stages)")
            cfg = self.arm_config(PARTITION_VARIANTS[0], seed, default_arm)
            self.run_pipeline(cfg, log=self.log)
            if read_arm_marker(default_arm) is None:
                _write_arm_marker(default_arm, config_hash(cfg), PARTITION_VARIANTS[0].name, seed)


def forget_finished_run(run_dir: Path, marker: dict) -> None:
    """Remove a finished run's marker before it reruns with another configuration; if its weights were deleted, also
    its weight-bearing stages (they cannot be reused without their weights) and its evaluation."""
    if (marker.get("pruned") or {}).get("stages"):
        for stage in (*WEIGHT_STAGES, "evaluate"):
            path = run_dir / stage
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
    (run_dir / ARM_DONE).unlink()


def config_hash(cfg) -> str:
    """Fingerprint of an arm's whole resolved configuration."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def read_arm_marker(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / ARM_DONE
    if not path.is_file() or not (Path(run_dir) / "evaluate" / "metrics.json").is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _write_arm_marker(run_dir: Path, cfg_hash: str, variant: str, seed: Optional[int], **extra) -> None:
    doc = {"complete": True, "variant": variant, "seed": seed, "config_hash": cfg_hash, "pruned": None,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    (run_dir / ARM_DONE).write_text(json.dumps(doc, indent=2))


def _weight_files(stage_dir: Path) -> list[Path]:
    """Model weight files under a stage directory; a router's small centroid file is not a model weight."""
    return sorted(f for f in stage_dir.rglob("*") if f.is_file() and not f.is_symlink()
                  and f.name.endswith(WEIGHT_SUFFIXES) and "router" not in f.relative_to(stage_dir).parts)


def _has_weights(stage_dir: Path) -> bool:
    return stage_dir.is_dir() and bool(_weight_files(stage_dir))


def prune_weights(run_dir: str | Path, keep_stages: Sequence[str] = ()) -> dict:
    """Delete the model weights of an evaluated arm: the weight files of its own ``experts`` (experts and dense),
    ``merge`` and ``export`` stage directories (not of stages linked from another arm, nor the routers), and its
    Ray Train checkpoints. Returns ``{"stages": [...], "files": n, "checkpoints": c, "bytes": b}``."""
    run_dir = Path(run_dir)
    stages, files, checkpoints, freed = [], 0, 0, 0
    for stage in WEIGHT_STAGES:
        path = run_dir / stage
        if stage in keep_stages or path.is_symlink() or not path.is_dir():
            continue
        victims = _weight_files(path)
        for f in victims:
            freed += f.stat().st_size
            f.unlink()
        if victims:
            stages.append(stage)
            files += len(victims)
    ray_dir = run_dir / "ray"
    if ray_dir.is_dir() and not ray_dir.is_symlink():
        for ckpt in sorted(d for d in ray_dir.rglob("checkpoint_*") if d.is_dir()):
            if ckpt.exists():
                freed += sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
                shutil.rmtree(ckpt)
                checkpoints += 1
    return {"stages": stages, "files": files, "checkpoints": checkpoints, "bytes": freed}


def item_sources(output_dir: str | Path, model: str = "moe") -> list[str]:
    """The ``source`` of each test item, in the order of :func:`per_item_scores`."""
    path = Path(output_dir) / "evaluate" / "predictions" / f"{model}.jsonl"
    return [str(json.loads(line).get("source", "")) for line in path.open() if line.strip()]


def summarize_by_source(variants: Sequence[Variant], items: dict, sources: dict, metrics: Sequence[str]) -> dict:
    """``{variant: {source: {metric: {"mean", "std", "rows"}}}}``: per seed, the mean of the source's test items;
    then mean ± sample std over seeds (every arm sees the same test items: ``data.seed`` is fixed)."""
    table: dict = {}
    for v in variants:
        per_source: dict = {}
        for seed, seed_items in items[v.name].items():
            labels = np.asarray(sources[v.name][seed])
            for src in sorted(set(labels)):
                mask = labels == src
                for m in metrics:
                    per_source.setdefault(src, {}).setdefault(m, []).append(float(np.mean(seed_items[m][mask])))
                per_source[src]["rows"] = int(mask.sum())
        table[v.name] = {src: {m: dict(zip(("mean", "std"), mean_std(vals))) if m != "rows" else vals
                               for m, vals in cells.items()} for src, cells in per_source.items()}
    return table


def source_table(study: str, variants: Sequence[Variant], by_source: dict, metric: str) -> str:
    """Markdown: one row per arm, one column per source, ``metric`` mean ± std over seeds (paper Table 2's shape)."""
    sources = sorted({src for v in variants for src in by_source.get(v.name, {})})
    lines = [f"| {study} ({metric}) | " + " | ".join(
        f"{src} ({by_source[variants[0].name].get(src, {}).get('rows', '?')})" for src in sources) + " |",
        "|---|" + "---:|" * len(sources)]
    for v in variants:
        cells = []
        for src in sources:
            cell = by_source.get(v.name, {}).get(src, {}).get(metric)
            cells.append("" if cell is None else f"{cell['mean']:.2f}" + (
                f" ± {cell['std']:.2f}" if cell["std"] is not None else ""))
        lines.append(f"| {v.label or v.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cluster_facts(output_dir: str | Path) -> dict:
    """What an arm's partition found: purity against each row field that has one (``source``, ``genre``), the mean
    inter-centroid distance, and the prompt -> domain classifier's held-out accuracy when one routes."""
    path = Path(output_dir) / "partition" / "partition.json"
    if not path.is_file():
        return {}
    part = json.loads(path.read_text())
    facts = {f"purity_{field}": a["purity"] for field, a in (part.get("agreement") or {}).items()}
    if part.get("separation_mean") is not None:
        facts["separation"] = part["separation_mean"]
    if part.get("classifier"):
        facts["router_accuracy"] = part["classifier"]["held_out_accuracy"]
    return facts


def cluster_table(study: str, variants: Sequence[Variant], clusters: dict) -> str:
    """Markdown: per arm, each cluster fact's mean ± std over seeds (empty where an arm has none)."""
    keys = sorted({k for v in variants for seed_facts in clusters[v.name].values() for k in seed_facts})
    if not keys:
        return ""
    lines = [f"| {study} | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for v in variants:
        cells = []
        for k in keys:
            mean, std = mean_std([f[k] for f in clusters[v.name].values() if k in f])
            cells.append("" if math.isnan(mean) else f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        lines.append(f"| {v.label or v.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def own_domain_rows(output_dir: str | Path) -> list[dict]:
    """The experts stage's own-domain validation table of an arm that trained a dense model beside its experts:
    ``[{"domain", "n_valid", "expert_loss", "dense_loss", ...}]`` (empty without a dense model)."""
    path = Path(output_dir) / "experts" / "manifest.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("own_domain_validation") or []
    return [r for r in rows if "dense_loss" in r]


def own_domain_table(variants: Sequence[Variant], own: dict) -> str:
    """Markdown: per arm with a dense model, the experts' and the dense model's validation loss on each expert's own
    domain (row-weighted mean over domains, then mean ± std over seeds), and how many domains the expert wins."""
    lines = ["| arm | expert loss, own domain | dense loss, same rows | domains where the expert wins |",
             "|---|---:|---:|---:|"]
    for v in variants:
        per_seed = [rows for rows in own[v.name].values() if rows]
        if not per_seed:
            continue
        cells = []
        for key in ("expert_loss", "dense_loss"):
            mean, std = mean_std([np.average([r[key] for r in rows], weights=[r["n_valid"] for r in rows])
                                  for rows in per_seed])
            cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        wins = sum(r["expert_loss"] < r["dense_loss"] for rows in per_seed for r in rows)
        cells.append(f"{wins} of {sum(len(rows) for rows in per_seed)}")
        lines.append(f"| {v.label or v.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def summarize(variants: Sequence[Variant], scores: dict, items: dict, metrics: Sequence[str]) -> list[dict]:
    default = variants[0].name
    rows = []
    for v in variants:
        row = {"variant": v.name, "label": v.label or v.name, "seeds": sorted(scores[v.name])}
        for m in metrics:
            mean, std = mean_std([scores[v.name][s][m] for s in sorted(scores[v.name])])
            row[m] = {"mean": mean, "std": std, "per_seed": {str(s): scores[v.name][s][m] for s in scores[v.name]}}
            if v.name != default:
                common = sorted(set(items[v.name]) & set(items[default]))
                a = np.mean([items[v.name][s][m] for s in common], axis=0)
                b = np.mean([items[default][s][m] for s in common], axis=0)
                row[m]["delta"] = float(np.mean(a - b))  # per-item scores are on the reported scale (x100)
                row[m]["p_value"] = paired_permutation_test(a, b)
        rows.append(row)
    return rows


def ablation_table(study: str, rows: Sequence[dict], metrics: Sequence[str], seeds: Sequence[int]) -> str:
    lines = [f"| {study} | " + " | ".join(f"{m} (mean ± std)" for m in metrics) + " | " +
             " | ".join(f"Δ{m} vs default (p)" for m in metrics) + " |",
             "|---|" + "---:|" * (2 * len(metrics))]
    for r in rows:
        cells = []
        for m in metrics:
            std = r[m]["std"]
            cells.append(f"{r[m]['mean']:.2f}" + (f" ± {std:.2f}" if std is not None else ""))
        for m in metrics:
            cells.append(f"{r[m]['delta']:+.2f} ({r[m]['p_value']:.3f})" if "p_value" in r[m] else "—")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Seeds {', '.join(map(str, seeds))}; mean ± sample std over seeds of the per-seed test mean; p: "
                 "two-sided paired sign-flip permutation test on per-item scores (averaged over seeds) against the "
                 "default arm.")
    return "\n".join(lines)


def _metric_value(r: dict, m: str) -> tuple[float, float]:
    return r[m]["mean"], (r[m]["std"] or 0.0)


def plot_by_source(study: str, variants: Sequence[Variant], by_source: dict, metrics: Sequence[str],
                   path: Path) -> None:
    """Grouped bars: per source, one bar per arm (mean ± std over seeds), one panel per metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sources = sorted({src for v in variants for src in by_source.get(v.name, {})})
    fig = Figure(figsize=(max(5.0, 1.3 * len(sources) + 1.5), 3.2 * len(metrics) + 0.3 * len(variants)))
    FigureCanvasAgg(fig)
    width = 0.8 / len(variants)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, i + 1)
        for j, v in enumerate(variants):
            cells = [by_source.get(v.name, {}).get(src, {}).get(m) or {"mean": math.nan, "std": None}
                     for src in sources]
            ax.bar([k + (j - (len(variants) - 1) / 2) * width for k in range(len(sources))],
                   [c["mean"] for c in cells], width, yerr=[c["std"] or 0.0 for c in cells], capsize=2,
                   label=v.label or v.name)
        ax.set_xticks(range(len(sources)))
        ax.set_xticklabels(sources)
        ax.set_ylabel(f"{m} (×100)")
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(f"Ablation: {study}, by source (mean ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 * math.ceil(len(variants) / 2) / len(metrics), 1, 1))
    fig.savefig(path, dpi=110)


def plot_ablation(study: str, rows: Sequence[dict], metrics: Sequence[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(metrics), 3.8))
    FigureCanvasAgg(fig)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        means, stds = zip(*(_metric_value(r, m) for r in rows))
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color=["C0"] + ["C7"] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{m} (×100)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Ablation: {study} (mean ± std over seeds; first bar = default)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
