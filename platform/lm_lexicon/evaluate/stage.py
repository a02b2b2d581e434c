"""Evaluate stage (shared/DESIGN.md §4): every model of the run and the baselines, on one seeded sample of a split.

Models compared (each one a row of the report): ``constant`` (most frequent definition prefix: the floor),
``retrieval`` (nearest training prompt by MiniLM + faiss, copy its definition), ``seed`` (the untrained seed model),
``dense`` (the dense baseline of the experts stage), ``moe`` (the merged, fine-tuned MoE under its routing; domains
from the partition's router), and on request ``icl-random`` / ``icl-retrieval`` (``icl_shots`` exemplars from the
training split, random or nearest by MiniLM + faiss, prompting ``icl_model``), and ``moe:misrouted`` (``misrouted``:
the MoE with each input sent to the next domain's expert, tested against ``moe``). Generation runs on Ray Data (one
actor per model, batched, greedy or ``num_beams`` beam search).

With ``best_of_n > 1``, Best-of-N (:mod:`lm_lexicon.evaluate.best_of_n`): an outcome reward model trained on
the ``bon_model``'s own samples (gold preferred), its held-out pairwise accuracy, ``best_of_n`` samples per test input
reranked by it, and three more rows: ``{model}:sample`` (sample 1, the N = 1 baseline), ``{model}:bon-orm-nN`` and
``{model}:oracle-nN`` (an upper bound: it looks at the references).

Multilingual (docs/MULTILINGUAL.md): prompts come from :mod:`lm_lexicon.data.prompts` under the templates saved with
each trained model (the seed and the baselines: the recipe's ``data.prompt_templates``, which trained them; the
reward model gets its policy's beside it); language compliance (langid) is added to the metrics when any evaluated row is not English
(``evaluate.language_compliance``: None = that rule, true / false = always / never); with more than one language or
with compliance on, a per-language table (BLEU-A, ROUGE-L, BERTScore, compliance, detected languages) is reported.
Best-of-N keeps the samples in the input's language before the reward model picks (``evaluate.bon_language_filter``)
and reports how many inputs had none (the fallback: all samples).

Writes::

    evaluate/
      predictions/{model}.jsonl   term, context, reference(s), prediction, domain, model
      metrics.json                model -> metric -> {value, std, n, settings, skipped_reason}; by_language and
                                  language_compliance (model -> lang -> {n, compliant, share in [0, 1], detected})
      report.md                   model x metric table, per-domain, per-source and per-language breakdowns, settings
      report.html                 the same in one self-contained page, plots embedded, with example rows
      metrics.png                 the headline metrics as bars
      bon.json, bon.png           Best-of-N curves (N = bon_ns) and the reward model's report (best_of_n > 1)
      reward_model/               the trained outcome reward model (safetensors; the serving Scorer loads it)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lm_lexicon.artifacts import StageResult, fingerprint, run_stage
from lm_lexicon.evaluate.rows import sample_rows, write_rows

HEADLINE = ("bleu_a", "sacrebleu", "rouge_l", "bertscore", "meteor")


def _baseline_predictions(name: str, values: list[str], records, domains) -> list[dict]:
    from lm_lexicon.evaluate.generate import prediction_dict

    return [prediction_dict(r, [v], domain=d, model=name) for r, v, d in zip(records, values, domains)]


def _fmt(res: dict) -> str:
    if res.get("value") is None:
        return "skipped"
    std = res.get("std")
    return f"{res['value']:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def compliance_summary(results: dict) -> dict:
    """model -> lang -> {n, compliant, share (in [0, 1]), detected} from the language_compliance results."""
    out = {}
    for model, res in results.items():
        r = res.get("language_compliance") or {}
        st = r.get("settings") or {}
        if r.get("value") is None or "per_language" not in st:
            continue
        out[model] = {lang: {"n": v["n"], "compliant": v["compliant"], "share": v["share"],
                             "detected": st.get("detected", {}).get(lang, {})}
                      for lang, v in st["per_language"].items()}
    return out


def render_language_section(by_language: dict, compliance: dict, meta: dict) -> list[str]:
    if not by_language:
        return []
    first = next(iter(by_language.values()))
    some = next(iter(first.values()), {})
    cols = [m for m in ("bleu_a", "rouge_l", "bertscore") if m in some]
    names = {"bleu_a": "BLEU-A", "rouge_l": "ROUGE-L", "bertscore": "BERTScore"}
    has_compliance = "language_compliance" in some
    header = ["model", "lang", "rows"] + [names[m] for m in cols]
    if has_compliance:
        header += ["compliance (share)", "compliant / n", "detected as"]
    lines = ["", "## By language", ""]
    if has_compliance:
        lines += ["Language compliance: share of predictions that langid (restricted to "
                  f"{', '.join(meta.get('compliance_languages') or [])}) identifies as the row's language; an empty "
                  "prediction does not comply. Short definitions are hard to identify: read it with the detected "
                  "languages.", ""]
    lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for model, groups in by_language.items():
        for lang, res in sorted(groups.items(), key=lambda kv: str(kv[0])):
            n = next((res[m].get("n") for m in res if res[m].get("n") is not None), "")
            row = [model, str(lang), str(n)] + [_fmt(res[m]) for m in cols]
            if has_compliance:
                c = compliance.get(model, {}).get(lang)
                if c is None:
                    row += ["skipped", "", ""]
                else:
                    detected = ", ".join(f"{k} {v}" for k, v in sorted(c["detected"].items(), key=lambda kv: -kv[1]))
                    row += [f"{c['share']:.2f}", f"{c['compliant']} / {c['n']}", detected]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def render_report(results: dict, by_domain: dict, by_source: dict, meta: dict, by_language: dict | None = None,
                  compliance: dict | None = None, vs_floor: dict | None = None) -> str:
    metrics = [m for m in next(iter(results.values()))]
    lines = [f"# Evaluation: {meta['recipe']} on {meta['split']} ({meta['n_rows']} rows, seed {meta['seed']})", "",
             "Protocol A = Moses sentence BLEU with headword-grouped references (DESIGN §4); Protocol B = SacreBLEU "
             "sentence score, ROUGE-L F, BERTScore F1 per line against the line's own reference. All scores ×100 "
             "except length (tokens). Values are means over lines ± their standard deviation across lines.", "",
             "| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for model, res in results.items():
        lines.append(f"| {model} | " + " | ".join(_fmt(res[m]) for m in metrics) + " |")
    skipped = {m: r["skipped_reason"] for res in results.values() for m, r in res.items() if r.get("skipped_reason")}
    if skipped:
        lines += ["", "Skipped metrics: " + "; ".join(f"{m}: {why}" for m, why in skipped.items())]
    if vs_floor:
        lines += render_floor_section(vs_floor).rstrip("\n").split("\n")
    for title, table in (("domain", by_domain), ("source", by_source)):
        if not table:
            continue
        lines += ["", f"## By {title} (Protocol A BLEU / ROUGE-L)", "", "| model | " + title + " | rows | BLEU-A | ROUGE-L |",
                  "|---|---:|---:|---:|---:|"]
        for model, groups in table.items():
            for group, res in sorted(groups.items(), key=lambda kv: str(kv[0])):
                lines.append(f"| {model} | {group} | {res['bleu_a'].get('n')} | {_fmt(res['bleu_a'])} | "
                             f"{_fmt(res['rouge_l'])} |")
    lines += render_language_section(by_language or {}, compliance or {}, meta)
    if meta.get("seed_prompting"):
        lines += ["", f"The untrained seed (seed and seed ICL rows) was asked in its {meta['seed_prompting']}."]
    for note in meta.get("notes", []):
        lines += ["", f"Note: {note}"]
    first = next(iter(results.values()))
    lines += ["", "## Metric settings", ""]
    for m, r in first.items():
        lines.append(f"- **{m}**: `{json.dumps(r.get('settings', {}), default=str)}`")
    return "\n".join(lines) + "\n"


FLOOR = "constant"


def compare_with_floor(results: dict, floor: str = FLOOR, n_permutations: int = 10000, seed: int = 0) -> dict:
    """Every other model against the floor baseline, per metric with per-line scores: the mean difference and the
    two-sided paired sign-flip permutation p-value (same test lines). ``results``: model -> metric -> result with
    ``per_item``. ``{}`` when the floor was not evaluated."""
    import numpy as np

    from lm_lexicon.metrics.statistics import paired_permutation_test

    if floor not in results:
        return {}
    out: dict[str, dict] = {}
    for model, res in results.items():
        if model == floor:
            continue
        for m, r in res.items():
            a, b = r.get("per_item"), (results[floor].get(m) or {}).get("per_item")
            if a is None or b is None or len(a) != len(b) or m == "length":
                continue
            out.setdefault(model, {})[m] = {
                "delta": float(np.mean(a) - np.mean(b)) if len(a) else float("nan"),
                "p_value": paired_permutation_test(a, b, n_permutations=n_permutations, seed=seed) if len(a) else 1.0,
                "n": len(a)}
    return out


def render_floor_section(comparison: dict, floor: str = FLOOR) -> str:
    if not comparison:
        return ""
    metrics = list(dict.fromkeys(m for by in comparison.values() for m in by))
    lines = ["", f"## Against the {floor} floor", "",
             f"Mean difference to the {floor} baseline on the same lines (points ×100), with the two-sided paired "
             "sign-flip permutation test's p-value in brackets; **bold**: above the floor at p < 0.05.", "",
             "| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for model, by in comparison.items():
        cells = []
        for m in metrics:
            c = by.get(m)
            if c is None:
                cells.append("")
                continue
            text = f"{c['delta']:+.2f} ({c['p_value']:.3f})"
            cells.append(f"**{text}**" if c["delta"] > 0 and c["p_value"] < 0.05 else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MISROUTED = "moe:misrouted"


def misrouted_domains(domains, n_experts: int) -> list[int]:
    """Each input's domain moved to the next one, ``(d + 1) mod N``: every input meets an expert not its own."""
    return [(int(d) + 1) % n_experts for d in domains]


def render_misrouted_section(comparison: dict | None) -> str:
    """The report's answer to "does an input's own expert matter?": the misrouted MoE minus the routed one."""
    if not comparison:
        return ""
    metrics = list(comparison)
    cells = [f"{c['delta']:+.2f} ({c['p_value']:.3f})" for c in comparison.values()]
    return "\n".join(["", "## Each input's own expert against another's", "",
                      "The MoE with every input sent to the next domain's expert, `(d + 1) mod N`, minus the routed "
                      "MoE on the same lines (points ×100; two-sided paired sign-flip permutation p in brackets). "
                      "Below zero: the experts specialise.", "",
                      "| " + " | ".join(metrics) + " |", "|" + "---:|" * len(metrics),
                      "| " + " | ".join(cells) + " |"]) + "\n"


def plot_metrics(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [m for m in HEADLINE if any(res.get(m, {}).get("value") is not None for res in results.values())]
    models = list(results)
    fig = Figure(figsize=(1.6 + 1.4 * len(metrics), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [results[model].get(m, {}).get("value") or 0.0 for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], values, width, label=model)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics)
    ax.set_ylabel("score (×100)")
    ax.legend(fontsize=8)
    ax.set_title("Definition modeling: models vs baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def evaluation_metrics(ev, records) -> list[str]:
    """``evaluate.metrics`` plus language compliance when it is on (configured, or any row is not English)."""
    from lm_lexicon.metrics import expand_metric_names

    metrics = expand_metric_names(ev.metrics)  # aliases resolved (compute_metrics reports the expanded names)
    wanted = ev.language_compliance
    if wanted is None:
        wanted = any((r.lang or "en") != "en" for r in records)
    if wanted and "language_compliance" not in metrics:
        metrics.append("language_compliance")
    return metrics


def bertscore_note(ev, metrics: list[str], records) -> str | None:
    """A warning for the report when BERTScore scores non-English rows with the English-only bundled MiniLM."""
    langs = sorted({r.lang or "en" for r in records} - {"en"})
    if "bertscore" in metrics and langs and ev.bertscore_model == "bundled-minilm":
        return (f"BERTScore uses the English-only bundled MiniLM on {', '.join(langs)} rows; set "
                "evaluate.bertscore_model to a multilingual encoder (e.g. a local copy of "
                "bert-base-multilingual-cased) for meaningful non-English scores (docs/MULTILINGUAL.md).")
    return None


def evaluate_stage_fn(cfg, data_dir: Path, partition_dir: Path, experts_dir: Path | None, merge_dir: Path | None,
                      log=print):
    def build(work: Path) -> dict:
        import numpy as np

        from lm_lexicon.evaluate.baselines import (ConstantBaseline, RetrievalBaseline, build_icl_chat_prompts,
                                                   build_icl_prompts, chat_prompt)
        from lm_lexicon.data.prompts import PromptTemplates
        from lm_lexicon.data.records import read_jsonl, records_from_parquet
        from lm_lexicon.partition.embed import Embedder
        from lm_lexicon.evaluate.generate import GenerationSettings, generate_split
        from lm_lexicon.metrics import breakdown, compute_metrics
        from lm_lexicon.metrics.bleu import headword_references
        from lm_lexicon.ray_utils import init_ray
        from lm_lexicon.seed_models import resolve_seed_model
        from lm_lexicon.tracking import tracked_run

        ev = cfg.evaluate
        split = ev.split
        all_rows, all_domains = records_from_parquet([partition_dir / f"{split}.parquet"])
        records, domains = sample_rows(all_rows, all_domains, ev.max_rows, cfg.data.seed)
        if not records:
            raise ValueError(f"the {split} split is empty: nothing to evaluate")
        # Protocol A: references are all definitions of the headword in the whole split, not only the sample
        reference_groups = headword_references(list(read_jsonl(data_dir / f"{split}.jsonl")))
        train = list(read_jsonl(data_dir / "train.jsonl"))
        log(f"[evaluate] {len(records)} {split} rows; models: {', '.join(ev.baselines)}, moe")

        predictions: dict[str, list[dict]] = {}
        t0 = time.perf_counter()
        retrieval = None
        # the trained models carry their templates; the seed, the ICL and retrieval baselines and the partition's
        # embeddings use the recipe's, which the trained models were trained with
        templates = PromptTemplates.from_config(cfg)

        def fit_retrieval():  # the encoder loads only when a retrieval baseline needs it
            embedder = Embedder(cfg.embed.model, batch_size=cfg.embed.batch_size, max_length=cfg.embed.max_length)
            # the partition stage already embedded train.jsonl, row for row, with this same encoder
            return RetrievalBaseline(templates).fit(train, embedder,
                                                    embeddings=np.load(partition_dir / "embeddings.npy"))

        if "constant" in ev.baselines:
            constant = ConstantBaseline().fit(train)
            predictions["constant"] = _baseline_predictions("constant", constant.predict(records), records, domains)
        if "retrieval" in ev.baselines:
            retrieval = fit_retrieval()
            predictions["retrieval"] = _baseline_predictions("retrieval", retrieval.predict(records), records,
                                                             domains)
        settings = GenerationSettings.from_eval_config(ev, sample=False)  # the table is deterministic; BoN samples below
        init_ray(cfg.resources)
        paths = {"seed": resolve_seed_model(cfg.seed_model.name)}
        if experts_dir is not None and (experts_dir / "dense" / "model").exists():
            paths["dense"] = experts_dir / "dense" / "model"
        if merge_dir is not None and (merge_dir / "model").exists():
            paths["moe"] = merge_dir / "model"
        seed_chat = seed_chat_tokenizer(ev, paths["seed"])  # None: the seed is asked in the training format
        models = [(name, paths[name], None, None) for name in ("seed", "dense") if name in ev.baselines and name in paths]
        if seed_chat is not None and models and models[0][0] == "seed":
            models[0] = ("seed", paths["seed"], None, [chat_prompt(seed_chat, r, templates=templates) for r in records])
        for method in ("random", "retrieval"):
            if f"icl-{method}" not in ev.baselines:
                continue
            if ev.icl_model not in paths:
                raise ValueError(f"evaluate.icl_model={ev.icl_model!r} but the run has no {ev.icl_model} model")
            if method == "retrieval" and retrieval is None:
                retrieval = fit_retrieval()
            icl = dict(k=ev.icl_shots, method=method, seed=cfg.data.seed,
                       retriever=retrieval if method == "retrieval" else None, templates=templates)
            if ev.icl_model == "seed" and seed_chat is not None:
                prompts = build_icl_chat_prompts(seed_chat, records, train, **icl)
            else:
                prompts = build_icl_prompts(records, train, **icl)
            models.append((f"icl-{method}", paths[ev.icl_model], None, prompts))
        if "moe" in paths:
            models.append(("moe", paths["moe"], domains, None))
            if ev.misrouted:
                models.append((MISROUTED, paths["moe"], misrouted_domains(domains, cfg.partition.n_experts), None))
        threads = max(1, os.cpu_count() or 1)
        for name, path, model_domains, prompts in models:
            t = time.perf_counter()
            run_settings = settings if prompts is None else \
                settings.replace(max_prompt_tokens=_max_positions(path) - settings.max_new_tokens)
            predictions[name] = generate_split(records, path, run_settings, domains=model_domains, use_ray=True,
                                               num_actors=1, torch_threads=threads, cpus_per_actor=1.0,
                                               model_name=name, prompts=prompts,
                                               templates=templates if name == "seed" else None)
            for p, d in zip(predictions[name], domains):
                p["domain"] = d  # the partition's domain, for the per-domain breakdown of every model
            log(f"[evaluate] generated with {name} in {time.perf_counter() - t:.1f}s; "
                f"e.g. {records[0].term!r}: {predictions[name][0]['prediction']!r}")
        bon_report = None
        if ev.best_of_n > 1:
            if ev.bon_model not in paths:
                raise ValueError(f"evaluate.best_of_n={ev.best_of_n} reranks the {ev.bon_model} model, which this "
                                 "run does not have")
            from lm_lexicon.evaluate.best_of_n.run import run_best_of_n

            bon_rows, bon_report = run_best_of_n(cfg, work, partition_dir, paths[ev.bon_model],
                                                 domains if ev.bon_model == "moe" else None, records, domains,
                                                 reference_groups, evaluation_metrics(ev, records), threads, log,
                                                 dense_path=paths.get("dense"))
            predictions.update(bon_rows)
        generate_s = time.perf_counter() - t0

        metric_names = evaluation_metrics(ev, records)
        langs = sorted({r.lang or "en" for r in records})
        per_language = "language_compliance" in metric_names or len(langs) > 1
        lang_metrics = [m for m in ("bleu_a", "rouge_l", "bertscore", "language_compliance") if m in metric_names]
        results, by_domain, by_source, by_language = {}, {}, {}, {}
        from lm_lexicon.console import bar

        progress = bar("computing metrics", total=len(predictions), unit="models")
        for name, preds in predictions.items():
            progress.update(note=name)
            results[name] = compute_metrics(preds, metric_names, ev, reference_groups=reference_groups)
            _annotate_compliance(preds, results[name].get("language_compliance"))
            write_rows(preds, work / "predictions" / f"{name}.jsonl")
            by_domain[name] = breakdown(preds, ["bleu_a", "rouge_l"], ev, by="domain", results=results[name],
                                        reference_groups=reference_groups)
            if len({p.get("source") for p in preds}) > 1:
                by_source[name] = breakdown(preds, ["bleu_a", "rouge_l"], ev, by="source", results=results[name],
                                            reference_groups=reference_groups)
            if per_language and lang_metrics:
                by_language[name] = breakdown(preds, lang_metrics, ev, by="lang", results=results[name],
                                              reference_groups=reference_groups)
            progress.advance()
        progress.update(note="")
        progress.close()
        notes = [n for n in (bertscore_note(ev, metric_names, records),) if n]
        for n in notes:
            log(f"[evaluate] note: {n}")
        floor = compare_with_floor(results)
        routed_vs_misrouted = compare_with_floor({m: results[m] for m in ("moe", MISROUTED) if m in results},
                                                 floor="moe").get(MISROUTED)
        compact = {m: {k: {kk: vv for kk, vv in v.items() if kk != "per_item"} for k, v in res.items()}
                   for m, res in results.items()}
        compliance = compliance_summary(compact)
        some = next((r["language_compliance"] for r in compact.values() if "language_compliance" in r), {})
        meta = {"recipe": cfg.name, "split": split, "n_rows": len(records), "seed": cfg.data.seed,
                "routing": cfg.merge.routing, "languages": {lang: sum(1 for r in records if (r.lang or "en") == lang)
                                                            for lang in langs},
                "compliance_languages": (some.get("settings") or {}).get("languages"), "notes": notes}
        meta["seed_prompting"] = "chat template" if seed_chat is not None else "training format"
        if templates.overrides:  # the recipe's non-default prompts, for the record
            meta["prompt_templates"] = templates.to_config()
        (work / "metrics.json").write_text(json.dumps({"meta": meta, "results": compact, "best_of_n": bon_report,
                                                       "by_language": _strip(by_language),
                                                       "vs_floor": floor,
                                                       "misrouted_vs_moe": routed_vs_misrouted,
                                                       "language_compliance": compliance},
                                                      indent=2, default=str))
        report = render_report(compact, _strip(by_domain), _strip(by_source), meta, _strip(by_language), compliance,
                               vs_floor=floor)
        report += render_misrouted_section(routed_vs_misrouted)
        if bon_report:
            from lm_lexicon.evaluate.best_of_n.report import render_bon_section

            report += render_bon_section(bon_report)
        (work / "report.md").write_text(report)
        plot_metrics(compact, work / "metrics.png")
        from lm_lexicon.evaluate.report_html import write_report_html

        write_report_html(work, report, predictions, [(work / "metrics.png", "Headline metrics by model"),
                                                      (partition_dir / "clusters.png", "The partition's domains")])
        with tracked_run(cfg.tracking, cfg.output_dir, f"{cfg.name}-evaluate", tags={"stage": "evaluate"}) as run:
            run.log_params({"evaluate": ev.model_dump(mode="json"), "routing": cfg.merge.routing})
            for model, res in compact.items():
                run.log_metrics({f"{model}.{m}": r["value"] for m, r in res.items() if r.get("value") is not None})
            if bon_report:
                run.log_metrics({"reward_model.valid_accuracy": bon_report["reward_model"]["valid_accuracy"]})
            for f in ("report.md", "report.html", "metrics.png", "metrics.json", "bon.png", "bon.json"):
                if (work / f).exists():
                    run.log_artifact(work / f)
        headline = {model: {m: res[m]["value"] for m in HEADLINE if m in res} for model, res in compact.items()}
        out = {"headline": headline, "n_rows": len(records), "split": split, "generate_seconds": round(generate_s, 1)}
        if bon_report:
            out["reward_model_valid_accuracy"] = bon_report["reward_model"]["valid_accuracy"]
        if compliance:
            out["language_compliance"] = {model: {lang: c["share"] for lang, c in by.items()}
                                          for model, by in compliance.items()}
        return out

    return build


def example_rows(eval_dir: Path, models: tuple[str, ...] = ("dense", "moe"), k: int = 5) -> list[dict]:
    """``k`` evaluated lines with their term, context, gold definition and each model's prediction, so a reader sees
    what the models write. Lines are spread evenly over the (seeded) evaluation sample, not picked for quality."""
    by_model = {}
    for model in models:
        path = eval_dir / "predictions" / f"{model}.jsonl"
        if path.exists():
            with path.open(encoding="utf-8") as f:
                by_model[model] = [json.loads(line) for line in f]
    if not by_model:
        return []
    n = min(len(rows) for rows in by_model.values())
    shown = min(k, n)
    picks = sorted({round(i * (n - 1) / max(1, shown - 1)) for i in range(shown)})
    first = next(iter(by_model.values()))
    return [{"term": first[i]["term"], "context": first[i].get("context") or "", "gold": first[i]["reference"],
             **{model: rows[i]["prediction"] for model, rows in by_model.items()}} for i in picks]


def seed_chat_tokenizer(ev, seed_path: Path):
    """The seed's tokenizer when the seed and ICL baselines ask it through its chat template, else None."""
    if ev.seed_prompting == "plain":
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(seed_path), local_files_only=True)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    if ev.seed_prompting == "chat":
        raise ValueError(f"evaluate.seed_prompting=chat, but the seed {seed_path} has no chat template")
    return None


def _annotate_compliance(preds: list[dict], result: dict | None) -> None:
    """Per prediction: ``detected_lang`` and ``language_compliant`` (the metric's per-line values)."""
    if not result or result.get("per_item") is None:
        return
    detected = (result.get("extra") or {}).get("detected_per_item") or [None] * len(preds)
    for p, score, d in zip(preds, result["per_item"], detected):
        p["detected_lang"] = d
        p["language_compliant"] = score > 0


def _max_positions(model_path: Path) -> int:
    """The model's context length (prompt + generation must fit), from its config.json."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    text = config.get("text_config") or config
    return int(text.get("max_position_embeddings") or config.get("max_position_embeddings") or 2048)


def _strip(table: dict) -> dict:
    return {model: {g: {m: {k: v for k, v in r.items() if k != "per_item"} for m, r in res.items()}
                    for g, res in groups.items()} for model, groups in table.items()}


def run_evaluate_stage(cfg, data_result: StageResult, partition_result: StageResult,
                       experts_result: StageResult | None, merge_result: StageResult | None, force: bool = False,
                       log=print) -> StageResult:
    upstream = tuple(r.fingerprint for r in (data_result, partition_result, experts_result, merge_result) if r)
    fp = fingerprint(cfg, ("evaluate",), upstream)
    return run_stage("evaluate", Path(cfg.output_dir) / "evaluate", fp,
                     evaluate_stage_fn(cfg, data_result.path, partition_result.path,
                                       experts_result.path if experts_result else None,
                                       merge_result.path if merge_result else None, log), cfg, force, log)
