"""DomainRouter: biased nearest-centroid routing, persistence without pickle, and router == partition labels."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_lexicon.partition.clustering import partition  # noqa: E402
from lm_lexicon.partition.routing import DomainRouter, unit_rows  # noqa: E402


class HashEmbedder:
    """A deterministic stand-in embedder (no model): bag of hashed character trigrams."""

    model_id = "test-hash"
    dim = 16

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for j in range(len(t) - 2):
                out[i, sum(map(ord, t[j:j + 3])) % self.dim] += 1.0
        return unit_rows(out)


def test_nearest_centroid_and_biases_by_hand():
    C = np.array([[1.0, 0.0], [0.0, 1.0]])
    X = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    assert DomainRouter(C).route_embeddings(X).tolist() == [0, 0, 1]
    # cosines of row 1: 0.832 vs 0.555; a bias of 0.3 on domain 0 flips it (0.532 < 0.555), not row 0 (0.994)
    biased = DomainRouter(C, biases=np.array([0.3, 0.0]))
    assert biased.route_embeddings(X).tolist() == [0, 1, 1]
    np.testing.assert_allclose(biased.scores(X[:1]), [[0.9 / np.hypot(0.9, 0.1) - 0.3, 0.1 / np.hypot(0.9, 0.1)]],
                               atol=1e-6)
    assert DomainRouter(C).route_embeddings(np.array([0.0, 2.0])).tolist() == [1]  # one vector, not unit length


def test_router_reproduces_semantic_labels_and_roundtrips(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6000, 24)) + 0.8 * rng.normal(size=(3, 24))[rng.choice(3, 6000, p=[0.6, 0.3, 0.1])]
    r = partition(X, "semantic", 4, 0.05, seed=0)
    router = r.router()
    np.testing.assert_array_equal(router.route_embeddings(X), r.labels)  # 6k rows, 100%
    router.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router.json", "router.safetensors"]
    doc = json.loads((tmp_path / "router.json").read_text())
    assert doc["n_clusters"] == 4 and doc["dim"] == 24 and doc["method"] == "semantic" and doc["biased"]
    loaded = DomainRouter.load(tmp_path)
    np.testing.assert_array_equal(loaded.centroids, router.centroids)
    np.testing.assert_array_equal(loaded.biases, r.biases)
    np.testing.assert_array_equal(loaded.route_embeddings(X), r.labels)
    # float64 scores do not depend on the batch: a row routed alone scores what it scored in the batch
    alone = np.concatenate([router.scores(X[i:i + 1]) for i in range(0, 6000, 50)])
    assert np.abs(alone - router.scores(X)[::50]).max() < 1e-12 < r.margin
    # the faiss (float32) backend agrees with the float64 scores to float32 precision
    faiss_router = DomainRouter.load(tmp_path, backend="faiss")
    assert np.abs(faiss_router.scores(X) - router.scores(X)).max() < 1e-5


def test_route_prompts_uses_the_embedder(tmp_path):
    prompts = [f'"the {w} is here" What is the definition of "{w}"?' for w in
               ["cat", "dog", "bank", "river", "code", "loop", "tree", "leaf", "star", "moon", "rock", "sand"]]
    emb = HashEmbedder()
    r = partition(emb.encode(prompts), "semantic", 3, 0.0, seed=0)
    router = r.router(emb)
    np.testing.assert_array_equal(router.route_prompts(prompts), r.labels)
    assert router.route_prompts("cat").shape == (1,) and router.route_prompts([]).shape == (0,)
    router.save(tmp_path)
    assert json.loads((tmp_path / "router.json").read_text())["embedder"]["model_id"] == "test-hash"
    with pytest.raises(ValueError, match="no embedder"):
        DomainRouter.load(tmp_path).route_prompts(prompts)
    np.testing.assert_array_equal(DomainRouter.load(tmp_path, embedder=emb).route_prompts(prompts), r.labels)


def test_lexical_router_saves_its_featurizer(tmp_path):
    words = ["bank money loan", "river water fish", "code program bug", "dog cat farm"]
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(words[i % 4].split(), 4)) + f" extra{rng.integers(50)}" for i in range(400)]
    r = partition(texts, "lexical", 4, 0.05, seed=0)
    r.router().save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["lexical_featurizer.json", "lexical_featurizer.safetensors", "router.json", "router.safetensors"]
    loaded = DomainRouter.load(tmp_path)  # the featurizer comes back with it
    np.testing.assert_array_equal(loaded.route_prompts(texts), r.labels)


def test_router_errors():
    C = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="biases for"):
        DomainRouter(C, biases=np.zeros(2))
    with pytest.raises(ValueError, match="dim"):
        DomainRouter(C).route_embeddings(np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        DomainRouter(C).route_embeddings(np.array([[np.nan, 0, 1]]))
    with pytest.raises(ValueError, match="embedder dim"):
        DomainRouter(C, embedder=HashEmbedder())


def test_classifier_router_roundtrips_exactly_and_routes_prompts(tmp_path):
    from lm_lexicon.partition.routing import PromptClassifier

    rng = np.random.default_rng(0)
    emb = HashEmbedder()
    prompts = [f"{w} means something {i}" for i, w in enumerate(["cat", "dog", "car", "bus", "tree", "leaf"] * 20)]
    X = emb.encode(prompts)
    labels = np.arange(len(prompts)) % 6 // 2  # cat/dog -> 0, car/bus -> 1, tree/leaf -> 2
    clf = PromptClassifier.fit(X, labels, 3, c=10.0)
    centroids = unit_rows(rng.normal(size=(3, 16)))
    router = DomainRouter(centroids, None, emb, classifier=clf, meta={"features": "definition"})
    router.save(tmp_path)
    doc = json.loads((tmp_path / "router.json").read_text())
    assert doc["classifier"] == {"kind": "logistic-regression", "c": 10.0} and not doc["biased"]
    loaded = DomainRouter.load(tmp_path, embedder=emb)
    np.testing.assert_array_equal(loaded.classifier.weight, clf.weight)  # identity is the point: stored bits
    np.testing.assert_array_equal(loaded.classifier.bias, clf.bias)
    np.testing.assert_array_equal(loaded.centroids, router.centroids)
    np.testing.assert_array_equal(loaded.scores(X), router.scores(X))
    np.testing.assert_array_equal(loaded.route_prompts(prompts), clf.predict(X))
    np.testing.assert_allclose(router.scores(X[:2]), X[:2].astype(np.float64) @ clf.weight.T + clf.bias, atol=1e-12)
    assert (loaded.route_prompts(prompts) == labels).mean() > 0.9
    assert DomainRouter.load(tmp_path, backend="faiss").classifier is not None  # logits need no index


def test_classifier_router_rejects_inconsistent_parts(tmp_path):
    from lm_lexicon.partition.routing import PromptClassifier

    clf = PromptClassifier(np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="no centroid biases"):
        DomainRouter(np.eye(3, 4), np.zeros(3), classifier=clf)
    with pytest.raises(ValueError, match=r"classifier \[3, 4\] does not match the centroids \[2, 4\]"):
        DomainRouter(np.eye(2, 4), classifier=clf)
    with pytest.raises(ValueError, match="do not match"):
        PromptClassifier(np.zeros((3, 4)), np.zeros(2))
    DomainRouter(np.eye(3, 4), classifier=clf).save(tmp_path)
    from safetensors.numpy import save_file

    save_file({"centroids": np.eye(3, 4, dtype=np.float32)}, str(tmp_path / "router.safetensors"))
    with pytest.raises(ValueError, match="lacks its tensors"):
        DomainRouter.load(tmp_path)
