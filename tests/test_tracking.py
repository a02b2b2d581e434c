"""MLflow run hierarchy: a pipeline parent, stage children, runs opened inside nest under the active run, and a run in
another process attaches to the parent named in the environment (how a Tune trial's pipeline joins the scan)."""
from __future__ import annotations

import pytest

from lm_lexicon.config import TrackingConfig
from lm_lexicon.tracking import PARENT_ENV, parent_env, tracked_run


def _runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["lm-lexicon"])
    return {row["tags.mlflow.runName"]: row for _, row in runs.iterrows()}


def test_runs_nest_under_the_active_run_and_under_an_environment_parent(tmp_path, monkeypatch):
    cfg = TrackingConfig()
    monkeypatch.delenv(PARENT_ENV, raising=False)
    with tracked_run(cfg, tmp_path, "pipeline") as parent:
        with tracked_run(cfg, tmp_path, "stage-experts") as stage:
            with tracked_run(cfg, tmp_path, "expert_0") as expert:
                expert.log_metrics({"loss": 1.5})
        env = parent_env(parent)
    assert env == {PARENT_ENV: parent.run_id}
    monkeypatch.setenv(PARENT_ENV, parent.run_id)
    with tracked_run(cfg, tmp_path, "trial-pipeline"):  # no active run here: the environment names the parent
        pass
    monkeypatch.delenv(PARENT_ENV)
    with tracked_run(cfg, tmp_path, "standalone"):
        pass

    runs = _runs(tmp_path)
    parent_of = {name: row.get("tags.mlflow.parentRunId") for name, row in runs.items()}
    assert parent_of["stage-experts"] == parent.run_id
    assert parent_of["expert_0"] == stage.run_id
    assert parent_of["trial-pipeline"] == parent.run_id
    assert parent_of["pipeline"] is None or parent_of["pipeline"] != parent_of["pipeline"]  # None or NaN: top level
    assert parent_of["standalone"] is None or parent_of["standalone"] != parent_of["standalone"]
    assert runs["expert_0"]["metrics.loss"] == pytest.approx(1.5)


def test_parent_env_is_empty_without_a_tracked_run():
    assert parent_env(None) == {}
