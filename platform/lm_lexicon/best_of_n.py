"""Best-of-N as the evaluate stage runs it (paper §3.4, shared/DESIGN.md §4).

1. **Preference data from the policy itself**: sample ``reward.samples`` definitions for ``reward.train_rows``
   training records with the model being evaluated (T 0.6 / top-k 50 / top-p 0.9 / rep. penalty 1.05), score each
   sample's log-probability under that same model, keep the ``reward.top_k`` most likely as negatives and pair each
   with the gold definition (:func:`lm_lexicon.reward.build_preference_pairs`). The same on ``reward.valid_rows``
   held-out validation records gives the pairs the reward model is judged on (pairwise accuracy; chance = 0.5).
2. **Outcome reward model**: :class:`lm_lexicon.reward.RewardModel` trained with ``-log sigma(r(x,y_w) - r(x,y_l))``.
3. **Reranking**: ``best_of_n`` samples per test input; the reward model picks one. The BoN curve (mean Protocol A
   BLEU of the pick among the first N samples) is drawn for the reward model, for no selection (sample 1: the N = 1
   baseline) and for the oracle (the sample closest to the references: an UPPER BOUND, labelled as such).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence


@dataclass
class SampledSet:
    """``samples[i]``: the definitions drawn for record i; ``logprobs[i][j]``: log p(sample j | prompt i)."""

    records: list
    domains: Optional[list[int]]
    samples: list[list[str]]
    logprobs: list[list[float]] = field(default_factory=list)


def sample_definitions(generator, records: Sequence, domains: Optional[Sequence[int]], settings,
                       with_logprobs: bool = True) -> SampledSet:
    """Draw ``settings.num_return_sequences`` samples per record in process (``generator``: a loaded
    :class:`lm_lexicon.generate.DefinitionGenerator`), and their log-probabilities when asked."""
    from lm_lexicon.sft import record_prompt

    records = list(records)
    prompts = [record_prompt(r) for r in records]
    samples = generator.generate(prompts, domains=domains, settings=settings)
    logprobs: list[list[float]] = []
    if with_logprobs:
        flat_p = [p for p, ss in zip(prompts, samples) for _ in ss]
        flat_c = [c for ss in samples for c in ss]
        flat_d = None if domains is None else [d for d, ss in zip(domains, samples) for _ in ss]
        flat = generator.sequence_logprobs(flat_p, flat_c, domains=flat_d)
        k = 0
        for ss in samples:
            logprobs.append(flat[k:k + len(ss)])
            k += len(ss)
    return SampledSet(records, None if domains is None else list(domains), samples, logprobs)


def train_outcome_reward_model(train: SampledSet, valid: SampledSet, reward_cfg, seed: int = 0,
                               log: Callable[[str], None] = print):
    """Preference pairs from ``train`` / ``valid`` samples, then the reward model; returns ``(model, report)``.

    ``report``: pair counts, training metrics, and ``valid_accuracy`` (fraction of held-out pairs where the gold
    definition outscores the sample) next to the accuracy before training (the random head), so the gain is visible.
    """
    from lm_lexicon.reward import RewardModel, build_preference_pairs, pairwise_accuracy

    train_pairs = build_preference_pairs(train.records, train.samples, train.logprobs, top_k=reward_cfg.top_k,
                                         ratio=reward_cfg.ratio, seed=seed)
    valid_pairs = build_preference_pairs(valid.records, valid.samples, valid.logprobs, top_k=reward_cfg.top_k,
                                         ratio=reward_cfg.ratio, seed=seed)
    if not train_pairs:
        raise ValueError("no preference pairs: every sample equals its gold definition")
    model = RewardModel.from_encoder(reward_cfg.encoder, max_length=reward_cfg.max_length, seed=seed,
                                     num_hidden_layers=reward_cfg.num_hidden_layers)
    before = pairwise_accuracy(model, valid_pairs) if valid_pairs else float("nan")
    t0 = time.perf_counter()
    metrics = model.train(train_pairs, epochs=reward_cfg.epochs, lr=reward_cfg.lr, batch_size=reward_cfg.batch_size,
                          seed=seed)
    after = pairwise_accuracy(model, valid_pairs) if valid_pairs else float("nan")
    log(f"[evaluate] reward model: {len(train_pairs)} training pairs in {time.perf_counter() - t0:.0f}s; "
        f"held-out pairwise accuracy {after:.3f} (untrained head {before:.3f}, chance 0.5) on {len(valid_pairs)} pairs")
    report = {"train_pairs": len(train_pairs), "valid_pairs": len(valid_pairs), "valid_accuracy": after,
              "valid_accuracy_untrained": before, "train_records": len(train.records),
              "valid_records": len(valid.records), "loss_first": metrics["loss_first"],
              "loss_last": metrics["loss_last"], "train_accuracy": metrics["epoch_accuracy"][-1],
              "seconds": round(metrics["seconds"], 1)}
    return model, report


def rerank(model, prompts: Sequence[str], candidates: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
           ns: Sequence[int]) -> dict:
    """Reward-model picks at the largest N, and BoN curves (Protocol A BLEU x 100) for ORM / first / oracle."""
    from lm_lexicon.reward import best_of_n, bon_curve

    scores = model.score_candidates(list(prompts), [list(c) for c in candidates])
    available = min(len(c) for c in candidates)
    ns = [n for n in ns if n <= available] or [available]
    curves = {"reward model": bon_curve(candidates, references, scorer=scores, ns=ns),
              "no selection (sample 1)": bon_curve(candidates, references, scorer="first", ns=ns),
              "oracle (upper bound)": bon_curve(candidates, references, scorer="oracle", ns=ns)}
    picks = best_of_n(candidates, scores)
    return {"picks": picks, "scores": scores, "curves": curves, "n": available}


def curve_table(curves: dict) -> str:
    """Markdown: one row per selection rule, one column per N."""
    ns = sorted({int(n) for c in curves.values() for n in c})
    lines = ["| selection | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for label, c in curves.items():
        lines.append(f"| {label} | " + " | ".join(f"{c[n]:.2f}" if n in c else "" for n in ns) + " |")
    return "\n".join(lines)
