"""``compute_metrics``: every metric of shared/DESIGN.md §4 over a list of prediction dicts, each reporting its
settings; a metric that cannot run here is reported as skipped with the reason, never as 0.

A prediction dict: ``{"term", "context", "prediction", "references": [str, ...], "lang", "split"}`` plus any
grouping fields (``source``, ``domain`` ...). ``references`` are the line's own gold definitions (usually one);
Protocol A pools them by headword (all definitions of the same ``(split, term)``), every other metric uses the
line's own. Before any metric, periods not followed by a digit are removed from predictions and references.

Scale: every score is 0-100 (BLEU x100, F-measures x100, fractions x100) except ``length`` (tokens).
``std`` is the sample standard deviation over lines (``None`` for corpus-level metrics or fewer than 2 lines).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

from lm_lexicon.metrics.bleu import bleu_a_scores, headword_references, nltk_method2_bleu, strip_periods
from lm_lexicon.metrics.text import MetricUnavailable

PREPROCESSING = "periods not followed by a digit stripped from predictions and references"

#: Metric names compute_metrics accepts; "distinct" expands to distinct_1 + distinct_2.
METRICS = ("bleu_a", "sacrebleu", "rouge_l", "bertscore", "meteor", "mauve", "moverscore", "exact_match",
           "distinct_1", "distinct_2", "length", "language_compliance", "bleu_nltk")
ALIASES = {"distinct": ("distinct_1", "distinct_2"), "language": ("language_compliance",),
           "protocol_a": ("bleu_a",), "protocol_b": ("sacrebleu", "rouge_l", "bertscore"), "rouge": ("rouge_l",)}
#: Metrics with one value per line (the others are corpus-level).
PER_ITEM = {"bleu_a", "sacrebleu", "rouge_l", "bertscore", "meteor", "exact_match", "length", "language_compliance",
            "bleu_nltk"}


@dataclass
class MetricSettings:
    """Knobs of every metric (each result repeats the ones it used, resolved, in its ``settings``)."""

    bleu_a_grouping: str = "headword"          # "headword" (the protocol) | "none" (each line's own references)
    sacrebleu_tokenize: str = "13a"
    sacrebleu_smooth: str = "exp"
    rouge_tokenizer: str = "auto"              # "auto": rouge-score's default for English-only input, else "unicode"
    rouge_stemmer: bool = False
    meteor_wordnet: str = "auto"               # auto | dir | nltk | embedded | none (see text.resolve_meteor_wordnet)
    wordnet_dir: str | None = None
    bertscore_model: str = "bundled-minilm"
    bertscore_layer: int | None = None         # None: the model's last layer
    bertscore_batch_size: int = 64
    bertscore_idf: bool = False
    bertscore_rescale: bool = False            # only honoured when a local baseline file exists
    bertscore_baseline_path: str | None = None
    mauve_encoder: str = "bundled-minilm"
    mauve_num_buckets: Any = "auto"
    mauve_scaling_factor: float = 5.0
    mauve_seed: int = 25
    exact_match_lowercase: bool = False
    languages: list[str] | None = None         # language-compliance label set (None: prompts' languages + expected)
    keep_per_item: bool = True
    device: str = "cpu"
    num_threads: int | None = None             # torch intra-op threads for the model-based metrics

    @classmethod
    def from_any(cls, settings: "MetricSettings | Mapping | Any | None") -> "MetricSettings":
        """Defaults (``None``), a :class:`MetricSettings`, a dict of its fields, or an ``EvalConfig``."""
        if settings is None:
            return cls()
        if isinstance(settings, cls):
            return settings
        if isinstance(settings, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(f"unknown metric settings {unknown}; known: {sorted(known)}")
            return cls(**dict(settings))
        if hasattr(settings, "bertscore_model"):  # lm_lexicon.config.EvalConfig
            return cls(bertscore_model=settings.bertscore_model,
                       bertscore_layer=getattr(settings, "bertscore_layer", None))
        raise TypeError(f"settings must be MetricSettings, a dict or an EvalConfig, not {type(settings).__name__}")


@dataclass
class MetricResult:
    name: str
    value: float | None = None
    std: float | None = None
    n: int = 0
    per_item: list[float] | None = None
    settings: dict = field(default_factory=dict)
    skipped_reason: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("name")
        return d


def expand_metric_names(metrics: Iterable[str] | None) -> list[str]:
    """Resolve aliases (``distinct`` -> ``distinct_1``, ``distinct_2`` ...), keep order, drop repeats."""
    if metrics is None:
        metrics = ["bleu_a", "sacrebleu", "rouge_l", "bertscore", "meteor", "exact_match", "distinct", "length"]
    out: list[str] = []
    for m in metrics:
        names = ALIASES.get(m, (m,))
        for name in names:
            if name not in METRICS:
                raise ValueError(f"unknown metric {m!r}; known: {list(METRICS) + sorted(ALIASES)}")
            if name not in out:
                out.append(name)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def _per_item_result(name: str, values: Sequence[float], settings: dict, keep: bool, extra: dict | None = None) -> MetricResult:
    mean, std = _mean_std(values)
    return MetricResult(name, mean, std, len(values), list(values) if keep else None, settings, None, extra or {})


def _clean_predictions(predictions: Sequence[Mapping]) -> tuple[list[str], list[list[str]], list[dict]]:
    hyps, refs, items = [], [], []
    for i, p in enumerate(predictions):
        if not isinstance(p, Mapping):
            raise TypeError(f"prediction {i} is {type(p).__name__}, not a dict")
        if "term" not in p:
            raise ValueError(f"prediction {i} has no 'term'")
        h = p.get("prediction")
        if h is None:
            h = ""
        if not isinstance(h, str):
            raise TypeError(f"prediction {i}: 'prediction' is {type(h).__name__}, not str")
        r = p.get("references")
        if r is None:
            r = [p["definition"]] if isinstance(p.get("definition"), str) else []
        elif isinstance(r, str):
            r = [r]
        hyps.append(strip_periods(h))
        refs.append([strip_periods(x) for x in r])
        items.append({**p, "prediction": h, "references": list(r)})
    return hyps, refs, items


def _need_references(refs: Sequence[Sequence[str]], metric: str) -> None:
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f"{metric}: prediction {i} has no references")


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(int(n))


def _compute_one(name: str, hyps: list[str], refs: list[list[str]], items: list[dict], s: MetricSettings,
                 reference_groups: Mapping | None) -> MetricResult:
    keep = s.keep_per_item
    if name == "bleu_a":
        _need_references(refs, name)
        scores = bleu_a_scores(items, reference_groups=reference_groups, grouping=s.bleu_a_grouping)
        settings = {"protocol": "A (Ishiwatari / Huang / LM-Lexicon; Moses sentence-bleu)",
                    "tokens": "whitespace, case-sensitive", "orders": "1-4",
                    "smoothing": "(matches+1)/(total+1) on every order", "brevity_penalty":
                    "exp(1-r/c) if c<r; r = closest reference length, ties -> shorter", "empty_hypothesis": "0",
                    "references": ("all definitions of the same (split, term)" +
                                   (" from the given reference groups" if reference_groups is not None else
                                    " among the evaluated lines") if s.bleu_a_grouping == "headword" else
                                   "the line's own references (grouping off: NOT the protocol)"),
                    "aggregate": "mean of sentence scores x100"}
        return _per_item_result(name, scores, settings, keep)
    if name == "bleu_nltk":
        _need_references(refs, name)
        groups = reference_groups if reference_groups is not None else headword_references(items)
        scores = []
        for p, own in zip(items, refs):
            rs = [strip_periods(r) for r in groups.get((str(p.get("split") or ""), str(p["term"])), ())]
            rs += [r for r in own if r not in rs]
            scores.append(100.0 * nltk_method2_bleu(strip_periods(p["prediction"]), rs))
        settings = {"protocol": "none (diagnostic): NLTK sentence_bleu, SmoothingFunction().method2",
                    "tokens": "whitespace, case-sensitive", "references": "all definitions of the same (split, term)",
                    "differs_from_A": "0 when no unigram matches; an order with no hypothesis n-grams gets 1/2"}
        return _per_item_result(name, scores, settings, keep)
    if name == "sacrebleu":
        from lm_lexicon.metrics.text import sacrebleu_sentence

        _need_references(refs, name)
        scores, settings = sacrebleu_sentence(hyps, refs, tokenize=s.sacrebleu_tokenize, smooth_method=s.sacrebleu_smooth)
        return _per_item_result(name, scores, {"protocol": "B (Giulianelli / LTG)", **settings}, keep)
    if name == "rouge_l":
        from lm_lexicon.metrics.text import rouge_l

        _need_references(refs, name)
        tok = s.rouge_tokenizer
        if tok == "auto":
            tok = "default" if all((p.get("lang") or "en") == "en" for p in items) else "unicode"
        scores, settings = rouge_l(hyps, refs, tokenizer=tok, use_stemmer=s.rouge_stemmer)
        return _per_item_result(name, scores, {"protocol": "B (Giulianelli / LTG)", **settings}, keep)
    if name == "meteor":
        from lm_lexicon.metrics.text import meteor

        _need_references(refs, name)
        scores, settings = meteor(hyps, refs, wordnet=s.meteor_wordnet, wordnet_dir=s.wordnet_dir)
        return _per_item_result(name, scores, settings, keep)
    if name == "bertscore":
        from lm_lexicon.metrics.semantic import bertscore

        _need_references(refs, name)
        _set_threads(s.num_threads)
        langs = {str(p.get("lang") or "en") for p in items}
        P, R, F, settings = bertscore(hyps, refs, model=s.bertscore_model, num_layers=s.bertscore_layer,
                                      batch_size=s.bertscore_batch_size, idf=s.bertscore_idf,
                                      rescale_with_baseline=s.bertscore_rescale,
                                      baseline_path=s.bertscore_baseline_path, device=s.device,
                                      lang=langs.pop() if len(langs) == 1 else "en")  # lang: baseline file only
        extra = {"precision": _mean_std(P)[0], "recall": _mean_std(R)[0]}
        if keep:
            extra.update(precision_per_item=P, recall_per_item=R)
        return _per_item_result(name, F, {"protocol": "B (Giulianelli / LTG)", **settings}, keep, extra)
    if name == "mauve":
        from lm_lexicon.metrics.semantic import mauve

        _need_references(refs, name)
        _set_threads(s.num_threads)
        value, settings = mauve(hyps, [r[0] for r in refs], encoder=s.mauve_encoder, num_buckets=s.mauve_num_buckets,
                                scaling_factor=s.mauve_scaling_factor, seed=s.mauve_seed)
        return MetricResult(name, value, None, len(hyps), None, settings)
    if name == "moverscore":
        from lm_lexicon.metrics.semantic import moverscore_unavailable_reason

        raise MetricUnavailable(moverscore_unavailable_reason())
    if name == "exact_match":
        from lm_lexicon.metrics.text import exact_match

        _need_references(refs, name)
        scores, settings = exact_match(hyps, refs, lowercase=s.exact_match_lowercase)
        return _per_item_result(name, scores, settings, keep)
    if name in ("distinct_1", "distinct_2"):
        from lm_lexicon.metrics.text import distinct_n

        value, settings = distinct_n(hyps, int(name[-1]))
        return MetricResult(name, value, None, len(hyps), None, settings)
    if name == "length":
        from lm_lexicon.metrics.text import lengths

        hl = lengths(hyps)
        ref_len = [math.fsum(lengths(r)) / len(r) for r in refs if r]
        extra = {"reference_mean": _mean_std(ref_len)[0],
                 "ratio": (math.fsum(hl) / math.fsum(ref_len)) if ref_len and math.fsum(ref_len) else None,
                 "empty_predictions": sum(1 for x in hl if x == 0)}
        settings = {"unit": "whitespace tokens (Protocol A tokens)", "reference_mean": "mean over lines of the mean "
                    "length of the line's own references"}
        return _per_item_result(name, [float(x) for x in hl], settings, keep, extra)
    if name == "language_compliance":
        from lm_lexicon.metrics.language import compliance_with_detections

        expected = [str(p.get("lang") or "en") for p in items]
        scores, settings, detected = compliance_with_detections(hyps, expected, languages=s.languages)
        return _per_item_result(name, scores, settings, keep, {"detected_per_item": detected} if keep else None)
    raise ValueError(f"unknown metric {name!r}")  # pragma: no cover - expand_metric_names guards


def compute_metrics(predictions: Sequence[Mapping], metrics: Iterable[str] | None = None,
                    settings: MetricSettings | Mapping | Any | None = None,
                    reference_groups: Mapping[tuple[str, str], Sequence[str]] | None = None) -> dict[str, dict]:
    """Compute ``metrics`` over ``predictions``; returns ``{metric: {value, std, n, per_item, settings,
    skipped_reason, extra}}``.

    ``reference_groups`` (optional, Protocol A): ``(split, term) -> definitions`` of the *whole* split, from
    :func:`lm_lexicon.metrics.bleu.headword_references`, when only a sample of it is evaluated.
    A metric whose dependency or model is unavailable comes back with ``value=None`` and ``skipped_reason``.
    """
    s = MetricSettings.from_any(settings)
    names = expand_metric_names(metrics)
    hyps, refs, items = _clean_predictions(predictions)
    out: dict[str, dict] = {}
    for name in names:
        if not items:
            res = MetricResult(name, skipped_reason="no predictions")
        else:
            try:
                res = _compute_one(name, hyps, refs, items, s, reference_groups)
            except MetricUnavailable as e:
                res = MetricResult(name, None, None, len(items), None, {}, str(e))
        res.settings = {"preprocessing": PREPROCESSING, **res.settings}
        out[name] = res.to_dict()
    return out


def _group_key(by: str | Callable[[Mapping], Any]) -> Callable[[Mapping], Any]:
    if callable(by):
        return by
    return lambda p: p.get(by) if p.get(by) is not None else "<none>"


def breakdown(predictions: Sequence[Mapping], metrics: Iterable[str] | None = None,
              settings: MetricSettings | Mapping | Any | None = None, by: str | Callable[[Mapping], Any] = "source",
              results: Mapping[str, dict] | None = None,
              reference_groups: Mapping[tuple[str, str], Sequence[str]] | None = None) -> dict[Any, dict[str, dict]]:
    """Metrics per group (``by``: a prediction field such as ``source`` or ``domain``, or a function).

    Per-line metrics are the overall per-line values averaged within each group -- so Protocol A keeps the
    references of the whole evaluated set (pass ``results`` from :func:`compute_metrics` with per-item values to
    avoid recomputing). Corpus-level metrics (distinct-n, MAUVE) are recomputed on each group's lines.
    """
    s = MetricSettings.from_any(settings)
    names = expand_metric_names(metrics)
    if results is None or any(n in PER_ITEM and results.get(n, {}).get("per_item") is None
                              and results.get(n, {}).get("skipped_reason") is None for n in names):
        full = MetricSettings(**{**asdict(s), "keep_per_item": True})
        results = compute_metrics(predictions, names, full, reference_groups=reference_groups)
    key = _group_key(by)
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(predictions):
        groups.setdefault(key(p), []).append(i)
    out: dict[Any, dict[str, dict]] = {}
    for g, idx in sorted(groups.items(), key=lambda kv: str(kv[0])):
        sub: dict[str, dict] = {}
        corpus_names = [n for n in names if n not in PER_ITEM]
        corpus = compute_metrics([predictions[i] for i in idx], corpus_names, s) if corpus_names else {}
        for n in names:
            r = results[n]
            if n not in PER_ITEM:
                sub[n] = corpus[n]
            elif r.get("skipped_reason") is not None:
                sub[n] = dict(r)
                sub[n]["n"] = len(idx)
            else:
                vals = [r["per_item"][i] for i in idx]
                mean, std = _mean_std(vals)
                sub[n] = {"value": mean, "std": std, "n": len(vals), "per_item": vals if s.keep_per_item else None,
                          "settings": r["settings"], "skipped_reason": None, "extra": {}}
        out[g] = sub
    return out


def format_results(results: Mapping[str, dict], title: str | None = None) -> str:
    """A Markdown table: metric, value, std, n, and the skip reason or the key settings."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| metric | value | std | n | notes |", "| --- | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        val = "skipped" if r.get("skipped_reason") else (f"{r['value']:.2f}" if r.get("value") is not None else "-")
        std = f"{r['std']:.2f}" if r.get("std") is not None else ""
        if r.get("skipped_reason"):
            note = r["skipped_reason"]
        else:
            st = r.get("settings", {})
            keys = ("protocol", "signature", "tokenizer", "model", "layer", "wordnet", "encoder", "references")
            note = "; ".join(f"{k}: {st[k]}" for k in keys if k in st)
        lines.append(f"| {name} | {val} | {std} | {r.get('n', 0)} | {note} |")
    return "\n".join(lines)
