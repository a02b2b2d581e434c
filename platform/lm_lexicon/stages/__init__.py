"""Stages: each reads artifact directories and writes one, with the resolved config and provenance beside it.

A stage whose directory holds a completion marker with the same fingerprint (its config sections plus its inputs'
fingerprints) is not recomputed, so a pipeline re-run continues at the first unfinished stage.
"""
from lm_lexicon.stages.artifacts import StageResult, run_stage, stage_done

__all__ = ["StageResult", "run_stage", "stage_done"]
