"""The work each Serve deployment does, as plain classes (no Ray): testable in process, wrapped thinly by
``serve_app/app.py``.

* :class:`RouterEngine` -- prompts -> domain ids with the pipeline's :class:`lm_lexicon.partition.routing.DomainRouter`
  (its embedder loaded from the recorded spec: the same embedder, centroids and biases as offline);
* :class:`ExpertEngine` -- one domain's checkpoint in a :class:`lm_lexicon.evaluate.generate.DefinitionGenerator`;
  generates for a batch of requests that may differ in ``n`` (greedy for n = 1, seeded sampling for n > 1);
* :class:`ScorerEngine` -- the reward model (:class:`lm_lexicon.evaluate.best_of_n.reward.RewardModel`, optional:
  without it scores are None with a reason) and reference-based metrics (:func:`lm_lexicon.metrics.compute_metrics`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

FIRST_SAMPLE = "first_sample"
REWARD_MODEL = "reward_model"
GREEDY = "greedy"


def _set_threads(torch_threads: Optional[int]) -> None:
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))


# =================================================================================================== router
class RouterEngine:
    def __init__(self, router_dir: str | Path, torch_threads: Optional[int] = None):
        from lm_lexicon.partition.routing import DomainRouter

        _set_threads(torch_threads)
        self.router = DomainRouter.load(router_dir, load_embedder=True)
        if self.router.embedder is None:
            raise ValueError(f"{router_dir}: the router records no embedder to route prompts with")
        self.router_dir = str(router_dir)

    @property
    def n_domains(self) -> int:
        return self.router.n_clusters

    def route(self, prompts: Sequence[str]) -> list[int]:
        return [int(d) for d in self.router.route_prompts(list(prompts))]


# =================================================================================================== expert
class ExpertEngine:
    """One domain's model. ``pinned``: an MoE whose every row is labelled ``domain`` (collapsed checkpoints are
    dense and need no label)."""

    def __init__(self, domain: int, model_path: str | Path, kind: str = "dense", pinned: bool = False,
                 settings: Optional[dict] = None, *, device: str = "cpu", dtype: str = "float32",
                 torch_threads: Optional[int] = None):
        from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings

        self.domain = int(domain)
        self.pinned = bool(pinned)
        self.settings = GenerationSettings.from_any(settings)
        self.generator = DefinitionGenerator(model_path, kind=kind, dtype=dtype, device=device,
                                             torch_threads=torch_threads, settings=self.settings)
        if self.generator.is_moe and not self.pinned and self.generator.needs_domains:
            raise ValueError(f"{model_path}: a domain-routed MoE must be pinned to a domain to serve as one expert")
        self.batches = 0

    def settings_for(self, n: int, seed: int, rows: int):
        """Deterministic for n = 1 (greedy, or the configured beam search); sampling n sequences (the configured
        temperature / top-k / top-p) for n > 1. One forward pass holds the whole serve batch (``rows`` prompts x n
        sequences) unless the configured ``batch_size`` is larger."""
        n = int(n)
        beams = self.settings.num_beams if n == 1 else 1
        s = self.settings.replace(do_sample=n > 1, num_return_sequences=n, seed=int(seed), num_beams=beams)
        return s.replace(batch_size=max(s.batch_size, rows * n))

    def generate(self, requests: Sequence[tuple]) -> list[list[str]]:
        """``requests``: ``(prompt, n, seed)`` each; returns the n definitions of each, in order. Requests with the
        same (n, seed) share generation passes."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (prompt, n, seed) in enumerate(requests):
            groups.setdefault((int(n), int(seed)), []).append(i)
        out: list[Optional[list[str]]] = [None] * len(requests)
        for (n, seed), idx in groups.items():
            prompts = [requests[i][0] for i in idx]
            domains = [self.domain] * len(prompts) if self.pinned else None
            texts = self.generator.generate(prompts, domains=domains, settings=self.settings_for(n, seed, len(idx)))
            for i, t in zip(idx, texts):
                out[i] = list(t)
        self.batches += 1
        return [o if o is not None else [] for o in out]

    def info(self) -> dict:
        return {"domain": self.domain, "model": str(self.generator.model_path), "kind": self.generator.kind,
                "pinned": self.pinned, "batches": self.batches, **self.generator.stats}


# =================================================================================================== scorer
class ScorerEngine:
    """Reward-model scores (optional) and reference-based metrics."""

    def __init__(self, reward_model_dir: Optional[str | Path], reason: Optional[str] = None,
                 metrics: Sequence[str] = ("bleu_a", "sacrebleu", "rouge_l", "exact_match"), *, device: str = "cpu",
                 torch_threads: Optional[int] = None):
        from lm_lexicon.metrics import expand_metric_names

        _set_threads(torch_threads)
        self.metrics = expand_metric_names(metrics)
        self.model = None
        self.reason = reason
        self.path = str(reward_model_dir) if reward_model_dir else None
        if reward_model_dir is not None:
            try:
                from lm_lexicon.evaluate.best_of_n.io import load_reward_model

                self.model = load_reward_model(reward_model_dir, device=device)
                self.reason = None
            except Exception as e:  # a broken reward model must not take the scorer (and /v1/score) down
                log.exception("cannot load the reward model from %s", reward_model_dir)
                self.reason = f"the reward model at {reward_model_dir} failed to load ({type(e).__name__}: {e})"

    @property
    def available(self) -> bool:
        return self.model is not None

    def info(self) -> dict:
        return {"available": self.available, "path": self.path, "reason": self.reason}

    def reward(self, prompts: Sequence[str], definitions: Sequence[str],
               pools: Optional[Sequence[Sequence[str]]] = None) -> Optional[list[float]]:
        """``r(prompt, definition)`` per pair, or None when no reward model is loaded (see :attr:`reason`).
        ``pools[i]``: the candidates pair i came with (its request's definitions for the same prompt), which the
        retrieval reward model compares it with; a network ignores them."""
        if self.model is None:
            return None
        if not len(prompts):
            return []
        pools = None if pools is None else [list(p) for p in pools]
        return [float(x) for x in self.model.score(list(prompts), list(definitions), pools=pools)]

    def reference_metrics(self, items: Sequence[dict]) -> list[dict]:
        """Per-item metric values for ``items`` (``{term, lang, prediction, references}``), each scored against its
        own references only (a request's items do not share references: Protocol A BLEU as the paper computes it
        when the caller passes every definition of the headword)."""
        from lm_lexicon.metrics import compute_metrics
        from lm_lexicon.metrics.compute import PER_ITEM

        if not items:
            return []
        preds = [{"term": it["term"], "lang": it.get("lang") or "en", "prediction": it["prediction"],
                  "references": list(it["references"]), "split": f"item-{i}"} for i, it in enumerate(items)]
        results = compute_metrics(preds, [m for m in self.metrics if m in PER_ITEM],
                                  settings={"bleu_a_grouping": "none", "keep_per_item": True})
        out: list[dict] = [{} for _ in items]
        for name, res in results.items():
            values = res.get("per_item")
            for i in range(len(items)):
                out[i][name] = None if not values else _finite(values[i])
        return out

    def metrics_settings(self) -> dict:
        return metrics_settings(self.metrics)


def candidate_pools(prompts: Sequence[str], definitions: Sequence[str]) -> list[tuple[str, ...]]:
    """Per pair of one Scorer call: the call's definitions for the same prompt, itself included (a best-of-n
    request's samples; /v1/score items of one term and context). Each pair carries them into the cross-request
    batch, where the retrieval reward model compares the pair's definition with the others."""
    from lm_lexicon.evaluate.best_of_n.retrieval import pools_by_prompt

    return [tuple(definitions[j] for j in group) for group in pools_by_prompt(prompts)]


def metrics_settings(metrics: Sequence[str]) -> dict:
    """How /v1/score computes its reference-based metrics (reported with every response)."""
    return {"metrics": list(metrics), "preprocessing": "periods not followed by a digit stripped",
            "bleu_a": "Protocol A sentence BLEU x100 against the item's own references",
            "sacrebleu": "Protocol B SacreBLEU sentence score", "rouge_l": "ROUGE-L F x100",
            "exact_match": "100 (equal after preprocessing) or 0", "implementation": "lm_lexicon.metrics.compute_metrics"}


def _finite(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def select_best(candidates: Sequence[Sequence[str]], scores: Optional[Sequence[Sequence[float]]]) -> tuple[list[str], str]:
    """Best-of-n: the reward model's argmax (first on ties, :func:`lm_lexicon.evaluate.best_of_n.reward.best_of_n`), or
    the first sample when there are no scores. Returns ``(picked, selection)``."""
    if scores is None:
        return [cs[0] if len(cs) else "" for cs in candidates], FIRST_SAMPLE
    from lm_lexicon.evaluate.best_of_n.reward import best_of_n

    return best_of_n([list(cs) for cs in candidates], [list(s) for s in scores]), REWARD_MODEL


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1000.0
