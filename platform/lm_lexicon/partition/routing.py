"""Domain routing: send a prompt to the expert of its nearest centroid (cosine), corrected by per-domain biases.

Why biases: the semantic partition assigns training rows under a size cap (every domain holds n/k +- slack rows),
so its labels are not plain nearest-centroid labels. The capacity-constrained assignment is, however, an argmax of
``x . c_j - b_j`` for a per-domain price ``b_j`` (the dual of the size constraints), which the partition computes
and stores. With those biases this router reproduces the training labels exactly, and it routes new prompts by the
same rule the experts' training data was chosen by.

Scores are computed in one place (:meth:`DomainRouter.scores`) and the argmax in one place (:func:`biased_argmax`),
and the partition uses the same two to define its labels, so "router == stage labels" holds by construction.

Precision: a size cap puts some rows right at a domain boundary. On the WordNet train prompts (38,787 MiniLM
vectors, k=8) the smallest margin by which a row's domain wins is 5.8e-7, while faiss's float32 inner products
differ by up to 3.0e-7 between a batched search and a one-row search of the same vector (BLAS vs SIMD paths), so a
float32 router could route a training prompt differently when it arrives alone. The default ``backend="numpy"``
therefore scores in float64 (k is small: one [n, d] x [d, k] product), which is batch-independent to ~1e-16.
``backend="faiss"`` (IndexFlatIP over all k centroids) remains available, e.g. for very many centroids.

Domains made from something the prompt does not carry (``partition.features: definition``: clusters of the gold
definitions) cannot be reproduced by a nearest-centroid rule on the prompt. Their router holds a
:class:`PromptClassifier` (multinomial logistic regression, prompt embedding -> domain) and scores by its logits
instead of by cosines; everything else (``route_prompts``, ``route_embeddings``, save/load) is the same call, so
evaluation and serving need nothing new. Its centroids are then the domains' mean prompt embeddings (used to seed
token-routing gates, not to route).

Files (never pickle): ``router.safetensors`` (centroids ``[k, d]`` float32, biases ``[k]`` float64, and a
classifier's ``classifier_weight`` ``[k, d]`` / ``classifier_bias`` ``[k]`` float64) and ``router.json`` (method, k,
dim, embedder spec, classifier's settings and accuracy); a lexical router also writes its featurizer beside them.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROUTER_JSON = "router.json"
ROUTER_TENSORS = "router.safetensors"
FORMAT = "lm-lexicon-domain-router"
FORMAT_VERSION = 1
_UNIT_TOL = 1e-4
BACKENDS = ("numpy", "faiss")


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Float32 C-contiguous copy-or-view of ``X`` ``[n, d]`` whose nonzero rows have unit L2 norm.

    Rows that are already unit length (within 1e-4) are left bit-for-bit unchanged, so normalising twice is the
    identity: the router and the partition may both call this on the same vectors and see the same numbers.
    Zero rows stay zero (a prompt with no known words under the lexical featurizer).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array [n, d], got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise ValueError(f"features contain NaN or inf (first at row {bad})")
    norms = np.linalg.norm(X.astype(np.float64), axis=1)  # [n]
    fix = (norms > 0) & (np.abs(norms - 1.0) > _UNIT_TOL)
    if fix.any():
        X = X.copy()
        X[fix] = (X[fix] / norms[fix, None]).astype(np.float32)
    return X


def biased_argmax(scores: np.ndarray, biases: np.ndarray | None) -> np.ndarray:
    """``argmax_j (scores[:, j] - biases[j])``; exact ties go to the lowest domain id (numpy's argmax)."""
    if biases is None:
        return np.argmax(scores, axis=1).astype(np.int64)
    return np.argmax(scores - np.asarray(biases, dtype=np.float64)[None, :], axis=1).astype(np.int64)


class PromptClassifier:
    """Linear prompt -> domain classifier: ``logits = x @ weight.T + bias`` on unit-normalised embeddings ``x``.

    ``weight`` ``[k, d]``, ``bias`` ``[k]`` (float64); ``info``: JSON facts (C, accuracies) kept with the router.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, info: dict | None = None):
        self.weight = np.ascontiguousarray(weight, dtype=np.float64)
        self.bias = np.ascontiguousarray(bias, dtype=np.float64).reshape(-1)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"classifier weight {self.weight.shape} and bias {self.bias.shape} do not match")
        if not (np.isfinite(self.weight).all() and np.isfinite(self.bias).all()):
            raise ValueError("classifier parameters must be finite")
        self.info = dict(info or {})

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def fit(cls, X: np.ndarray, labels: np.ndarray, n_classes: int, c: float = 0.3,
            seed: int = 0) -> "PromptClassifier":
        """Multinomial logistic regression (scikit-learn, L2, lbfgs) of ``labels`` on the unit rows of ``X``.

        Every domain ``0..n_classes-1`` gets a row; one without training rows gets weight 0 and bias -1000, so it
        is never chosen (the other logits are bounded by the weights' norms on unit inputs).
        """
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        X = unit_rows(X)
        labels = np.asarray(labels, dtype=np.int64)
        present = np.unique(labels)
        W = np.zeros((n_classes, X.shape[1]))
        b = np.full(n_classes, -1e3)  # a domain without training rows is never chosen
        if len(present) == 1:  # one class: scikit-learn refuses; route everything there
            b[present[0]] = 0.0
            return cls(W, b, {"c": float(c)})
        lr = LogisticRegression(C=float(c), max_iter=2000, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:  # reported in info, not printed
            warnings.simplefilter("always", ConvergenceWarning)
            lr.fit(X.astype(np.float64), labels)
        info = {"c": float(c)}
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            info["converged"] = False
        if len(present) == 2:  # binary: sklearn keeps one row (logit of class 1); as softmax logits: +-/2
            W[present[1]], W[present[0]] = lr.coef_[0] / 2, -lr.coef_[0] / 2
            b[present[1]], b[present[0]] = lr.intercept_[0] / 2, -lr.intercept_[0] / 2
        else:
            W[present], b[present] = lr.coef_, lr.intercept_
        return cls(W, b, info)

    def logits(self, X: np.ndarray) -> np.ndarray:
        """``[n, k]`` float64 logits of the unit rows of ``X``."""
        X = unit_rows(X)
        if X.shape[1] != self.dim:
            raise ValueError(f"embedding dim {X.shape[1]} != classifier dim {self.dim}")
        return X.astype(np.float64) @ self.weight.T + self.bias[None, :]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return biased_argmax(self.logits(X), None)


class DomainRouter:
    """Routes embeddings (or prompts, given the embedder they were embedded with) to domain ids ``0..k-1``.

    ``centroids``: ``[k, d]`` (normalised here); ``biases``: ``[k]`` or None (plain nearest centroid);
    ``embedder``: anything with ``encode(list[str]) -> [n, d]`` unit vectors and a ``model_id`` (an
    :class:`lm_lexicon.partition.embed.Embedder`, or the lexical partition's featurizer); ``classifier``: a
    :class:`PromptClassifier` that scores instead of the centroids (then ``biases`` must be None).
    """

    def __init__(self, centroids: np.ndarray, biases: np.ndarray | None = None, embedder: Any = None, *,
                 method: str = "semantic", meta: dict | None = None, backend: str = "numpy",
                 classifier: PromptClassifier | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        C = unit_rows(centroids)
        if C.shape[0] < 1:
            raise ValueError("a router needs at least one centroid")
        if biases is not None:
            biases = np.asarray(biases, dtype=np.float64).reshape(-1)
            if biases.shape[0] != C.shape[0]:
                raise ValueError(f"{biases.shape[0]} biases for {C.shape[0]} centroids")
            if not np.isfinite(biases).all():
                raise ValueError("biases must be finite")
        if classifier is not None:
            if biases is not None:
                raise ValueError("a classifier router scores by logits: it takes no centroid biases")
            if (classifier.n_classes, classifier.dim) != C.shape:
                raise ValueError(f"classifier [{classifier.n_classes}, {classifier.dim}] does not match the "
                                 f"centroids {list(C.shape)}")
            if backend != "numpy":
                raise ValueError("a classifier router scores with numpy only")
        if embedder is not None and getattr(embedder, "dim", C.shape[1]) != C.shape[1]:
            raise ValueError(f"embedder dim {embedder.dim} != centroid dim {C.shape[1]}")
        self.centroids = C  # [k, d] float32
        self.biases = biases  # [k] float64 or None
        self.embedder = embedder
        self.method = method
        self.meta = dict(meta or {})
        self.backend = backend
        self.classifier = classifier
        self._C64 = C.astype(np.float64)  # [k, d]
        self._index = None
        if backend == "faiss":
            import faiss

            self._index = faiss.IndexFlatIP(C.shape[1])
            self._index.add(C)

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def __repr__(self) -> str:
        emb = getattr(self.embedder, "model_id", None)
        return (f"DomainRouter(k={self.n_clusters}, dim={self.dim}, method={self.method!r}, "
                f"biased={self.biases is not None}, classifier={self.classifier is not None}, embedder={emb!r}, "
                f"backend={self.backend!r})")

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Scores ``[n, k]`` (float64) whose argmax is the domain: cosine to each centroid minus that domain's
        bias, or the classifier's logits when the router has one.

        Rows of ``X`` are normalised unless already unit length (then used bit-for-bit, see :func:`unit_rows`).
        """
        X = unit_rows(X)
        if X.shape[1] != self.dim:
            raise ValueError(f"embedding dim {X.shape[1]} != router dim {self.dim}")
        if self.classifier is not None:
            return self.classifier.logits(X)
        n, k = X.shape[0], self.n_clusters
        if self._index is None:
            S = X.astype(np.float64) @ self._C64.T  # [n, k]
        else:
            S = np.empty((n, k), dtype=np.float64)
            if n:
                D, I = self._index.search(X, k)  # [n, k] scores (descending), [n, k] centroid ids: all k searched
                S[np.arange(n)[:, None], I] = D
        if self.biases is not None:
            S -= self.biases[None, :]
        return S

    def route_embeddings(self, X: np.ndarray) -> np.ndarray:
        """Domain id (int64 ``[n]``) of each embedding row."""
        X = np.asarray(X)
        if X.ndim == 1:
            X = X[None, :]
        return biased_argmax(self.scores(X), None)

    def route_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Embed ``prompts`` with the router's embedder, then route them."""
        if self.embedder is None:
            raise ValueError("this router has no embedder; pass embedder= (or load(..., load_embedder=True)), "
                             "or embed the prompts yourself and call route_embeddings()")
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            return np.empty(0, dtype=np.int64)
        return self.route_embeddings(self.embedder.encode(list(prompts)))

    # ---- persistence (JSON + safetensors, never pickle) ----

    def _embedder_spec(self) -> dict | None:
        e = self.embedder
        if e is None:
            return self.meta.get("embedder")
        spec = {"model_id": getattr(e, "model_id", None), "kind": type(e).__name__}
        for attr in ("pooling", "max_length"):
            if hasattr(e, attr):
                spec[attr] = getattr(e, attr)
        if hasattr(e, "save"):
            spec["files"] = "featurizer"  # saved in the router directory
        return spec

    def save(self, path: str | Path) -> Path:
        """Write ``router.json`` + ``router.safetensors`` (and the lexical featurizer, if any) into ``path``."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"centroids": np.ascontiguousarray(self.centroids)}
        if self.biases is not None:
            tensors["biases"] = np.ascontiguousarray(self.biases)
        if self.classifier is not None:
            tensors["classifier_weight"] = self.classifier.weight
            tensors["classifier_bias"] = self.classifier.bias
        save_file(tensors, str(path / ROUTER_TENSORS))
        spec = self._embedder_spec()
        if self.embedder is not None and hasattr(self.embedder, "save"):
            self.embedder.save(path)
        meta = {k: v for k, v in self.meta.items() if k != "embedder"}
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "method": self.method, "n_clusters": self.n_clusters,
               "dim": self.dim, "biased": self.biases is not None, "embedder": spec, "meta": meta,
               "classifier": None if self.classifier is None else {"kind": "logistic-regression",
                                                                   **self.classifier.info}}
        (path / ROUTER_JSON).write_text(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, embedder: Any = None, load_embedder: bool = False,
             backend: str = "numpy") -> "DomainRouter":
        """Read a router written by :meth:`save`.

        A saved lexical featurizer is always loaded (it is cheap and nothing else can featurize for it). A
        neural embedder is rebuilt from the recorded spec only with ``load_embedder=True`` (it loads a model), or
        pass your own already-loaded ``embedder``.
        """
        from safetensors.numpy import load_file

        path = Path(path)
        if not (path / ROUTER_JSON).is_file():
            raise FileNotFoundError(f"no {ROUTER_JSON} in {path}")
        doc = json.loads((path / ROUTER_JSON).read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path / ROUTER_JSON} is not a {FORMAT} file")
        tensors = load_file(str(path / ROUTER_TENSORS))
        spec = doc.get("embedder") or {}
        if embedder is None and spec.get("files") == "featurizer":
            from lm_lexicon.partition.lexical import LexicalFeaturizer

            embedder = LexicalFeaturizer.load(path)
        elif embedder is None and load_embedder and spec.get("model_id"):
            from lm_lexicon.partition.embed import Embedder

            kw = {k: spec[k] for k in ("pooling", "max_length") if k in spec}
            embedder = Embedder(spec["model_id"], **kw)
        meta = dict(doc.get("meta") or {})
        meta["embedder"] = spec or None
        classifier = None
        if doc.get("classifier") is not None:
            if "classifier_weight" not in tensors or "classifier_bias" not in tensors:
                raise ValueError(f"{path / ROUTER_JSON} names a classifier but {ROUTER_TENSORS} lacks its tensors")
            info = {k: v for k, v in doc["classifier"].items() if k != "kind"}
            classifier = PromptClassifier(tensors["classifier_weight"], tensors["classifier_bias"], info)
            if backend != "numpy":
                backend = "numpy"  # logits are one small float64 product; faiss would only search centroids
        router = cls(tensors["centroids"], tensors.get("biases"), embedder, method=doc.get("method", "semantic"),
                     meta=meta, backend=backend, classifier=classifier)
        if router.n_clusters != doc.get("n_clusters") or router.dim != doc.get("dim"):
            raise ValueError(f"{path}: router.json says k={doc.get('n_clusters')}, dim={doc.get('dim')} but the "
                             f"tensors are {router.centroids.shape}")
        return router


def json_safe(o):
    """JSON-safe copy: numpy scalars/arrays to Python, NaN and inf to None (strict JSON has neither)."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o
