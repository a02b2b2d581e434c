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
    from lm_lexicon.partition.embed import Embedder
    from lm_lexicon.partition.routing import DomainRouter

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


def test_stage_reports_purity_against_source_and_genre(stage):
    _, res, _ = stage
    d = res["partition"].path
    manifest = json.loads((d / "partition.json").read_text())
    # the tiny recipe is WordNet only: every domain is pure in source; rows carry no genre -> one "(none)" value
    assert manifest["agreement"]["source"] == {"purity": 1.0, "nmi": 0.0, "majority_share": 1.0, "n_categories": 1}
    assert manifest["agreement"]["genre"]["purity"] == 1.0
    assert manifest["classifier"] is None and manifest["features"] == "prompt embeddings"
    assert "## Agreement with the rows' source and genre" in (d / "cluster_report.md").read_text()
    report = json.loads((d / "cluster_report.json").read_text())
    assert report["summary"]["agreement"]["source"]["per_domain"][0]["top"] == "wordnet"


@pytest.mark.parametrize("features", ["definition", pytest.param("prompt+definition", marks=pytest.mark.slow)])
def test_definition_features_cluster_definitions_and_route_prompts_by_a_classifier(tmp_path, ray_local, features):
    from lm_lexicon.data.prompts import format_prompt
    from lm_lexicon.partition.embed import Embedder
    from lm_lexicon.partition.clustering import combine_views, label_agreement
    from lm_lexicon.partition.routing import DomainRouter

    cfg = _cfg(tmp_path, f"partition.features={features}", "data.max_valid_rows=40")
    logs = []
    d = run_pipeline(cfg, stages=("partition",), log=logs.append)["partition"].path
    manifest = json.loads((d / "partition.json").read_text())
    clf = manifest["classifier"]
    assert clf["held_out"] == "valid" and clf["n_held_out"] == 40 and clf["n_train"] == 150
    assert 0 <= clf["held_out_accuracy"] <= 1 and 0 < clf["chance"] <= 1 and clf["train_accuracy"] > clf["chance"]
    assert any("held-out accuracy" in m for m in logs)
    assert manifest["router_reproduces_train_labels"] == pytest.approx(clf["train_accuracy"])
    assert manifest["feature_space"]["separation_mean"] > 0
    assert "Prompt -> domain classifier" in (d / "cluster_report.md").read_text()

    # the domains are the clusters of the definitions (or of both), recomputed here in process
    embedder = Embedder("bundled-minilm")
    train = pd.concat([pd.read_parquet(d / f"domain_{i}.parquet") for i in range(3)])
    definitions = embedder.encode(list(train.definition))
    prompts = [format_prompt(t, c, lang) for t, c, lang in zip(train.term, train.context, train.lang)]
    X = definitions if features == "definition" else combine_views(embedder.encode(prompts), definitions)
    C = np.stack([X[train.domain.to_numpy() == k].mean(0) for k in range(3)])
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    nearest = np.argmax(X @ C.T, axis=1)
    assert label_agreement(nearest, train.domain.to_numpy())["purity"] > 0.8  # cohesive in the clustering space

    # the saved router is the classifier, and it routed the held-out rows from their prompts
    router = DomainRouter.load(d / "router", embedder=embedder)
    assert router.classifier is not None and router.meta["features"] == features
    test = pd.read_parquet(d / "test.parquet")
    test_prompts = [format_prompt(t, c, lang) for t, c, lang in zip(test.term, test.context, test.lang)]
    np.testing.assert_array_equal(router.route_prompts(test_prompts), test.domain.to_numpy())
