"""Embedder: parity with sentence-transformers on the bundled MiniLM, order, normalisation, Ray-batch interface."""
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may download

from lm_lexicon.partition.embed import ALLOW_DOWNLOADS_ENV, Embedder, resolve_encoder  # noqa: E402

SENTENCES = [
    '"She sat on the bank of the river." What is the definition of "bank"?',
    "hello world",
    'What is the definition of "serendipity"?',
    "Define the Spanish word 'perro'. Use only Spanish to reply.",
    "x",
    "A considerably longer sentence, so that the batch has to pad the shorter ones quite a lot before pooling.",
]


@pytest.fixture(scope="module")
def embedder():
    import torch

    # One intra-op thread: these batches are tiny, and on a shared 2-core machine a second OpenMP thread spends
    # its time at barriers. Restored afterwards because the setting is process-wide.
    previous = torch.get_num_threads()
    yield Embedder(batch_size=4, num_threads=1)
    torch.set_num_threads(previous)


def test_resolve_encoder_bundled_and_passthrough(tmp_path):
    path = Path(resolve_encoder("bundled-minilm"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_encoder("org/some-model") == "org/some-model"  # hub ids pass through unchanged
    assert resolve_encoder(str(tmp_path)) == str(tmp_path.resolve())  # local paths become absolute
    with pytest.raises(ValueError):
        resolve_encoder("")


def test_parity_with_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(embedder.model_path, device="cpu")
    ref = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    got = embedder.encode(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-5


def test_unit_norm_input_order_and_batching(embedder):
    got = embedder.encode(SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    perm = np.random.default_rng(0).permutation(len(SENTENCES))
    shuffled = embedder.encode([SENTENCES[i] for i in perm])
    np.testing.assert_allclose(shuffled, got[perm], atol=1e-5)  # output follows input order, not length order
    one_by_one = np.stack([embedder.encode([s])[0] for s in SENTENCES])
    np.testing.assert_allclose(one_by_one, got, atol=1e-5)  # padding does not change the pooled vector
    assert embedder.dim == 384 and embedder.model_id == "bundled-minilm"


def test_ray_batch_call_adds_column(embedder):
    batch = {"prompt": np.array(SENTENCES[:3], dtype=object), "id": np.arange(3)}
    out = embedder(batch)
    assert set(out) == {"prompt", "id", "embedding"}
    assert out["embedding"].shape == (3, 384)
    np.testing.assert_array_equal(out["id"], np.arange(3))
    np.testing.assert_allclose(out["embedding"], embedder.encode(SENTENCES[:3]), atol=1e-6)
    with pytest.raises(KeyError, match="no column 'prompt'"):
        embedder({"text": batch["prompt"]})


def test_empty_and_bad_inputs(embedder):
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        embedder.encode(["ok", None])
    with pytest.raises(TypeError):
        embedder.encode("a single string")


def test_hub_id_is_not_downloaded(monkeypatch):
    monkeypatch.delenv(ALLOW_DOWNLOADS_ENV, raising=False)
    with pytest.raises(OSError, match=ALLOW_DOWNLOADS_ENV):
        Embedder("lm-lexicon-test/definitely-not-a-cached-model")


def test_semantic_partition_and_router_end_to_end(embedder, tmp_path):
    from lm_lexicon.partition.clustering import partition
    from lm_lexicon.partition.routing import DomainRouter

    topics = {"finance": ["bank", "loan", "interest"], "nature": ["river", "forest", "rain"],
              "computing": ["compiler", "software", "memory"]}
    prompts = [f'"{c}" What is the definition of "{w}"?' for words in topics.values() for w in words
               for c in (f"The {w} was mentioned twice.", f"Everyone talked about the {w} today.")]
    X = embedder.encode(prompts)  # [18, 384]
    r = partition(X, "semantic", 3, slack=0.0, seed=0)
    assert r.sizes.tolist() == [6, 6, 6]
    router = r.router(embedder)
    np.testing.assert_array_equal(router.route_prompts(prompts), r.labels)
    router.save(tmp_path)
    spec = DomainRouter.load(tmp_path).meta["embedder"]
    assert spec["model_id"] == "bundled-minilm" and spec["pooling"] == "mean" and spec["max_length"] == 128
    np.testing.assert_array_equal(DomainRouter.load(tmp_path, embedder=embedder).route_prompts(prompts), r.labels)
