"""Best-of-N as the evaluate stage runs it, end to end (:func:`run_best_of_n`): the reward model's records, the
policy's samples, the outcome reward model, reranking the test samples, the curves and the files (``bon.json``,
``bon.png``, ``reward_model/``, ``predictions/{model}-samples.jsonl``). The steps are :mod:`.steps`; the report
section is :mod:`.report`."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from lm_lexicon.evaluate.best_of_n.reward import oracle_best_of_n, plot_bon_curve
from lm_lexicon.evaluate.best_of_n.steps import (LENGTH_CONTROL, RetrievalIndex, candidate_metric_scores,
                                                 language_filter_report, language_keep_mask, rerank,
                                                 sample_definitions, split_by_headword, train_outcome_reward_model)
from lm_lexicon.evaluate.rows import partition_rows, write_rows


def reward_records(partition_dir: Path, rc, seed: int):
    """The reward model's training and held-out records, each as (records, domains, references). Held out:
    ``valid_rows`` validation records. Training: ``train_rows`` records of the policy's training split, or, with
    ``train_prompts: valid``, of the other validation headwords (none shared with the held-out records)."""
    from lm_lexicon.metrics.bleu import headword_key

    if rc.train_prompts == "train":
        return (partition_rows(partition_dir, "train", rc.train_rows, seed),
                partition_rows(partition_dir, "valid", rc.valid_rows, seed))
    records, domains, refs = partition_rows(partition_dir, "valid", None, seed)
    held, train = split_by_headword([headword_key(vars(r)) for r in records], rc.valid_rows, rc.train_rows, seed)
    if not train:
        raise ValueError(f"reward.train_prompts=valid: the validation split's {len(records)} records leave none for "
                         f"training after reward.valid_rows={rc.valid_rows} held out")

    def pick(idx):
        return [records[i] for i in idx], [domains[i] for i in idx], [refs[i] for i in idx]

    return pick(train), pick(held)


def retrieval_index(partition_dir: Path, cfg, templates, reward_rows) -> RetrievalIndex:
    """The training split without the reward model's own records' terms (case-folded; nothing, when the records
    come from the validation split, which the split keeps apart by term), so no record is scored against its own
    row. Synonyms that share a record's gloss under another headword stay: a test record has them too."""
    terms = {r.term.casefold() for r in reward_rows}
    records, _, _ = partition_rows(partition_dir, "train", None, cfg.data.seed)
    kept = [r for r in records if r.term.casefold() not in terms]
    return RetrievalIndex(kept, templates, cfg.embed.model, cfg.embed.max_length)


def run_best_of_n(cfg, work: Path, partition_dir: Path, model_path: Path, model_domains, records, domains,
                  reference_groups, metric_names: list[str], threads: int, log, dense_path: Optional[Path] = None):
    """Reward model on the policy's own samples, then BoN on the test sample, each candidate also scored on
    ``metric_names``; returns (prediction rows, report)."""
    from lm_lexicon.data.prompts import record_prompt
    from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings, generate_split
    from lm_lexicon.metrics import MetricUnavailable

    ev = cfg.evaluate
    name = ev.bon_model
    is_moe = model_domains is not None
    rc = ev.reward
    t0 = time.perf_counter()
    sampling = GenerationSettings.from_eval_config(ev, sample=True, seed=cfg.data.seed)
    generator = DefinitionGenerator(model_path, torch_threads=threads, settings=sampling, model_name=name)
    templates = generator.templates  # the policy's; the reward model learns (and is served) on its prompts
    orm_sampling = sampling.replace(num_return_sequences=rc.samples)
    (train_rows, train_domains, train_refs), (valid_rows, valid_domains, valid_refs) = reward_records(
        partition_dir, rc, cfg.data.seed)
    log(f"[evaluate] reward model data: {rc.samples} samples from {name} for {len(train_rows)} "
        f"{rc.train_prompts} and {len(valid_rows)} held-out valid records")
    train_set = sample_definitions(generator, train_rows, train_domains if is_moe else None, orm_sampling,
                                   references=train_refs)
    valid_set = sample_definitions(generator, valid_rows, valid_domains if is_moe else None, orm_sampling,
                                   references=valid_refs)
    del generator
    attention = None if cfg.seed_model.attn_implementation == "auto" else cfg.seed_model.attn_implementation
    index = retrieval_index(partition_dir, cfg, templates, train_rows + valid_rows) if rc.backbone == "retrieval" \
        else None
    reward_model, orm_report = train_outcome_reward_model(train_set, valid_set, rc, seed=cfg.data.seed, log=log,
                                                          seed_model=cfg.seed_model.name,
                                                          attn_implementation=attention, policy_model=dense_path,
                                                          index=index)
    reward_model.save(work / "reward_model")
    templates.save(work / "reward_model")

    t = time.perf_counter()
    sampled = generate_split(records, model_path, sampling, domains=model_domains, use_ray=True, num_actors=1,
                             torch_threads=threads, cpus_per_actor=1.0, model_name=f"{name}:samples")
    log(f"[evaluate] {ev.best_of_n} samples per input from {name} in {time.perf_counter() - t:.1f}s")
    candidates = [p["predictions"] for p in sampled]
    references = [list(reference_groups.get((r.split, r.term)) or [r.definition]) for r in records]
    langs = [r.lang or "en" for r in records]
    language_filter = {"mode": ev.bon_language_filter, "applied": False}
    try:
        keep = language_keep_mask(candidates, langs, ev.bon_language_filter)
    except MetricUnavailable as e:  # no language identifier: rerank unfiltered, and say so
        keep, language_filter["skipped_reason"] = None, str(e)
        log(f"[evaluate] BoN language filter skipped: {e}")
    t = time.perf_counter()
    metric_scores, metrics_skipped = candidate_metric_scores(sampled, candidates, metric_names, ev,
                                                             reference_groups)
    log(f"[evaluate] BoN: {sum(map(len, candidates))} samples scored on {', '.join(metric_scores) or 'no metric'} in "
        f"{time.perf_counter() - t:.1f}s" + (f" (skipped: {metrics_skipped})" if metrics_skipped else ""))
    result = rerank(reward_model, [record_prompt(r, templates) for r in records], candidates, references, ev.bon_ns,
                    keep=keep, metric_scores=metric_scores)
    n = result["n"]
    if keep is not None:
        language_filter = {**language_filter_report(keep, langs, n, ev.bon_language_filter), "applied": True}
        log(f"[evaluate] BoN language filter ({ev.bon_language_filter}): {language_filter['filtered']} inputs "
            f"filtered, {language_filter['fallback']} with no sample in their language (fallback: all {n})")
    oracle = oracle_best_of_n(candidates, references)
    rows = {}
    for label, picks in ((f"{name}:sample", [c[0] for c in candidates]), (f"{name}:bon-orm-n{n}", result["picks"]),
                         (f"{name}:oracle-n{n}", oracle)):
        rows[label] = [dict(p, prediction=pick, predictions=[pick], model=label, domain=d)
                       for p, pick, d in zip(sampled, picks, domains)]
    curves = {label: {int(k): v for k, v in c.items()} for label, c in result["curves"].items()}
    plot_bon_curve(curves, work / "bon.png", title=f"Best-of-N: {name} on {ev.split} ({len(records)} rows)")
    report = {"model": name, "n": n, "ns": sorted(curves["reward model"]), "curves": curves,
              "reward_model": orm_report, "seconds": round(time.perf_counter() - t0, 1),
              "sampling": sampling.to_dict(), "language_filter": language_filter,
              "analysis": {**result["analysis"], "skipped_metrics": metrics_skipped}}
    (work / "bon.json").write_text(json.dumps(report, indent=2))
    write_rows(sampled, work / "predictions" / f"{name}-samples.jsonl")
    log(f"[evaluate] BoN Protocol A BLEU at N={n}: reward model {curves['reward model'][n]:.2f}, sample 1 "
        f"{curves['no selection (sample 1)'][n]:.2f}, oracle (upper bound) {curves['oracle (upper bound)'][n]:.2f}; "
        f"mean words of the picks: reward model {result['analysis']['pick_length']['reward model'][n]:.2f}, sample 1 "
        f"{result['analysis']['pick_length']['no selection (sample 1)'][n]:.2f}" + _length_control_note(result, n))
    return rows, report


def _length_control_note(result: dict, n: int) -> str:
    control = result["analysis"]["metrics"].get("bleu_a", {}).get("curves", {}).get(LENGTH_CONTROL, {})
    return f"; a random pick as long as the reward model's: {control[n]:.2f} BLEU-A" if n in control else ""
