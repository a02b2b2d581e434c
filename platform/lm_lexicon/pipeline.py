"""The whole pipeline as a sequence of resumable stages (data -> partition -> experts -> merge -> evaluate -> export).

Stages that later issues add plug in here; each is skipped when its artifact directory is already finished with the
same fingerprint.
"""
from __future__ import annotations

import time
from pathlib import Path

STAGES = ("data", "partition", "experts", "merge", "evaluate", "export")


def run_pipeline(cfg, stages: tuple[str, ...] | None = None, force: tuple[str, ...] = (), log=print) -> dict:
    """Run the requested stages in order (default: all implemented ones) and return their results by name."""
    from lm_lexicon.stages.data import run_data_stage
    from lm_lexicon.stages.evaluate import run_evaluate_stage
    from lm_lexicon.stages.experts import run_experts_stage
    from lm_lexicon.stages.export import run_export_stage
    from lm_lexicon.stages.merge import run_merge_stage
    from lm_lexicon.stages.partition import run_partition_stage

    wanted = stages or STAGES
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; available: {list(STAGES)}")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    # Every stage runs (or is reused) when a later one needs it: its fingerprint feeds the later one's.
    last = max(STAGES.index(s) for s in wanted)
    results["data"] = run_data_stage(cfg, force="data" in force, log=log)
    if last >= STAGES.index("partition"):
        results["partition"] = run_partition_stage(cfg, results["data"], force="partition" in force, log=log)
    if last >= STAGES.index("experts"):
        results["experts"] = run_experts_stage(cfg, results["partition"], force="experts" in force, log=log)
    if last >= STAGES.index("merge"):
        results["merge"] = run_merge_stage(cfg, results["partition"], results["experts"], force="merge" in force,
                                           log=log)
    if last >= STAGES.index("evaluate"):
        results["evaluate"] = run_evaluate_stage(cfg, results["data"], results["partition"], results["experts"],
                                                 results["merge"], force="evaluate" in force, log=log)
    if last >= STAGES.index("export"):
        results["export"] = run_export_stage(cfg, results["merge"], force="export" in force, log=log)
    results["_seconds"] = time.perf_counter() - t0
    return results
