"""Best-of-N as the evaluate stage runs it (paper §3.4, shared/DESIGN.md §4).

1. **Preference data from the policy itself**: sample ``reward.samples`` definitions for ``reward.train_rows``
   training records with the model being evaluated (T 0.6 / top-k 50 / top-p 0.9 / rep. penalty 1.05), score each
   sample's log-probability under that same model, keep the ``reward.top_k`` most likely as negatives and pair each
   with the gold definition (:func:`lm_lexicon.evaluate.best_of_n.reward.build_preference_pairs`). The same on
   ``reward.valid_rows`` held-out validation records gives the pairs the reward model is judged on (pairwise accuracy;
   chance = 0.5). With ``reward.sample_pairs``, (better, worse) pairs of samples ranked by BLEU against the headword's
   references too; ties and near-ties (gap < ``reward.sample_margin``) are dropped and counted. ``reward.gold_pairs:
   false`` trains on those ranked pairs alone: on wordnet-small the gold definition is the longer one in 59 % of the
   gold pairs while the better sample is the shorter one in 67 % of the ranked pairs, so the gold pairs pull the other
   way. ``reward.train_prompts: valid`` draws the training records from the validation split instead, from headwords
   that are not held out (:func:`split_by_headword`): on its own training records the policy writes near-copies of
   the gold, which is not what it writes for an unseen test prompt.
2. **Outcome reward model**: :class:`lm_lexicon.evaluate.best_of_n.reward.RewardModel` (``reward.backbone``: the MiniLM
   encoder, the pretrained seed LM, or the pipeline's dense model scoring by its own mean token log-probability plus a
   head) trained with ``-log sigma(r(x,y_w) - r(x,y_l))``; or the retrieval model
   (:mod:`lm_lexicon.evaluate.best_of_n.retrieval`), the same loss fitted over three features, indexing the training
   split without the reward model's records' headwords (:class:`RetrievalIndex`). Held-out sample-vs-sample accuracy is
   reported overall and within length-matched pairs (definitions within ``reward.length_match_gap`` words), next to
   the "prefer the shorter" rule's accuracy on the same pairs: what length alone would score. ``reward.length_balance``
   trains on a subset where the preferred definition is as often the shorter as the longer one
   (:func:`lm_lexicon.evaluate.best_of_n.reward.balance_lengths`), so length alone earns nothing in training.
3. **Reranking**: ``best_of_n`` samples per test input; the reward model picks one. The BoN curve (mean Protocol A
   BLEU of the pick among the first N samples) is drawn for the reward model, for no selection (sample 1: the N = 1
   baseline) and for the oracle (the sample closest to the references: an UPPER BOUND, labelled as such); the same
   curves on every evaluated metric with a per-sentence form (:func:`candidate_metric_scores`, the oracle picking
   by that metric), with the mean length of the picks and the reward model's paired permutation p-value against
   sample 1 per N (:func:`bon_analysis`).
4. **Language filter** (``evaluate.bon_language_filter``, on for non-English inputs by default): before the reward
   model picks, the samples not identified as the input's language (:func:`lm_lexicon.metrics.language.complies`)
   are set aside; when none of an input's first N samples complies, all N stay (the fallback, counted and reported).
   The oracle is not filtered. With the filter on, the curves gain "language filter (first compliant)".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np


@dataclass
class SampledSet:
    """``samples[i]``: the definitions drawn for record i; ``logprobs[i][j]``: log p(sample j | prompt i)."""

    records: list
    domains: Optional[list[int]]
    samples: list[list[str]]
    logprobs: list[list[float]] = field(default_factory=list)
    references: Optional[list[list[str]]] = None  # per record: every definition of its headword in its split
    templates: Any = None  # the PromptTemplates the samples were drawn under (None: the defaults)


def sample_definitions(generator, records: Sequence, domains: Optional[Sequence[int]], settings,
                       with_logprobs: bool = True,
                       references: Optional[Sequence[Sequence[str]]] = None) -> SampledSet:
    """Draw ``settings.num_return_sequences`` samples per record in process (``generator``: a loaded
    :class:`lm_lexicon.evaluate.generate.DefinitionGenerator`), and their log-probabilities when asked. ``references``
    (per record) are carried along for the ranked sample pairs. Prompts use the generator's (its model's) templates,
    which the set carries for the reward model's pairs."""
    records = list(records)
    prompts = generator.record_prompts(records)
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
    refs = None if references is None else [list(r) for r in references]
    if refs is not None and len(refs) != len(records):
        raise ValueError(f"{len(refs)} reference lists for {len(records)} records")
    return SampledSet(records, None if domains is None else list(domains), samples, logprobs, refs,
                      generator.templates)


def split_by_headword(keys: Sequence[Any], n_held: int, n_train: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint sets of positions into ``keys`` (one headword key per record): up to ``n_held`` held-out records
    and up to ``n_train`` training records, no headword on both sides. Headwords are shuffled with ``seed`` and given
    whole to the held-out side until it has ``n_held`` records, the rest to the training side; both lists sorted."""
    if n_held < 0 or n_train < 0:
        raise ValueError(f"record counts must be >= 0, got {n_held} and {n_train}")
    by_key: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    order = list(by_key)
    np.random.default_rng(seed).shuffle(order)
    held: list[int] = []
    train: list[int] = []
    for key in order:  # a headword straddling the cut-off stays whole on the held-out side, then is trimmed
        (held if len(held) < n_held else train).extend(by_key[key])
    return sorted(held[:n_held]), sorted(train[:n_train])


def new_reward_model(reward_cfg, seed_model: Optional[str] = None, seed: int = 0,
                     attn_implementation: Optional[str] = None, policy_model: Optional[str] = None,
                     index: Optional["RetrievalIndex"] = None):
    """A fresh reward model of the configured backbone: the encoder, ``seed_model`` (the pipeline's seed),
    ``policy_model`` (a directory: the pipeline's dense model) or the retrieval model over ``index``."""
    from lm_lexicon.evaluate.best_of_n.reward import RewardModel

    if reward_cfg.backbone == "retrieval":
        from lm_lexicon.evaluate.best_of_n.retrieval import RetrievalReward

        if index is None or not index.records:
            raise ValueError("reward.backbone='retrieval' needs training records to index")
        return RetrievalReward.from_records(index.records, templates=index.templates, embedder=index.embedder,
                                            neighbours=reward_cfg.neighbours, max_length=index.max_length)
    if reward_cfg.backbone == "policy":
        if not policy_model:
            raise ValueError("reward.backbone='policy' starts from the pipeline's dense model: this run has none "
                             "(set train.dense_baseline: true, or choose reward.backbone 'seed' or 'encoder')")
        return RewardModel.from_policy(policy_model, max_length=reward_cfg.max_length, beta=reward_cfg.beta,
                                       attn_implementation=attn_implementation)
    if reward_cfg.backbone == "seed":
        if not seed_model:
            raise ValueError("reward.backbone='seed' needs the pipeline's seed_model name")
        return RewardModel.from_seed(seed_model, max_length=reward_cfg.max_length, seed=seed,
                                     attn_implementation=attn_implementation)
    return RewardModel.from_encoder(reward_cfg.encoder, max_length=reward_cfg.max_length, seed=seed,
                                    num_hidden_layers=reward_cfg.num_hidden_layers)


@dataclass
class RetrievalIndex:
    """What the retrieval reward model indexes: training ``records`` (whose headwords the reward model's records do
    not share), read with the policy's ``templates`` and embedded with ``embedder``."""

    records: list
    templates: Any = None
    embedder: str = "bundled-minilm"
    max_length: int = 128


def train_outcome_reward_model(train: SampledSet, valid: SampledSet, reward_cfg, seed: int = 0,
                               log: Callable[[str], None] = print, *, seed_model: Optional[str] = None,
                               attn_implementation: Optional[str] = None, policy_model: Optional[str] = None,
                               index: Optional[RetrievalIndex] = None):
    """Preference pairs from ``train`` / ``valid`` samples, then the reward model; returns ``(model, report)``.

    ``report``: pair counts (and the ranked pairs' ties and near-ties dropped), training metrics, and
    ``valid_accuracy`` (fraction of held-out pairs where the gold definition outscores the sample) next to the
    accuracy before training (the random head), so the gain is visible; with ranked pairs, the same for sample vs
    sample, overall and within length-matched pairs. ``seed_model``: the backbone when ``reward_cfg.backbone`` is
    ``"seed"``; ``policy_model``: the model directory it starts from when it is ``"policy"``.
    """
    from lm_lexicon.evaluate.best_of_n.reward import (balance_lengths, build_preference_pairs,
                                                      build_ranked_sample_pairs, length_matched, pairwise_accuracy,
                                                      shorter_wins_accuracy)

    def pairs_of(sampled: SampledSet):
        gold = build_preference_pairs(sampled.records, sampled.samples, sampled.logprobs, top_k=reward_cfg.top_k,
                                      ratio=reward_cfg.ratio, seed=seed, templates=sampled.templates)
        ranked = []
        if reward_cfg.sample_pairs:
            if sampled.references is None:
                raise ValueError("reward.sample_pairs > 0 needs the records' references (sample_definitions("
                                 "references=...))")
            ranked = build_ranked_sample_pairs(sampled.records, sampled.samples, sampled.references,
                                               per_record=reward_cfg.sample_pairs, margin=reward_cfg.sample_margin,
                                               seed=seed, templates=sampled.templates)
        return gold, ranked

    train_gold, train_ranked = pairs_of(train)
    valid_gold, valid_ranked = pairs_of(valid)
    valid_matched = length_matched(valid_ranked, reward_cfg.length_match_gap)
    if not reward_cfg.gold_pairs:  # valid_gold stays: gold-vs-sample accuracy is reported either way
        train_gold = []
    train_pairs, balance_dropped = train_gold + train_ranked, 0
    if reward_cfg.length_balance:
        train_pairs, balance_dropped = balance_lengths(train_pairs, seed)
    if not train_pairs:
        raise ValueError("no preference pairs: every sample equals its gold definition")
    model = new_reward_model(reward_cfg, seed_model, seed, attn_implementation, policy_model, index)
    valid_pools = valid.samples

    def accuracies() -> tuple[float, float, float]:
        nan = float("nan")
        return tuple(pairwise_accuracy(model, pairs, pools=valid_pools) if pairs else nan
                     for pairs in (valid_gold, valid_ranked, valid_matched))

    before_gold, before_ranked, before_matched = accuracies()
    t0 = time.perf_counter()
    if reward_cfg.backbone == "retrieval":
        metrics = model.fit(train_pairs, train.samples, seed=seed)
    else:
        metrics = model.train(train_pairs, epochs=reward_cfg.epochs, lr=reward_cfg.lr,
                              batch_size=reward_cfg.batch_size, seed=seed, precision=reward_cfg.precision)
    after_gold, after_ranked, after_matched = accuracies()
    ranked_note = (f"; sample-vs-sample {after_ranked:.3f} (untrained {before_ranked:.3f}) on {len(valid_ranked)}, "
                   f"length-matched {after_matched:.3f} on {len(valid_matched)}" if valid_ranked else "")
    stats = getattr(train_ranked, "stats", None) or {}
    dropped = (f" ({stats['ties']} ties and {stats['near_ties']} near-ties of {stats['sample_pairs']} sample pairs "
               f"dropped)" if stats.get("sample_pairs") else "")
    log(f"[evaluate] reward model ({model!r}): {len(train_gold)} gold + {len(train_ranked)} sample-vs-sample{dropped} "
        f"training pairs in {time.perf_counter() - t0:.0f}s; held-out pairwise accuracy gold-vs-sample "
        f"{after_gold:.3f} (untrained head {before_gold:.3f}, chance 0.5) on {len(valid_gold)} pairs{ranked_note}")
    # valid_accuracy / valid_pairs: gold vs sample (the paper's check); *_samples: sample vs sample (what BoN needs)
    report = {"train_pairs": len(train_pairs), "train_gold_pairs": len(train_gold),
              "length_balance": reward_cfg.length_balance, "train_pairs_dropped_length_balance": balance_dropped,
              "train_sample_pairs": len(train_ranked), "valid_pairs": len(valid_gold),
              "valid_accuracy": after_gold, "valid_accuracy_untrained": before_gold,
              "valid_sample_pairs": len(valid_ranked), "valid_accuracy_samples": after_ranked,
              "valid_accuracy_samples_untrained": before_ranked,
              "valid_length_matched_pairs": len(valid_matched), "valid_accuracy_length_matched": after_matched,
              "valid_accuracy_length_matched_untrained": before_matched,
              "length_match_gap": reward_cfg.length_match_gap,
              "valid_accuracy_samples_shorter_wins": shorter_wins_accuracy(valid_ranked) if valid_ranked else None,
              "train_sample_pair_stats": getattr(train_ranked, "stats", None),
              "valid_sample_pair_stats": getattr(valid_ranked, "stats", None),
              "backbone": reward_cfg.backbone, "model": repr(model), "precision": metrics.get("precision"),
              "weights": metrics.get("weights"),
              "sample_margin": reward_cfg.sample_margin, "train_records": len(train.records),
              "valid_records": len(valid.records), "loss_first": metrics["loss_first"],
              "loss_last": metrics["loss_last"], "train_accuracy": metrics["epoch_accuracy"][-1],
              "seconds": round(metrics["seconds"], 1)}
    return model, report


FILTER_MODES = ("non-english", "all", "off")


def language_keep_mask(candidates: Sequence[Sequence[str]], langs: Sequence[str], mode: str = "non-english",
                       languages: Optional[Sequence[str]] = None) -> Optional[list[list[bool]]]:
    """Per input and sample: does the language filter keep it? ``None`` when the filter is off (``mode="off"``) or
    applies to no input (``"non-english"`` and every input is English). Inputs the filter does not apply to keep
    every sample. The rule is the language-compliance metric's (langid restricted to the prompts' languages)."""
    from lm_lexicon.metrics.language import complies

    if mode not in FILTER_MODES:
        raise ValueError(f"language filter mode must be one of {FILTER_MODES}, got {mode!r}")
    if len(candidates) != len(langs):
        raise ValueError(f"{len(candidates)} candidate lists for {len(langs)} languages")
    applies = [mode == "all" or (mode == "non-english" and (lang or "en") != "en") for lang in langs]
    if mode == "off" or not any(applies):
        return None
    flat = [c for cs, a in zip(candidates, applies) if a for c in cs]
    flat_langs = [lang or "en" for cs, lang, a in zip(candidates, langs, applies) if a for _ in cs]
    ok = iter(complies(flat, flat_langs, languages))
    return [[next(ok) for _ in cs] if a else [True] * len(cs) for cs, a in zip(candidates, applies)]


def filter_scores(scores: Sequence[Sequence[float]], keep: Sequence[Sequence[bool]]) -> list[list[float]]:
    """Scores under which the argmax over ANY first-N prefix is the best kept sample of that prefix, or the best of
    all of them when none is kept (the fallback): dropped samples lose a constant larger than the scores' range."""
    flat = [float(x) for ss in scores for x in ss]
    penalty = 2.0 * max((abs(x) for x in flat), default=0.0) + 1.0
    return [[float(x) if k else float(x) - penalty for x, k in zip(ss, ks)] for ss, ks in zip(scores, keep)]


def language_filter_report(keep: Sequence[Sequence[bool]], langs: Sequence[str], n: int, mode: str) -> dict:
    """What the filter did among the first ``n`` samples: inputs it applied to, inputs with no compliant sample
    (``fallback``: all samples stayed), mean share of compliant samples; overall and per language."""
    per: dict[str, dict] = {}
    for ks, lang in zip(keep, langs):
        lang = lang or "en"
        applied = mode == "all" or (mode == "non-english" and lang != "en")
        row = per.setdefault(lang, {"inputs": 0, "filtered": 0, "fallback": 0, "compliant_samples": 0,
                                    "samples": 0})
        row["inputs"] += 1
        if not applied:
            continue
        first = list(ks[:n])
        row["filtered"] += 1
        row["fallback"] += int(not any(first))
        row["compliant_samples"] += sum(first)
        row["samples"] += len(first)
    total = {k: sum(r[k] for r in per.values()) for k in ("inputs", "filtered", "fallback", "compliant_samples",
                                                          "samples")}
    for r in [*per.values(), total]:
        r["compliant_sample_share"] = r["compliant_samples"] / r["samples"] if r["samples"] else None
    return {"mode": mode, "n": n, **total, "by_language": dict(sorted(per.items()))}


def rerank(model, prompts: Sequence[str], candidates: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
           ns: Sequence[int], keep: Optional[Sequence[Sequence[bool]]] = None,
           metric_scores: Optional[Mapping[str, Sequence[Sequence[float]]]] = None) -> dict:
    """Reward-model picks at the largest N, and BoN curves (Protocol A BLEU x 100) for ORM / first / oracle.

    ``keep`` (from :func:`language_keep_mask`): the language filter -- the reward model picks among the kept samples
    of the first N (all of them when none is kept), and a "language filter (first compliant)" curve is added.
    ``metric_scores`` (from :func:`candidate_metric_scores`): the same curves on those metrics, with p-values and
    the picks' lengths (:func:`bon_analysis`, under ``"analysis"``; the lengths are there without it too).
    """
    from lm_lexicon.evaluate.best_of_n.reward import best_of_n, bon_curve

    available = min(len(c) for c in candidates)
    ns = [n for n in ns if n <= available] or [available]
    longest = max(len(c) for c in candidates)
    by_n = _prefix_scores(model, prompts, candidates, sorted({*ns, longest}))
    raw = by_n[longest] if by_n else model.score_candidates(list(prompts), [list(c) for c in candidates])
    scores = raw if keep is None else filter_scores(raw, keep)
    method = {n: by_n[n] if keep is None else filter_scores(by_n[n], [k[:n] for k in keep]) for n in ns} \
        if by_n else scores
    selections = {"reward model": method, "no selection (sample 1)": _first(candidates)}
    if keep is not None:  # no reward model: the first kept sample (sample 1 when none is kept)
        selections["language filter (first compliant)"] = filter_scores(
            [[-float(j) for j in range(len(cs))] for cs in candidates], keep)
    curves = {"reward model": bon_curve(candidates, references, scorer=method, ns=ns),
              "no selection (sample 1)": bon_curve(candidates, references, scorer="first", ns=ns),
              "oracle (upper bound)": bon_curve(candidates, references, scorer="oracle", ns=ns)}
    if keep is not None:
        curves["language filter (first compliant)"] = bon_curve(
            candidates, references, scorer=selections["language filter (first compliant)"], ns=ns)
    analysis = bon_analysis(candidates, references, selections, dict(metric_scores or {}), ns, keep=keep)
    picks = best_of_n(candidates, scores)
    return {"picks": picks, "scores": scores, "raw_scores": raw, "curves": curves, "n": available,
            "analysis": analysis}


def _prefix_scores(model, prompts, candidates, ns) -> Optional[dict[int, list[list[float]]]]:
    """``{n: scores of the first n candidates}`` for a reward model that compares a candidate with the others (the
    retrieval one): the curve at N must not see the samples after the N-th. None for a model that scores each
    candidate on its own, whose full-list scores serve every N."""
    if not hasattr(model, "score_prefixes"):
        return None
    return model.score_prefixes(list(prompts), [list(c) for c in candidates], ns)


#: The evaluation metrics Best-of-N is drawn on: those with a per-sentence score. Length is reported as the picks'
#: length instead, and language compliance is what the language filter acts on, not a quality score.
BON_METRICS = ("bleu_a", "bleu_nltk", "sacrebleu", "rouge_l", "meteor", "bertscore", "exact_match")
ORACLE = "oracle (upper bound)"
METHOD = "reward model"
BASELINE = "no selection (sample 1)"
LENGTH_CONTROL = "random pick as long as the reward model's (control)"


def candidate_metric_scores(rows: Sequence[Mapping], candidates: Sequence[Sequence[str]], metrics: Sequence[str],
                            settings=None, reference_groups: Optional[Mapping] = None) -> tuple[dict, dict]:
    """Every candidate's score on each of ``metrics`` that has a per-sentence form (:data:`BON_METRICS`), computed as
    the evaluation table computes it: :func:`lm_lexicon.metrics.compute_metrics` on ``rows[i]`` (a prediction row:
    term, split, references ...) with candidate j as its prediction -- the same references, protocols and settings.

    Returns ``({metric: [[score of candidate j of input i]]}, {metric: why it was skipped})``.
    """
    from lm_lexicon.metrics import compute_metrics

    if len(rows) != len(candidates):
        raise ValueError(f"{len(rows)} rows for {len(candidates)} candidate lists")
    names = [m for m in metrics if m in BON_METRICS]
    flat = [dict(row, prediction=c, predictions=[c]) for row, cs in zip(rows, candidates) for c in cs]
    results = compute_metrics(flat, names, settings, reference_groups=reference_groups) if flat and names else {}
    scores: dict[str, list[list[float]]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        values = results[name].get("per_item")
        if values is None:
            skipped[name] = results[name].get("skipped_reason") or "no per-sentence scores"
            continue
        per_input, k = [], 0
        for cs in candidates:
            per_input.append([float(v) for v in values[k:k + len(cs)]])
            k += len(cs)
        scores[name] = per_input
    return scores, skipped


def _first(candidates: Sequence[Sequence[str]]) -> list[list[float]]:
    return [[1.0] + [0.0] * (len(cs) - 1) for cs in candidates]


def pick_indices(selection, n: int) -> list[int]:
    """Per input: the position of the highest selection score among its first ``n`` candidates (the first on a tie).
    ``selection``: per-candidate scores, or ``{n: scores of the first n}`` (:func:`_prefix_scores`)."""
    rows = selection[n] if isinstance(selection, Mapping) else selection
    return [int(np.argmax(np.asarray(ss[:n], dtype=np.float64))) for ss in rows]


def bon_analysis(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
                 selections: Mapping[str, Any], metric_scores: Mapping[str, Sequence[Sequence[float]]],
                 ns: Sequence[int], n_permutations: int = 10000, seed: int = 0,
                 keep: Optional[Sequence[Sequence[bool]]] = None) -> dict:
    """What Best-of-N does on every metric, and to the length of what it picks.

    ``selections``: selection rule -> per-candidate scores (the argmax among the first N is picked); the oracle is
    added per metric (picking by that metric: an upper bound). Returns ``{"metrics": {metric: {"curves": {rule: {n:
    mean score of the picks}}, "p_value": {n: paired permutation p of reward model vs sample 1}}}, "pick_length":
    {rule: {n: mean words}}, "pick_length_p_value": {n: p}}``; the oracle's picks for the lengths are Protocol A
    BLEU's (the headline oracle row). Means are on the scale of the metric's table value.

    When the reward model is among the selections, each metric also gets the :data:`LENGTH_CONTROL` curve (what a
    random pick of the same length as the reward model's would score: :func:`same_length_expectation`) and
    ``"p_value_length_control"``: if the reward model only picked by length, it would be level with it. With the
    language filter's ``keep``, the control draws from the samples the reward model could pick.
    """
    from lm_lexicon.metrics.statistics import paired_permutation_test
    from lm_lexicon.evaluate.best_of_n.reward import _bleu_a_scores, word_count

    ns = sorted({int(n) for n in ns})

    def p_value(a, b) -> float:
        return paired_permutation_test(a, b, n_permutations=n_permutations, seed=seed) if len(a) else 1.0

    lengths = [[word_count(c) for c in cs] for cs in candidates]
    out: dict[str, Any] = {"metrics": {}}
    for name, ms in metric_scores.items():
        rules = {**selections, ORACLE: ms}
        picked = {rule: {n: [row[j] for row, j in zip(ms, pick_indices(sel, n))] for n in ns}
                  for rule, sel in rules.items()}
        if METHOD in rules:
            picked[LENGTH_CONTROL] = {n: same_length_expectation(ms, lengths, pick_indices(rules[METHOD], n), n,
                                                                 keep) for n in ns}
        entry = {"curves": {rule: {n: float(np.mean(v)) for n, v in by_n.items()} for rule, by_n in picked.items()},
                 "p_value": {}}
        if METHOD in rules:
            entry["p_value"] = {n: p_value(picked[METHOD][n], picked[BASELINE][n]) for n in ns}
            entry["p_value_length_control"] = {n: p_value(picked[METHOD][n], picked[LENGTH_CONTROL][n]) for n in ns}
        out["metrics"][name] = entry
    bleu = metric_scores.get("bleu_a") or [_bleu_a_scores(cs, refs) for cs, refs in zip(candidates, references)]
    by_rule = {rule: {n: [row[j] for row, j in zip(lengths, pick_indices(sel, n))] for n in ns}
               for rule, sel in {**selections, ORACLE: bleu}.items()}
    out["pick_length"] = {rule: {n: float(np.mean(v)) for n, v in by_n.items()} for rule, by_n in by_rule.items()}
    if METHOD in by_rule:
        out["pick_length_p_value"] = {n: p_value(by_rule[METHOD][n], by_rule[BASELINE][n]) for n in ns}
    return out


def same_length_expectation(scores: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]],
                            picks: Sequence[int], n: int,
                            keep: Optional[Sequence[Sequence[bool]]] = None) -> list[float]:
    """Per input: the mean score of those of its first ``n`` candidates that are as long (in words) as candidate
    ``picks[i]``, itself included: what a random pick of the pick's length would score on average. With ``keep``,
    among the kept ones (all of them when none of the first n is kept, as the filter's fallback)."""
    out = []
    for i, (row, lens, j) in enumerate(zip(scores, lengths, picks)):
        allowed = [True] * n if keep is None or not any(keep[i][:n]) else list(keep[i][:n])
        out.append(float(np.mean([s for s, words, ok in zip(row[:n], lens[:n], allowed)
                                  if ok and words == lens[j]] or [row[j]])))
    return out
