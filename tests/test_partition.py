"""Partition: balance within slack, optimality of the capped assignment, router reproduces labels, determinism,
lexical featurizer persistence, and the error messages."""
import itertools
import json

import numpy as np
import pytest

from lm_lexicon.partition.clustering import (_max_margin_biases, _min_mean_cycle, balanced_kmeans,
                                             partition, size_bounds)
from lm_lexicon.partition.lexical import LexicalFeaturizer
from lm_lexicon.partition.routing import biased_argmax


def skewed_blobs(n=1500, d=32, seed=0):
    """Unit vectors around five centres with very unequal weights, so plain k-means is far from balanced."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, d))
    which = rng.choice(5, size=n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    X = centres[which] * 0.6 + rng.normal(size=(n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


TOPICS = [["bank", "money", "loan", "interest", "credit", "account", "cash", "deposit"],
          ["river", "water", "fish", "boat", "shore", "stream", "lake", "rain"],
          ["code", "program", "compile", "bug", "software", "function", "memory", "disk"],
          ["dog", "cat", "horse", "bird", "farm", "animal", "pet", "cow"]]


def topical_prompts(n=800, seed=0):
    rng = np.random.default_rng(seed)
    everything = sum(TOPICS, [])
    out = []
    for _ in range(n):
        words = list(rng.choice(TOPICS[rng.integers(4)], size=rng.integers(3, 7))) + list(rng.choice(everything, 2))
        out.append(f'"{" ".join(words)}" What is the definition of "{words[0]}"?')
    return out


@pytest.fixture(scope="module")
def X():
    return skewed_blobs()


def test_size_bounds_numbers():
    assert size_bounds(40000, 8, 0.05) == (4750, 5250)
    assert size_bounds(10, 3, 0.0) == (3, 4)
    assert size_bounds(1500, 4, 0.1) == (337, 413)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("slack", [0.0, 0.05])
def test_semantic_sizes_within_slack_and_router_reproduces(X, k, slack):
    r = partition(X, "semantic", k, slack, seed=0)
    lo, hi = size_bounds(len(X), k, slack)
    assert r.size_bounds == (lo, hi)
    assert r.sizes.sum() == len(X) and r.sizes.min() >= lo and r.sizes.max() <= hi
    np.testing.assert_array_equal(np.bincount(r.labels, minlength=k), r.sizes)
    assert r.labels.dtype == np.int64 and r.centroids.dtype == np.float32 and r.centroids.shape == (k, X.shape[1])
    np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, atol=1e-6)
    assert r.biases.shape == (k,) and r.routable and r.margin > 0
    router = r.router()
    np.testing.assert_array_equal(router.route_embeddings(X), r.labels)  # 100%, not "mostly"
    # one row at a time takes faiss's non-BLAS path; the margin must absorb that rounding too
    singles = np.array([router.route_embeddings(X[i])[0] for i in range(0, len(X), 7)])
    np.testing.assert_array_equal(singles, r.labels[::7])


def test_the_cap_binds_on_skewed_data(X):
    """Sanity check that the balancing does something here: the unbiased nearest centroid is unbalanced."""
    r = partition(X, "semantic", 4, 0.05, seed=0)
    plain = np.bincount(biased_argmax(r.router().scores(X) + r.biases, None), minlength=4)
    assert plain.max() > r.size_bounds[1] or plain.min() < r.size_bounds[0]
    assert np.ptp(r.biases) > 0


def test_assignment_is_optimal_on_a_brute_forceable_case():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(10, 4)).astype(np.float32)
    r = balanced_kmeans(X, 2, slack=0.0, seed=0)
    S = r.router().scores(X) + r.biases  # plain cosines
    best = max(S[list(c), 0].sum() + np.delete(S[:, 1], list(c)).sum()
               for c in itertools.combinations(range(10), 5))
    assert S[np.arange(10), r.labels].sum() == pytest.approx(best, abs=1e-9)
    assert list(r.sizes) == [5, 5]


def test_determinism_under_a_seed(X):
    a = partition(X, "semantic", 4, 0.05, seed=7)
    b = partition(X, "semantic", 4, 0.05, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.biases, b.biases)
    ra, rb = partition(X, "random", 4, seed=7), partition(X, "random", 4, seed=7)
    np.testing.assert_array_equal(ra.labels, rb.labels)
    assert (partition(X, "random", 4, seed=8).labels != ra.labels).any()


def test_max_margin_biases_and_karp_on_hand_examples():
    # two domains; rows 0,1 prefer domain 0 by 0.3 and 0.1, rows 2,3 prefer domain 1 by 0.2 and 0.4
    S = np.array([[0.8, 0.5], [0.6, 0.5], [0.3, 0.5], [0.1, 0.5]])
    b = _max_margin_biases(S, np.array([0, 0, 1, 1]))
    gaps = (S - b).max(1) - (S - b).min(1)
    assert gaps.min() == pytest.approx(0.15)  # (0.1 + 0.2) / 2: the cycle 0 -> 1 -> 0 has mean 0.15
    # forcing row 1 (prefers 0 by 0.1) into domain 1 is representable with a bias: margin (0.3 - 0.1) / 2
    b = _max_margin_biases(S, np.array([0, 1, 1, 1]))
    np.testing.assert_array_equal(biased_argmax(S, b), [0, 1, 1, 1])
    gaps = (S - b).max(1) - (S - b).min(1)
    assert gaps.min() == pytest.approx(0.1)
    A = np.array([[np.inf, 1.0, np.inf], [np.inf, np.inf, 2.0], [3.0, 0.5, np.inf]])
    assert _min_mean_cycle(A) == pytest.approx(1.25)  # 1 -> 2 -> 1: (2 + 0.5) / 2 beats 0 -> 1 -> 2 -> 0: 6 / 3


def test_lexical_partition_router_and_featurizer_roundtrip(tmp_path):
    texts = topical_prompts()
    for k in (2, 3, 4):
        r = partition(texts, "lexical", k, 0.05, seed=0)
        lo, hi = size_bounds(len(texts), k, 0.05)
        assert r.sizes.min() >= lo and r.sizes.max() <= hi
        np.testing.assert_array_equal(r.router().route_prompts(texts), r.labels)
    feat = r.featurizer
    feat.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lexical_featurizer.json", "lexical_featurizer.safetensors"]
    doc = json.loads((tmp_path / "lexical_featurizer.json").read_text())
    assert "definition" not in doc["vocabulary"]  # template words are in every prompt: max_df drops them
    again = LexicalFeaturizer.load(tmp_path)
    np.testing.assert_array_equal(again.encode(texts), feat.encode(texts))
    assert again.encode(["zzz qqq"]).tolist() == [[0.0] * again.dim]  # unknown words: a zero vector


def test_random_and_none():
    texts = topical_prompts(103)
    r = partition(texts, "random", 4, seed=0)
    assert sorted(r.sizes.tolist()) == [25, 26, 26, 26] and r.centroids.shape == (4, 0) and not r.routable
    with pytest.raises(ValueError, match="no centroids"):
        r.router()
    Z = skewed_blobs(103)
    n = partition(Z, "none", 8, seed=0)  # "none" is one domain whatever n_clusters says
    assert n.sizes.tolist() == [103] and n.centroids.shape == (1, 32)
    np.testing.assert_array_equal(n.router().route_embeddings(Z), np.zeros(103))


@pytest.mark.parametrize("data, k, slack, method, message", [
    (np.zeros((0, 4)), 2, 0.05, "semantic", "empty"),
    ([], 2, 0.05, "lexical", "empty"),
    (np.ones((1, 4)), 1, 0.05, "semantic", "single row"),
    (["only one"], 1, 0.05, "random", "single row"),
    (np.eye(3), 4, 0.05, "semantic", "larger than the number of rows"),
    (np.eye(3), 0, 0.05, "semantic", ">= 1"),
    (np.eye(3), 2, 1.0, "semantic", r"slack must be in \[0, 1\)"),
    (np.eye(3), 2, -0.1, "semantic", r"slack must be in \[0, 1\)"),
    (np.eye(3), 2, 0.05, "kmeans", "unknown partition method"),
])
def test_clear_errors(data, k, slack, method, message):
    with pytest.raises(ValueError, match=message):
        partition(data, method, k, slack)


def test_wrong_input_kind_and_degenerate_data():
    with pytest.raises(TypeError, match="embedder="):
        partition(["a b", "c d"], "semantic", 2)
    with pytest.raises(TypeError, match="texts"):
        partition(np.eye(4), "lexical", 2)
    with pytest.raises(ValueError, match="distinct"):
        partition(np.ones((6, 3)), "semantic", 2)
    base = np.random.default_rng(0).normal(size=(20, 8))
    with pytest.raises(ValueError, match="deduplicate"):  # 20 prompts x 5 copies cannot make sizes in [31, 35]
        partition(np.repeat(base, 5, axis=0), "semantic", 3, slack=0.05)


# ---- features other than the prompt: definition clusters, routed by a prompt -> domain classifier


def two_views(n, seed=0, d=16):
    """Rows in 3 groups: definitions cluster tightly by group; prompts carry the group only as a weaker linear signal."""
    rng = np.random.default_rng(seed)
    group = np.arange(n) % 3
    centres = np.random.default_rng(99).normal(size=(2, 3, d))  # the same centres for train and valid draws
    D = 3.0 * centres[0][group] + rng.normal(size=(n, d))
    P = 1.5 * centres[1][group] + rng.normal(size=(n, d))
    return group, P.astype(np.float32), D.astype(np.float32)


def test_definition_clusters_are_routed_by_a_prompt_classifier_with_held_out_accuracy():
    from lm_lexicon.partition.clustering import classifier_router, label_agreement

    group, P, D = two_views(600)
    vgroup, vP, vD = two_views(150, seed=1)
    result = partition(D, "semantic", 3, 0.2, seed=0)
    assert label_agreement(result.labels, group)["purity"] == 1.0  # the clusters are the definition groups
    gold = result.router().route_embeddings(vD)  # the clustering's own rule on the held-out definitions
    router, report = classifier_router(result.labels, 3, P, held_out_X=vP, held_out_labels=gold, seed=0)
    assert report["held_out"] == "valid" and report["n_held_out"] == 150 and report["n_train"] == 600
    assert report["chance"] == pytest.approx(np.bincount(gold).max() / 150)
    assert report["held_out_accuracy"] > 0.9 > 0.5 > report["chance"]
    routed = router.route_embeddings(vP)
    assert report["held_out_accuracy"] == pytest.approx((routed == gold).mean())
    np.testing.assert_array_equal(routed, router.classifier.predict(vP))
    assert router.classifier is not None and router.biases is None and router.dim == 16
    # centroids are the domains' mean prompt embeddings (what a token-routing gate may start from)
    mean0 = P[result.labels == 0] / np.linalg.norm(P[result.labels == 0], axis=1, keepdims=True)
    np.testing.assert_allclose(router.centroids[0], mean0.mean(0) / np.linalg.norm(mean0.mean(0)), atol=1e-6)
    # without held-out rows the accuracy is cross-validated on the training rows
    _, cv = classifier_router(result.labels, 3, P, seed=0)
    assert cv["held_out"] == "3-fold cross-validation on train" and cv["n_held_out"] == 600
    assert cv["held_out_accuracy"] > 0.9


def test_classifier_on_unlearnable_labels_is_near_chance():
    from lm_lexicon.partition.clustering import classifier_router

    rng = np.random.default_rng(0)
    P = rng.normal(size=(900, 16)).astype(np.float32)
    labels = np.arange(900) % 3  # no relation to P
    _, report = classifier_router(labels, 3, P, seed=0)
    assert abs(report["held_out_accuracy"] - 1 / 3) < 0.08


def test_combined_views_cosine_is_the_mean_of_the_two_cosines():
    from lm_lexicon.partition.clustering import combine_views

    rng = np.random.default_rng(0)
    P, D = rng.normal(size=(5, 8)), rng.normal(size=(5, 4))
    Z = combine_views(P, D)
    assert Z.shape == (5, 12)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, atol=1e-6)
    cos = lambda A: (A / np.linalg.norm(A, axis=1, keepdims=True)) @ (A / np.linalg.norm(A, axis=1, keepdims=True)).T  # noqa: E731
    np.testing.assert_allclose(Z.astype(np.float64) @ Z.T.astype(np.float64), (cos(P) + cos(D)) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="5 prompt rows but 4"):
        combine_views(P, D[:4])


# ---- agreement of the domains with the rows' own categories


def test_purity_and_nmi_on_a_hand_made_labelling():
    from math import log

    from lm_lexicon.partition.clustering import label_agreement

    # domain 0: a a b; domain 1: b b b -> purity (2 + 3) / 6; the commonest category (b, 4 of 6) is the floor
    a = label_agreement([0, 0, 0, 1, 1, 1], ["a", "a", "b", "b", "b", "b"])
    assert a["purity"] == pytest.approx(5 / 6, abs=1e-15) and a["majority_share"] == pytest.approx(4 / 6)
    mi = 1 / 3 * log(2) + 1 / 6 * log(1 / 2) + 1 / 2 * log(3 / 2)  # sum p(k,c) log p(k,c) / (p(k) p(c))
    h_domain, h_cat = log(2), -(1 / 3 * log(1 / 3) + 2 / 3 * log(2 / 3))
    assert a["nmi"] == pytest.approx(mi / ((h_domain + h_cat) / 2), abs=1e-12)
    assert a["categories"] == {"a": 2, "b": 4} and a["n_categories"] == 2
    assert a["per_domain"] == [{"domain": 0, "rows": 3, "top": "a", "share": pytest.approx(2 / 3)},
                               {"domain": 1, "rows": 3, "top": "b", "share": 1.0}]
    # the same grouping under other names: 1; independent: purity at its floor, NMI 0
    same = label_agreement([0, 0, 1, 1], ["x", "x", "y", "y"])
    assert same["purity"] == 1.0 and same["nmi"] == pytest.approx(1.0)
    indep = label_agreement([0, 1, 0, 1], ["x", "x", "y", "y"])
    assert indep["purity"] == 0.5 and indep["nmi"] == pytest.approx(0.0, abs=1e-12)
    # a missing genre is its own category, not a dropped row
    none = label_agreement([0, 0, 1], ["general", None, None])
    assert none["categories"] == {"(none)": 2, "general": 1} and none["purity"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 categories for 3 labels"):
        label_agreement([0, 1, 1], ["a", "b"])


def test_the_stage_clusters_the_vectors_its_features_name():
    from lm_lexicon.partition.clustering import combine_views
    from lm_lexicon.partition.stage import _cluster_features

    rng = np.random.default_rng(0)
    P, D = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    embedded = {("prompt", "train"): P, ("definition", "train"): D}
    assert _cluster_features("prompt", embedded, "train") is P
    assert _cluster_features("definition", embedded, "train") is D
    np.testing.assert_array_equal(_cluster_features("prompt+definition", embedded, "train"), combine_views(P, D))
