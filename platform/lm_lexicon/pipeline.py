"""The whole pipeline as a sequence of resumable stages (data -> partition -> experts -> merge -> evaluate -> export).

Each stage is skipped when its artifact directory is already finished with the same fingerprint. Tracking: one MLflow
parent run per pipeline (the whole config as params, the evaluation's headline metrics at the end) with a child run per
stage (fingerprint, reused or not, seconds); the stages' own runs (an expert's training, the evaluation) nest below.
"""
from __future__ import annotations

import time
from pathlib import Path

STAGES = ("data", "partition", "experts", "merge", "evaluate", "export")


def run_pipeline(cfg, stages: tuple[str, ...] | None = None, force: tuple[str, ...] = (), log=print) -> dict:
    """Run the requested stages in order (default: all implemented ones) and return their results by name."""
    from lm_lexicon.data.stage import run_data_stage
    from lm_lexicon.evaluate.stage import run_evaluate_stage
    from lm_lexicon.train.stage import run_experts_stage
    from lm_lexicon.moe.stage import run_export_stage
    from lm_lexicon.moe.stage import run_merge_stage
    from lm_lexicon.partition.stage import run_partition_stage
    from lm_lexicon.tracking import tracked_run

    wanted = stages or STAGES
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; available: {list(STAGES)}")
    from lm_lexicon.console import stage

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    # Every stage runs (or is reused) when a later one needs it: its fingerprint feeds the later one's.
    last = max(STAGES.index(s) for s in wanted)
    steps = {
        "data": lambda: run_data_stage(cfg, force="data" in force, log=log),
        "partition": lambda: run_partition_stage(cfg, results["data"], force="partition" in force, log=log),
        "experts": lambda: run_experts_stage(cfg, results["partition"], force="experts" in force, log=log),
        "merge": lambda: run_merge_stage(cfg, results["partition"], results["experts"], force="merge" in force,
                                         log=log),
        "evaluate": lambda: run_evaluate_stage(cfg, results["data"], results["partition"], results["experts"],
                                               results["merge"], force="evaluate" in force, log=log),
        "export": lambda: run_export_stage(cfg, results["merge"], force="export" in force, log=log),
    }
    with tracked_run(cfg.tracking, cfg.output_dir, f"{cfg.name}-pipeline", tags={"kind": "pipeline"}) as parent:
        parent.log_params(cfg.model_dump(mode="json"))
        for name in STAGES[:last + 1]:
            with tracked_run(cfg.tracking, cfg.output_dir, f"{cfg.name}-stage-{name}",
                             tags={"kind": "stage", "stage": name}) as run, stage(name):
                results[name] = steps[name]()
                run.set_tags({"fingerprint": results[name].fingerprint, "reused": results[name].reused})
                run.log_metrics({"seconds": results[name].seconds, "reused": int(results[name].reused)})
        results["_seconds"] = time.perf_counter() - t0
        parent.log_metrics({"seconds": results["_seconds"],
                            "stages_reused": sum(int(results[s].reused) for s in STAGES[:last + 1])})
        if "evaluate" in results:
            parent.log_metrics({f"{model}.{m}": v for model, res in results["evaluate"].summary["headline"].items()
                                for m, v in res.items() if v is not None})
    return results
