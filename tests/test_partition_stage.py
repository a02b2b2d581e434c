"""The partition stage on Ray Data, end to end on a few hundred rows of the embedded corpus."""
import json

import numpy as np
import pandas as pd
import pytest

from lm_lexicon.config import load_config
from lm_lexicon.pipeline import run_pipeline

pytestmark = pytest.mark.ray


def _cfg(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "data.max_train_rows=150",
                                             "data.max_valid_rows=20", "data.max_test_rows=20",
                                             "partition.n_experts=3", "partition.plot_sample=100", *extra])


@pytest.fixture(scope="module")
def stage(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("part")
    cfg = _cfg(out)
    logs = []
    res = run_pipeline(cfg, stages=("partition",), log=logs.append)
    return cfg, res, logs


def test_stage_writes_domains_router_manifest_and_report(stage):
    cfg, res, _ = stage
    d = res["partition"].path
    manifest = json.loads((d / "partition.json").read_text())
    assert manifest["method"] == "semantic" and manifest["n_experts"] == 3 and manifest["seed"] == 0
    assert manifest["embedder"]["model"] == "bundled-minilm" and manifest["embedder"]["dim"] == 384
    lo, hi = manifest["size_bounds"]
    assert sum(manifest["sizes"]) == 150 and all(lo <= s <= hi for s in manifest["sizes"])
    assert manifest["router_reproduces_train_labels"] == 1.0
    frames = [pd.read_parquet(d / f"domain_{i}.parquet") for i in range(3)]
    assert [len(f) for f in frames] == manifest["sizes"]
    assert all((f["domain"] == i).all() for i, f in enumerate(frames))
    assert {"term", "context", "definition", "source", "split"} <= set(frames[0].columns)
    for split in ("valid", "test"):
        held = pd.read_parquet(d / f"{split}.parquet")
        assert len(held) == 20 and held["domain"].between(0, 2).all()
    assert (d / "router" / "router.json").exists() and (d / "clusters.png").stat().st_size > 1000
    assert "ohesion" in (d / "cluster_report.md").read_text()
    assert np.load(d / "embeddings.npy").shape == (150, 384)


def test_router_helper_reproduces_stage_labels_from_raw_prompts(stage):
    """Ray Data embeddings and an in-process Embedder agree: routing a prompt again gives the stage's domain."""
    from lm_lexicon.data.prompts import format_prompt
    from lm_lexicon.embed import Embedder
    from lm_lexicon.routing import DomainRouter

    _, res, _ = stage
    d = res["partition"].path
    router = DomainRouter.load(d / "router", embedder=Embedder("bundled-minilm"))
    rows = pd.concat([pd.read_parquet(d / f"domain_{i}.parquet") for i in range(3)] +
                     [pd.read_parquet(d / "test.parquet")])
    prompts = [format_prompt(t, c, l) for t, c, l in zip(rows.term, rows.context, rows.lang)]
    assert (router.route_prompts(prompts) == rows["domain"].to_numpy()).mean() == 1.0


def test_a_finished_stage_is_not_recomputed(stage):
    cfg, res, _ = stage
    logs = []
    again = run_pipeline(cfg, stages=("partition",), log=logs.append)
    assert again["partition"].reused and again["data"].reused
    assert any("reusing" in m for m in logs)


def test_too_many_experts_and_empty_training_split_are_clear_errors(tmp_path, ray_local):
    with pytest.raises(ValueError, match="larger than the 5 training rows"):
        run_pipeline(_cfg(tmp_path / "a", "data.max_train_rows=5", "partition.n_experts=8"),
                     stages=("partition",), log=lambda m: None)
    with pytest.raises(ValueError, match="has one row"):
        run_pipeline(_cfg(tmp_path / "b", "data.max_train_rows=1"), stages=("partition",), log=lambda m: None)


def test_empty_training_split_is_a_clear_error(tmp_path, ray_local):
    cfg = _cfg(tmp_path, "data.sources=[{format: wordnet, split: test}]")
    with pytest.raises(ValueError, match="training split .* is empty"):
        run_pipeline(cfg, stages=("partition",), log=lambda m: None)
