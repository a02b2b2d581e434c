"""The lexical partition's feature space: TF-IDF reduced by truncated SVD (:class:`LexicalFeaturizer`), saved beside
the router so that it featurizes new prompts exactly as at fit time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lm_lexicon._util import as_str_list

FEATURIZER_JSON = "lexical_featurizer.json"
FEATURIZER_TENSORS = "lexical_featurizer.safetensors"


class LexicalFeaturizer:
    """TF-IDF (sublinear tf, smoothed idf, L2) -> truncated SVD -> L2: the lexical partition's feature space.

    Stored without pickle: the analyzer settings and vocabulary in JSON, ``idf`` ``[f]`` and the SVD
    ``components`` ``[c, f]`` in safetensors, so the router can featurize new prompts exactly as at fit time.
    It has the embedder interface the router expects (``encode``, ``model_id``, ``dim``).
    """

    model_id = "tfidf-svd"

    def __init__(self, vocabulary: Sequence[str], idf: np.ndarray, components: np.ndarray, *,
                 lowercase: bool = True, token_pattern: str = r"(?u)\b\w\w+\b", ngram_range=(1, 1),
                 stop_words: str | None = "english", sublinear_tf: bool = True):
        self.vocabulary = list(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float64)  # [f]
        self.components = np.asarray(components, dtype=np.float64)  # [c, f]
        if self.idf.shape != (len(self.vocabulary),) or self.components.shape[1] != len(self.vocabulary):
            raise ValueError(f"inconsistent featurizer: {len(self.vocabulary)} terms, idf {self.idf.shape}, "
                             f"components {self.components.shape}")
        self.lowercase = lowercase
        self.token_pattern = token_pattern
        self.ngram_range = tuple(ngram_range)
        self.stop_words = stop_words
        self.sublinear_tf = sublinear_tf
        self._counter = _count_vectorizer(self._analyzer_settings(),
                                          vocabulary={t: i for i, t in enumerate(self.vocabulary)})

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def _analyzer_settings(self) -> dict:
        return {"lowercase": self.lowercase, "token_pattern": self.token_pattern,
                "ngram_range": list(self.ngram_range), "stop_words": self.stop_words}

    @classmethod
    def fit(cls, texts: Sequence[str], n_components: int = 128, *, max_features: int = 50000, min_df: int = 1,
            max_df: float = 0.5, stop_words: str | None = "english", sublinear_tf: bool = True,
            seed: int = 0) -> "LexicalFeaturizer":
        """Fit vocabulary, idf and SVD on ``texts``.

        ``max_df=0.5`` drops the prompt template's own words ("definition" is in every prompt), which would
        otherwise dominate the similarity.
        """
        from sklearn.decomposition import TruncatedSVD

        texts = as_str_list(texts)
        settings = {"lowercase": True, "token_pattern": r"(?u)\b\w\w+\b", "ngram_range": [1, 1],
                    "stop_words": stop_words}
        counter = _count_vectorizer(settings, min_df=min_df, max_df=max_df, max_features=max_features)
        try:
            counts = counter.fit_transform(texts)  # [n, f] sparse
        except ValueError as e:  # sklearn: "empty vocabulary; perhaps the documents only contain stop words"
            raise ValueError(f"lexical features: no usable terms in the texts ({e})") from e
        vocab = [t for t, _ in sorted(counter.vocabulary_.items(), key=lambda kv: kv[1])]
        n = counts.shape[0]
        df = np.bincount(counts.indices, minlength=len(vocab))  # CSR column ids: document frequency
        idf = np.log((1.0 + n) / (1.0 + df)) + 1.0  # sklearn's smoothed idf
        tfidf = _tfidf(counts, idf, sublinear_tf)  # [n, f]
        f = len(vocab)
        c = min(int(n_components), f, n)
        if c >= f:
            components = np.eye(f)  # nothing to reduce
        else:
            svd = TruncatedSVD(n_components=c, algorithm="randomized", n_iter=7, random_state=seed)
            svd.fit(tfidf)
            components = svd.components_
        return cls(vocab, idf, components, lowercase=settings["lowercase"], token_pattern=settings["token_pattern"],
                   ngram_range=tuple(settings["ngram_range"]), stop_words=stop_words, sublinear_tf=sublinear_tf)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Featurize ``texts``: float32 ``[n, c]`` unit rows (zero rows for texts with no known term)."""
        texts = as_str_list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        counts = self._counter.transform(texts)  # [n, f] sparse
        Z = np.asarray(_tfidf(counts, self.idf, self.sublinear_tf) @ self.components.T)  # [n, c]
        norms = np.linalg.norm(Z, axis=1, keepdims=True)
        Z = np.divide(Z, norms, out=np.zeros_like(Z), where=norms > 0)
        return Z.astype(np.float32)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        doc = {"kind": "tfidf-svd", **self._analyzer_settings(), "sublinear_tf": self.sublinear_tf,
               "vocabulary": self.vocabulary}
        (path / FEATURIZER_JSON).write_text(json.dumps(doc, ensure_ascii=False))
        save_file({"idf": np.ascontiguousarray(self.idf), "components": np.ascontiguousarray(self.components)},
                  str(path / FEATURIZER_TENSORS))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LexicalFeaturizer":
        from safetensors.numpy import load_file

        path = Path(path)
        doc = json.loads((path / FEATURIZER_JSON).read_text())
        t = load_file(str(path / FEATURIZER_TENSORS))
        return cls(doc["vocabulary"], t["idf"], t["components"], lowercase=doc["lowercase"],
                   token_pattern=doc["token_pattern"], ngram_range=tuple(doc["ngram_range"]),
                   stop_words=doc["stop_words"], sublinear_tf=doc["sublinear_tf"])


def _count_vectorizer(settings: dict, **kw):
    """A CountVectorizer with the featurizer's analyzer; fit and transform must tokenize identically."""
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(lowercase=settings["lowercase"], token_pattern=settings["token_pattern"],
                           ngram_range=tuple(settings["ngram_range"]), stop_words=settings["stop_words"], **kw)


def _tfidf(counts, idf: np.ndarray, sublinear_tf: bool):
    """Sparse ``[n, f]`` tf-idf with L2-normalised rows (sklearn's TfidfTransformer, written out)."""
    from sklearn.preprocessing import normalize

    tf = counts.astype(np.float64)
    if sublinear_tf:
        tf.data = np.log(tf.data) + 1.0
    return normalize(tf.multiply(idf[None, :]).tocsr(), norm="l2", copy=False)
