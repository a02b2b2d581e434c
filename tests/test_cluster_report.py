"""Cluster report: cohesion/separation numbers on a hand-made example, top items, plot and Markdown."""
import json

import numpy as np
import pytest

from lm_lexicon.partition.cluster_report import (cohesion_separation, plot_clusters, render_markdown, top_items,
                                                 write_report)

# domain 0 around (1, 0), domain 1 around (0, 1), domain 2's centroid (0.6, 0.8) has no rows
X = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [-0.6, 0.8]])
LABELS = np.array([0, 0, 1, 1, 1])
CENTROIDS = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])


def test_cohesion_and_separation_by_hand():
    q = cohesion_separation(X, LABELS, CENTROIDS)
    assert q.sizes.tolist() == [2, 3, 0]
    assert q.cohesion[0] == pytest.approx((0.0 + 0.2) / 2)  # 1 - cos: 0 and 1 - 0.8
    assert q.cohesion[1] == pytest.approx((0.0 + 0.2 + 0.2) / 3)
    assert np.isnan(q.cohesion[2])
    expected = np.array([[0.0, 1.0, 0.4], [1.0, 0.0, 0.2], [0.4, 0.2, 0.0]])
    np.testing.assert_allclose(q.separation, expected, atol=1e-6)
    assert q.mean_cohesion == pytest.approx(0.6 / 5)  # per row: (0 + .2 + 0 + .2 + .2) / 5
    assert q.mean_separation == pytest.approx((1.0 + 0.4 + 0.2) / 3)
    json.dumps(q.to_dict(), allow_nan=False)  # NaN for the empty domain is written as null


def test_cohesion_input_checks():
    with pytest.raises(ValueError, match="labels for"):
        cohesion_separation(X, LABELS[:3], CENTROIDS)
    with pytest.raises(ValueError, match="labels must lie"):
        cohesion_separation(X, LABELS + 5, CENTROIDS)


def test_top_items_counts_and_tie_order():
    terms = ["bank", "bank", "river", "fish", "fish"]
    sources = ["wordnet", "gcide", "wordnet", "wordnet", "wordnet"]
    top = top_items(LABELS, terms, sources, k=2)
    assert top[0]["terms"] == [("bank", 2)]
    assert top[0]["sources"] == [("gcide", 1), ("wordnet", 1)]  # tie: alphabetical
    assert top[1]["terms"] == [("fish", 2), ("river", 1)]
    assert top_items(LABELS, terms)[1].keys() == {"terms"}


def test_plot_written_and_markdown(tmp_path):
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(400, 16)) + 3 * np.repeat(np.eye(16)[:4], 100, axis=0)
    labels = np.repeat(np.arange(4), 100)
    info = plot_clusters(Z, labels, tmp_path / "plot.png", sample=300, seed=0)
    data = (tmp_path / "plot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert info["n_points"] == 300 and info["projection"] in {"umap", "pca"}

    q = cohesion_separation(X, LABELS, CENTROIDS)
    md = render_markdown(q, top_items(LABELS, ["a", "a", "b", "c", "c"]), plot_path="plot.png")
    assert "| 0 | 2 | 40.0% | 0.100 |" in md
    assert "| 2 | 0 | 0.0% | n/a |" in md
    assert "| **0** | 0.000 | 1.000 | 0.400 |" in md
    assert "| 1 | c (2), b (1) |  |" in md and "![domains](plot.png)" in md


def test_write_report(tmp_path):
    out = write_report(tmp_path, X, LABELS, CENTROIDS, terms=list("abcde"), summary={"method": "semantic",
                                                                                     "margin": float("inf")})
    for key in ("markdown", "json", "plot"):
        assert (tmp_path / out[key].split("/")[-1]).stat().st_size > 0
    doc = json.loads((tmp_path / "cluster_report.json").read_text())
    assert doc["quality"]["sizes"] == [2, 3, 0] and doc["summary"]["margin"] is None
