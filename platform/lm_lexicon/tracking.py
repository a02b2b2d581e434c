"""Experiment tracking: MLflow (local ``<output_dir>/mlruns`` unless a tracking URI is configured) and, when asked
for and configured (``COMET_API_KEY``, or ``COMET_OFFLINE_DIRECTORY`` for offline mode), Comet.

Tracking never breaks a training run: a tracking backend that fails is reported once and then left alone.

Run hierarchy: :func:`lm_lexicon.pipeline.run_pipeline` opens one parent run per pipeline and one child run per stage;
runs opened inside them (an expert's training run, the evaluation) nest under the run that is active. A process that
has no active run but is part of a larger experiment (a Ray Tune trial running a whole pipeline) attaches its runs to
the run named by the ``LM_LEXICON_MLFLOW_PARENT_RUN_ID`` environment variable (:func:`parent_env`).
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

PARENT_ENV = "LM_LEXICON_MLFLOW_PARENT_RUN_ID"


def parent_env(run: "Run | None") -> dict[str, str]:
    """Environment that makes another process's runs children of ``run`` (empty when it is not tracked)."""
    run_id = run.run_id if run is not None else None
    return {PARENT_ENV: run_id} if run_id else {}


def mlflow_uri(tracking_cfg, output_dir: str | Path) -> str:
    """The configured URI, else a local SQLite store beside the run (MLflow's file store is deprecated)."""
    if tracking_cfg.mlflow_uri:
        return tracking_cfg.mlflow_uri
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def _set_experiment(mlflow, name: str, output_dir: str | Path, local: bool) -> None:
    if mlflow.get_experiment_by_name(name) is None and local:
        # artifacts in <output_dir>/mlruns, metadata in <output_dir>/mlflow.db
        mlflow.create_experiment(name, artifact_location=(Path(output_dir).resolve() / "mlruns").as_uri())
    mlflow.set_experiment(name)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


class Run:
    """One tracked run (MLflow, plus Comet when enabled): params, step metrics, artifacts."""

    def __init__(self, mlflow_run=None, comet_experiment=None):
        self._mlflow = mlflow_run
        self._comet = comet_experiment

    @property
    def run_id(self) -> str | None:
        return self._mlflow.info.run_id if self._mlflow is not None else None

    def set_tags(self, tags: dict) -> None:
        if self._mlflow is not None:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_params(self, params: dict) -> None:
        flat = {k: v for k, v in _flatten(params).items() if v is not None}
        if self._mlflow is not None:
            import mlflow

            # MLflow caps a batch at 100 params and a value at 6000 characters
            items = [(k, str(v)[:6000]) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
        if self._comet is not None:
            self._comet.log_parameters(flat)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._mlflow is not None:
            import mlflow

            mlflow.log_metrics(numeric, step=step)
        if self._comet is not None:
            self._comet.log_metrics(numeric, step=step)

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            return
        if self._mlflow is not None:
            import mlflow

            (mlflow.log_artifacts if path.is_dir() else mlflow.log_artifact)(str(path))
        if self._comet is not None:
            self._comet.log_asset_folder(str(path)) if path.is_dir() else self._comet.log_asset(str(path))


@contextmanager
def tracked_run(tracking_cfg, output_dir: str | Path, run_name: str, tags: dict | None = None,
                nested: bool | None = None) -> Iterator[Run]:
    """Open a run; yields a :class:`Run` whose methods are no-ops for a backend that could not start.

    ``nested=None`` (default): a child of the active run if there is one, else of the run named by
    ``LM_LEXICON_MLFLOW_PARENT_RUN_ID``, else a top-level run.
    """
    mlflow_run = None
    try:
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri(tracking_cfg, output_dir))
        _set_experiment(mlflow, tracking_cfg.experiment, output_dir, local=not tracking_cfg.mlflow_uri)
        active = mlflow.active_run() is not None
        tags = dict(tags or {})
        if not active and os.environ.get(PARENT_ENV):
            tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        mlflow_run = mlflow.start_run(run_name=run_name, nested=active if nested is None else nested, tags=tags)
    except Exception as e:  # tracking is an aid, never a reason to lose a training run
        log.warning("MLflow tracking disabled for %s: %s", run_name, e)
        mlflow_run = None
    comet = None
    if tracking_cfg.comet and (os.environ.get("COMET_API_KEY") or os.environ.get("COMET_OFFLINE_DIRECTORY")):
        try:
            import comet_ml

            offline = not os.environ.get("COMET_API_KEY")
            comet = (comet_ml.OfflineExperiment if offline else comet_ml.Experiment)(
                project_name=tracking_cfg.experiment)
            comet.set_name(run_name)
        except Exception as e:
            log.warning("Comet tracking disabled for %s: %s", run_name, e)
            comet = None
    try:
        yield Run(mlflow_run, comet)
    finally:
        if mlflow_run is not None:
            import mlflow

            mlflow.end_run()
        if comet is not None:
            comet.end()
