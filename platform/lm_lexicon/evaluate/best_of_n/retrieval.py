"""A reward model that reads the training dictionary: ``r(x, y) = w . f(x, y)`` (``reward.backbone: retrieval``).

A network head on 200 prompts' samples learns little about which of two of the policy's definitions is better
(docs/RESULTS.md, Best-of-N). Two things a lexicographer would look at do tell:

* ``neighbour_agreement``: the mean Protocol A sentence BLEU of y against each gold definition of the ``neighbours``
  training prompts nearest to x (cosine of the pipeline's embedder). Words used alike are defined alike, so those
  definitions are pseudo-references for a headword the dictionary does not hold.
* ``sample_agreement``: the mean BLEU of y against the other candidates for the same prompt (self-consistency: what
  most samples say is more often right). A candidate scored alone has none: 0.
* ``words``: y's length in Protocol A tokens, so the fit can say how much length is worth once the two above are known.

The weights are a pairwise logistic regression (Bradley-Terry on feature differences, no intercept, L2 with C = 1,
features standardised for the fit) on the reward model's training pairs; before the fit the score is the neighbour
agreement alone. The index holds the training split minus the headwords of the reward model's own records, so no
record is scored against its own definitions.

Saved as ``reward_config.json`` (backbone, embedder, ``neighbours``, feature names, weights, history),
``index.safetensors`` (the training prompts' unit embeddings, float32 ``[n, d]``) and ``index_definitions.jsonl``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lm_lexicon._util import as_str_list

FEATURES = ("neighbour_agreement", "sample_agreement", "words")
INDEX_FILE = "index.safetensors"
DEFINITIONS_FILE = "index_definitions.jsonl"
NEAREST_CACHE = 4096


def pools_by_prompt(prompts: Sequence[str]) -> list[list[int]]:
    """Per position, the positions sharing its prompt (itself included): the candidates a definition is compared
    with for ``sample_agreement`` when pairs arrive flat (a serving batch, a /v1/score request)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return [groups[p] for p in prompts]


class RetrievalReward:
    """The retrieval-agreement reward model (module docstring); the interface of
    :class:`lm_lexicon.evaluate.best_of_n.reward.RewardModel` (``score``, ``score_candidates``, ``save``), with
    :meth:`fit` in place of gradient training."""

    backbone = "retrieval"

    def __init__(self, embeddings: np.ndarray, definitions: Sequence[str], config: Mapping[str, Any], embedder=None):
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(definitions) or not len(definitions):
            raise ValueError(f"retrieval index: {embeddings.shape} embeddings for {len(definitions)} definitions")
        self.embeddings = embeddings  # [n, d], unit rows
        self.definitions = list(definitions)
        self.config = dict(config)
        self.neighbours = min(int(self.config["neighbours"]), len(self.definitions))
        self.weights = np.asarray(self.config.get("weights") or [1.0, 0.0, 0.0], dtype=np.float64)  # [3]
        self.history: list[dict] = list(self.config.get("history") or [])
        self._embedder = embedder
        self._nearest: dict[str, np.ndarray] = {}  # prompt -> neighbours; bounded (NEAREST_CACHE) for a long-lived Scorer

    def __repr__(self) -> str:
        return (f"RetrievalReward(embedder={self.config.get('embedder')!r}, index={len(self.definitions)} "
                f"definitions, neighbours={self.neighbours}, weights={np.round(self.weights, 3).tolist()})")

    # ---- construction ----
    @classmethod
    def from_records(cls, records: Sequence[Any], *, templates=None, embedder: str = "bundled-minilm",
                     neighbours: int = 32, max_length: int = 128, batch_size: int = 64) -> "RetrievalReward":
        """Index ``records`` (the training split): their prompts, as the policy reads them, embedded; their gold
        definitions kept."""
        from lm_lexicon.data.prompts import record_prompt
        from lm_lexicon.evaluate.best_of_n.reward import REWARD_FORMAT
        from lm_lexicon.partition.embed import Embedder

        records = list(records)
        if not records:
            raise ValueError("the retrieval reward model needs training records to index")
        encoder = Embedder(embedder, batch_size=batch_size, max_length=max_length)
        vectors = encoder.encode([record_prompt(r, templates) for r in records])
        config = {"format": REWARD_FORMAT, "backbone": cls.backbone, "embedder": embedder,
                  "embed_max_length": max_length, "neighbours": int(neighbours), "features": list(FEATURES),
                  "weights": None}
        return cls(vectors, [r.definition for r in records], config, encoder)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "RetrievalReward":
        """Read a directory written by :meth:`save` (safetensors + JSON) and load its embedder, so that a Scorer that
        cannot resolve it fails here, with the reason, not on every request. ``device`` is unused: CPU."""
        from safetensors.numpy import load_file

        from lm_lexicon.evaluate.best_of_n.reward import CONFIG_FILE, REWARD_FORMAT

        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        problems = []
        if config.get("format") != REWARD_FORMAT:
            problems.append(f"format {config.get('format')!r}, expected {REWARD_FORMAT!r}")
        if list(config.get("features") or []) != list(FEATURES) or len(config.get("weights") or []) != len(FEATURES):
            problems.append(f"features {config.get('features')} with weights {config.get('weights')}, expected "
                            f"one weight for each of {list(FEATURES)}")
        for name in (INDEX_FILE, DEFINITIONS_FILE):
            if not (directory / name).is_file():
                problems.append(f"no {name}")
        if problems:
            raise ValueError(f"{directory}: not a retrieval reward model: {'; '.join(problems)}")
        tensors = load_file(str(directory / INDEX_FILE))
        if "embeddings" not in tensors:
            raise ValueError(f"{directory / INDEX_FILE}: no 'embeddings' tensor")
        with open(directory / DEFINITIONS_FILE, encoding="utf-8") as f:
            definitions = [json.loads(line)["definition"] for line in f if line.strip()]
        model = cls(tensors["embeddings"], definitions, config)
        if model._encoder().dim != model.embeddings.shape[1]:
            raise ValueError(f"{directory}: index vectors of width {model.embeddings.shape[1]}, but the embedder "
                             f"{config['embedder']!r} gives {model._encoder().dim}")
        return model

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        from lm_lexicon.evaluate.best_of_n.reward import CONFIG_FILE, REWARD_FORMAT

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings}, str(directory / INDEX_FILE), metadata={"lm_lexicon": REWARD_FORMAT})
        with open(directory / DEFINITIONS_FILE, "w", encoding="utf-8") as f:
            for d in self.definitions:
                f.write(json.dumps({"definition": d}, ensure_ascii=False) + "\n")
        config = dict(self.config, weights=self.weights.tolist(), history=self.history)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    # ---- features ----
    def _encoder(self):
        if self._embedder is None:
            from lm_lexicon.partition.embed import Embedder

            self._embedder = Embedder(self.config["embedder"], max_length=int(self.config.get("embed_max_length", 128)))
        return self._embedder

    def neighbours_of(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """Per prompt, the index positions of its ``neighbours`` nearest training prompts (nearest first)."""
        unique = [p for p in dict.fromkeys(prompts) if p not in self._nearest]
        if unique:
            sims = self._encoder().encode(unique) @ self.embeddings.T  # [u, n]
            k = self.neighbours
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [u, k], unordered
            order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
            if len(self._nearest) + len(unique) > NEAREST_CACHE:
                self._nearest.clear()
            self._nearest.update(zip(unique, np.take_along_axis(top, order, axis=1)))
        return [self._nearest[p] for p in prompts]

    def features(self, prompts: Sequence[str], definitions: Sequence[str],
                 pools: Optional[Sequence[Sequence[str]]] = None) -> np.ndarray:
        """``[n, 3]`` features (:data:`FEATURES`) of ``definitions[i]`` for ``prompts[i]``; ``pools[i]``: the
        candidates it is compared with for ``sample_agreement`` (itself, if there, is left out once)."""
        from lm_lexicon.evaluate.best_of_n.reward import word_count
        from lm_lexicon.metrics.bleu import ReferenceSet, sentence_bleu_a, tokenize_a

        prompts, definitions = as_str_list(prompts, "prompt"), as_str_list(definitions, "definition")
        if len(prompts) != len(definitions) or (pools is not None and len(pools) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts, {len(definitions)} definitions"
                             + ("" if pools is None else f", {len(pools)} pools"))
        reference_sets: dict[int, Any] = {}  # per call: a long-lived Scorer must not keep one per index row
        out = np.zeros((len(prompts), len(FEATURES)), dtype=np.float64)
        for i, (nearest, definition) in enumerate(zip(self.neighbours_of(prompts), definitions)):
            tokens = tokenize_a(definition)
            for j in nearest:
                if j not in reference_sets:
                    reference_sets[j] = ReferenceSet([self.definitions[j]])
            out[i, 0] = np.mean([sentence_bleu_a(tokens, reference_sets[j]) for j in nearest])
            others = _without_one(pools[i], definition) if pools is not None else []
            if others:
                out[i, 1] = np.mean([sentence_bleu_a(tokens, ReferenceSet([o])) for o in others])
            out[i, 2] = word_count(definition)
        return out

    # ---- scoring ----
    def score(self, prompts: Sequence[str], definitions: Sequence[str], batch_size: int = 64,
              pools: Optional[Sequence[Sequence[str]]] = None) -> np.ndarray:
        """``r(prompt_i, definition_i)``: float64 ``[n]``. Without ``pools`` every definition is scored alone."""
        del batch_size  # one embedding pass per call; the BLEU features are per candidate
        if not len(prompts):
            return np.empty(0, dtype=np.float64)
        return self.features(prompts, definitions, pools) @ self.weights  # float64: no ties made by rounding

    def score_candidates(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                         batch_size: int = 64) -> list[list[float]]:
        """Scores of every candidate of every prompt, each compared with its own prompt's other candidates."""
        from lm_lexicon.evaluate.best_of_n.reward import score_candidate_lists

        return score_candidate_lists(self, prompts, candidates, batch_size)

    def score_prefixes(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                       ns: Sequence[int]) -> dict[int, list[list[float]]]:
        """For each n: the scores of the first n candidates of every prompt as Best-of-n would see them, each
        compared with the other candidates of that prefix only (never with samples Best-of-n did not draw)."""
        from lm_lexicon.metrics.bleu import ReferenceSet, sentence_bleu_a, tokenize_a

        flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
        base = self.features(flat_p, [c for cs in candidates for c in cs])  # sample_agreement left at 0
        out: dict[int, list[list[float]]] = {int(n): [] for n in ns}
        start = 0
        for cs in candidates:
            tokens = [tokenize_a(c) for c in cs]
            references = [ReferenceSet([c]) for c in cs]
            bleu = np.array([[sentence_bleu_a(t, r) for r in references] for t in tokens])  # [m, m]
            np.fill_diagonal(bleu, np.nan)
            for n in out:
                rows = base[start:start + min(n, len(cs))].copy()  # [n, 3]
                if len(rows) > 1:
                    rows[:, 1] = np.nanmean(bleu[:len(rows), :len(rows)], axis=1)
                out[n].append((rows @ self.weights).tolist())
            start += len(cs)
        return out

    # ---- fitting ----
    def fit(self, pairs: Sequence, pools: Sequence[Sequence[str]], seed: int = 0) -> dict:
        """Fit the weights on preference ``pairs`` (``prompt``, ``chosen``, ``rejected``, ``index``); ``pools[i]``:
        record i's samples (the ``sample_agreement`` candidates of its pairs). Returns metrics in the shape of
        :meth:`RewardModel.train`'s."""
        from sklearn.linear_model import LogisticRegression

        from lm_lexicon.evaluate.best_of_n.reward import pair_pools

        pairs = list(pairs)
        if not pairs:
            raise ValueError("no preference pairs to fit on")
        t0 = time.perf_counter()
        prompts = [p.prompt for p in pairs]
        candidate_sets = pair_pools(pairs, pools)
        chosen = self.features(prompts, [p.chosen for p in pairs], candidate_sets)
        rejected = self.features(prompts, [p.rejected for p in pairs], candidate_sets)
        diff = chosen - rejected  # [pairs, 3]: the logit of "chosen wins" is w . diff
        scale = diff.std(axis=0) + 1e-9
        z = diff / scale
        clf = LogisticRegression(fit_intercept=False, C=1.0, random_state=seed)
        clf.fit(np.vstack([z, -z]), np.r_[np.ones(len(z)), np.zeros(len(z))])
        before = self.weights.copy()
        self.weights = clf.coef_[0] / scale

        def loss(w) -> float:
            return float(np.mean(np.logaddexp(0.0, -(diff @ w))))

        metrics = {"pairs": len(pairs), "seed": seed, "precision": None, "loss_first": loss(before),
                   "loss_last": loss(self.weights), "epoch_accuracy": [float(np.mean(diff @ self.weights > 0))],
                   "weights": dict(zip(FEATURES, self.weights.tolist())), "steps": int(clf.n_iter_[0]),
                   "seconds": time.perf_counter() - t0}
        self.history.append(metrics)
        return metrics


def _without_one(pool: Sequence[str], definition: str) -> list[str]:
    """``pool`` minus one copy of ``definition`` (compared stripped): the other candidates."""
    others = [c.strip() for c in pool]
    target = definition.strip()
    if target in others:
        others.remove(target)
    return others
