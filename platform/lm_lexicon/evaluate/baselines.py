"""Baselines reported beside every model (shared/DESIGN.md §4), and in-context-learning exemplar selection.

* :class:`ConstantBaseline` -- one string for every input: the floor. Candidates are the most frequent
  first-k-word prefixes of the training definitions (k = 1..``max_words``, the ``top_per_length`` most frequent per
  k, periods stripped); ``strategy="bleu"`` (default) keeps the candidate with the highest Protocol A BLEU on a
  seeded sample of training rows (references grouped by headword, as in the protocol); ``strategy="frequency"``
  simply takes the most frequent first-``k``-words prefix (k = 3 by default). :attr:`ConstantBaseline.report`
  lists every candidate with its count and score.
* :class:`RetrievalBaseline` -- nearest training prompt (sentence embeddings, inner product on unit vectors with
  faiss, i.e. cosine) and copy its definition.
* :func:`select_icl_exemplars` / :func:`format_few_shot_prompt` / :func:`build_icl_prompts` -- Random-ICL and
  Retrieval-ICL: pick k exemplars per query (seeded random, or faiss nearest neighbours of the prompt embedding)
  and format a few-shot prompt in the training format. Generation itself happens elsewhere.
* :func:`chat_prompt` / :func:`build_icl_chat_prompts` -- the same prompts for an instruct seed that was never
  fine-tuned: rendered with its tokenizer's chat template (exemplars as earlier user/assistant turns), since an
  instruct model asked in plain text answers with nothing or rambles (measured: SmolLM2-135M-Instruct returned an
  empty definition for every WordNet validation prompt in plain text).
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np

from lm_lexicon.data.prompts import record_prompt
from lm_lexicon.data.records import Record
from lm_lexicon.metrics.bleu import ReferenceSet, sentence_bleu_a, tokenize_a


def as_record(r: Record | Mapping) -> Record:
    """Accept a :class:`Record` or a dict with its fields."""
    if isinstance(r, Record):
        return r
    if isinstance(r, Mapping):
        return Record.from_dict(dict(r))
    raise TypeError(f"expected a Record or a dict, got {type(r).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Constant
# ----------------------------------------------------------------------------------------------------------------

class ConstantBaseline:
    """The same definition for every input: a most-frequent definition prefix of the training set."""

    name = "constant"

    def __init__(self, strategy: str = "bleu", max_words: int = 8, top_per_length: int = 10, fixed_words: int = 3,
                 sample_size: int = 2000, seed: int = 0):
        if strategy not in ("bleu", "frequency"):
            raise ValueError(f"strategy must be 'bleu' or 'frequency', got {strategy!r}")
        if max_words < 1 or top_per_length < 1 or fixed_words < 1 or sample_size < 1:
            raise ValueError("max_words, top_per_length, fixed_words and sample_size must be >= 1")
        self.strategy = strategy
        self.max_words = int(max_words)
        self.top_per_length = int(top_per_length)
        self.fixed_words = int(fixed_words)
        self.sample_size = int(sample_size)
        self.seed = int(seed)
        self.prediction: str | None = None
        self.report: dict = {}

    def fit(self, train_records: Iterable[Record | Mapping]) -> "ConstantBaseline":
        records = [as_record(r) for r in train_records]
        if not records:
            raise ValueError("ConstantBaseline.fit needs at least one training record")
        toks = [tokenize_a(r.definition) for r in records]
        prefix_counts: dict[int, Counter] = {k: Counter() for k in range(1, max(self.max_words, self.fixed_words) + 1)}
        for t in toks:
            for k in prefix_counts:
                if len(t) >= k:
                    prefix_counts[k][" ".join(t[:k])] += 1
        if self.strategy == "frequency":
            common = prefix_counts[self.fixed_words].most_common(1)
            if not common:
                raise ValueError(f"no training definition has {self.fixed_words} words")
            self.prediction, count = common[0]
            self.report = {"strategy": "frequency", "words": self.fixed_words, "chosen": self.prediction,
                           "count": count, "n_train": len(records)}
            return self
        candidates = [(p, c) for k in range(1, self.max_words + 1)
                      for p, c in prefix_counts[k].most_common(self.top_per_length)]
        # Protocol A on a seeded sample of training rows, references = all train definitions of the headword.
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for r in records:
            key = (r.split, r.term)
            if r.definition not in groups[key]:
                groups[key].append(r.definition)
        rng = random.Random(self.seed)
        sample = records if len(records) <= self.sample_size else rng.sample(records, self.sample_size)
        refsets: dict[tuple[str, str], ReferenceSet] = {}
        sample_refs = []
        for r in sample:
            key = (r.split, r.term)
            if key not in refsets:
                refsets[key] = ReferenceSet(groups[key])
            sample_refs.append(refsets[key])
        scored = []
        for prefix, count in candidates:
            hyp = prefix.split()
            bleu = 100.0 * float(np.mean([sentence_bleu_a(hyp, rs) for rs in sample_refs]))
            scored.append({"prefix": prefix, "count": count, "train_bleu_a": bleu})
        best = max(scored, key=lambda d: (d["train_bleu_a"], d["count"]))
        self.prediction = best["prefix"]
        self.report = {"strategy": "bleu", "chosen": self.prediction, "train_bleu_a": best["train_bleu_a"],
                       "count": best["count"], "n_train": len(records), "sample_size": len(sample), "seed": self.seed,
                       "candidates": sorted(scored, key=lambda d: -d["train_bleu_a"])}
        return self

    def predict(self, records: Sequence[Record | Mapping]) -> list[str]:
        if self.prediction is None:
            raise RuntimeError("ConstantBaseline.predict before fit")
        return [self.prediction] * len(records)


# ----------------------------------------------------------------------------------------------------------------
# Retrieval (nearest training prompt)
# ----------------------------------------------------------------------------------------------------------------

def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [n, d], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class RetrievalBaseline:
    """Copy the definition of the training record whose prompt is nearest (cosine) to the query prompt.

    ``fit(train_records, embedder)``: embeds every training prompt (:func:`~lm_lexicon.data.prompts.record_prompt`)
    with ``embedder.encode`` (an :class:`lm_lexicon.partition.embed.Embedder`; ``embeddings=`` skips that with
    precomputed ``[n, d]`` vectors) and builds a faiss ``IndexFlatIP`` over the unit vectors: exact search, inner
    product = cosine. ``templates``: the prompt templates of the embedded prompts (None: the defaults).
    """

    name = "retrieval"

    def __init__(self, templates=None):
        self.templates = templates
        self.embedder = None
        self.index = None
        self.records: list[Record] = []

    def fit(self, train_records: Iterable[Record | Mapping], embedder=None,
            embeddings: np.ndarray | None = None) -> "RetrievalBaseline":
        import faiss

        self.records = [as_record(r) for r in train_records]
        if not self.records:
            raise ValueError("RetrievalBaseline.fit needs at least one training record")
        if embeddings is None:
            if embedder is None:
                raise ValueError("RetrievalBaseline.fit needs an embedder or precomputed embeddings")
            embeddings = embedder.encode([record_prompt(r, self.templates) for r in self.records])
        vecs = _unit_rows(np.asarray(embeddings))  # [n, d]
        if vecs.shape[0] != len(self.records):
            raise ValueError(f"{vecs.shape[0]} embeddings for {len(self.records)} records")
        self.embedder = embedder
        self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(vecs)
        return self

    def _query_vectors(self, records: Sequence[Record], embeddings: np.ndarray | None) -> np.ndarray:
        if embeddings is None:
            if self.embedder is None:
                raise ValueError("no embedder: pass the query embeddings")
            embeddings = self.embedder.encode([record_prompt(r, self.templates) for r in records])
        q = _unit_rows(np.asarray(embeddings))  # [m, d]
        if q.shape[0] != len(records):
            raise ValueError(f"{q.shape[0]} query embeddings for {len(records)} records")
        return q

    def search(self, records: Sequence[Record | Mapping], k: int = 1,
               embeddings: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [m, k], indices [m, k])`` of the k nearest training records (cosine, best first)."""
        if self.index is None:
            raise RuntimeError("RetrievalBaseline.search before fit")
        recs = [as_record(r) for r in records]
        if not recs:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        k = min(int(k), len(self.records))
        return self.index.search(self._query_vectors(recs, embeddings), k)

    def predict(self, records: Sequence[Record | Mapping], embeddings: np.ndarray | None = None) -> list[str]:
        """The definition of the nearest training prompt, for each record."""
        _, idx = self.search(records, 1, embeddings)
        return [self.records[int(i)].definition for i in idx[:, 0]]


# ----------------------------------------------------------------------------------------------------------------
# In-context learning: exemplar selection and few-shot prompts
# ----------------------------------------------------------------------------------------------------------------

def select_icl_exemplars(queries: Sequence[Record | Mapping], pool: Sequence[Record | Mapping], k: int = 4,
                         method: str = "random", seed: int = 0, embedder=None,
                         retriever: RetrievalBaseline | None = None, pool_embeddings: np.ndarray | None = None,
                         query_embeddings: np.ndarray | None = None,
                         exclude_same_term: bool = True, templates=None) -> list[list[Record]]:
    """``k`` exemplars from ``pool`` for each query.

    ``method="random"`` (Random-ICL): a uniform sample without replacement, seeded per query (``seed`` and the
    query's position), so a query's exemplars do not depend on the other queries. ``method="retrieval"``
    (Retrieval-ICL): the k pool records whose prompts are nearest to the query's prompt (faiss inner product on
    unit embeddings), nearest first; pass a ``retriever`` already fitted on ``pool`` to reuse its index, or an
    ``embedder`` / precomputed ``pool_embeddings`` and ``query_embeddings``.
    With ``exclude_same_term`` (default) a pool record with the query's term (case-insensitive) is never chosen,
    so the answer is not in the prompt. Fewer than k come back only when the pool has fewer eligible records.
    ``templates``: the prompt templates of the embedded prompts (None: the defaults).
    """
    if method not in ("random", "retrieval"):
        raise ValueError(f"method must be 'random' or 'retrieval', got {method!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    qs = [as_record(q) for q in queries]
    if retriever is not None:
        pool_recs = retriever.records
    else:
        pool_recs = [as_record(p) for p in pool]
    if k == 0 or not qs:
        return [[] for _ in qs]
    if not pool_recs:
        raise ValueError("the exemplar pool is empty")

    def eligible(q: Record, i: int) -> bool:
        return not exclude_same_term or pool_recs[i].term.lower() != q.term.lower()

    out: list[list[Record]] = []
    if method == "random":
        n = len(pool_recs)
        for qi, q in enumerate(qs):
            rng = np.random.default_rng([int(seed), qi])
            chosen: list[int] = []
            draw = rng.choice(n, size=min(n, 2 * k + 8), replace=False)
            chosen = [int(i) for i in draw if eligible(q, int(i))][:k]
            if len(chosen) < k:  # many same-term records in a small pool: walk a full permutation
                chosen = [int(i) for i in rng.permutation(n) if eligible(q, int(i))][:k]
            out.append([pool_recs[i] for i in chosen])
        return out
    if retriever is None:
        retriever = RetrievalBaseline(templates).fit(pool_recs, embedder=embedder, embeddings=pool_embeddings)
    q_vecs = retriever._query_vectors(qs, query_embeddings)
    n = len(pool_recs)
    width = min(n, k + 16)
    while True:
        _, idx = retriever.index.search(q_vecs, width)
        picks = [[int(i) for i in row if i >= 0 and eligible(q, int(i))][:k] for q, row in zip(qs, idx)]
        if width >= n or all(len(p) == k for p in picks):
            break
        width = min(n, width * 4)
    return [[pool_recs[i] for i in p] for p in picks]


def format_few_shot_prompt(query: Record | Mapping, exemplars: Sequence[Record | Mapping],
                           separator: str = "\n\n", templates=None) -> str:
    """Exemplars in the training format (prompt, a space, definition), in the given order, then the query prompt;
    prompts under ``templates`` (None: the defaults).

    Retrieval-ICL exemplars come nearest first; reverse them to put the nearest next to the query.
    """
    q = as_record(query)
    blocks = [f"{record_prompt(e, templates)} {e.definition}" for e in (as_record(x) for x in exemplars)]
    blocks.append(record_prompt(q, templates))
    return separator.join(blocks)


def build_icl_prompts(queries: Sequence[Record | Mapping], pool: Sequence[Record | Mapping], k: int = 4,
                      method: str = "random", separator: str = "\n\n", templates=None, **kwargs) -> list[str]:
    """:func:`select_icl_exemplars` then :func:`format_few_shot_prompt` for every query."""
    chosen = select_icl_exemplars(queries, pool, k=k, method=method, templates=templates, **kwargs)
    return [format_few_shot_prompt(q, ex, separator, templates) for q, ex in zip(queries, chosen)]


def chat_prompt(tokenizer, query: Record | Mapping, exemplars: Sequence[Record | Mapping] = (),
                templates=None) -> str:
    """The query's prompt as a chat turn after one (user: prompt, assistant: definition) turn pair per exemplar,
    rendered by the tokenizer's chat template up to the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template: prompt it in plain text")
    messages = []
    for e in (as_record(x) for x in exemplars):
        messages += [{"role": "user", "content": record_prompt(e, templates)},
                     {"role": "assistant", "content": e.definition}]
    messages.append({"role": "user", "content": record_prompt(as_record(query), templates)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_icl_chat_prompts(tokenizer, queries: Sequence[Record | Mapping], pool: Sequence[Record | Mapping],
                           k: int = 4, method: str = "random", templates=None, **kwargs) -> list[str]:
    """:func:`build_icl_prompts` for an instruct model: the exemplars become earlier chat turns."""
    chosen = select_icl_exemplars(queries, pool, k=k, method=method, templates=templates, **kwargs)
    return [chat_prompt(tokenizer, q, ex, templates) for q, ex in zip(queries, chosen)]
