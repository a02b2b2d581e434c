"""Evaluation metrics (shared/DESIGN.md §4). Name the protocol in every report.

* Protocol A -- :mod:`lm_lexicon.metrics.bleu`: Moses sentence BLEU, references grouped by headword.
* Protocol B -- SacreBLEU sentence score, ROUGE-L F (rouge-score), BERTScore F1 (:mod:`.text`, :mod:`.semantic`).
* Also METEOR, MAUVE, exact match, distinct-n, length (:mod:`.text`, :mod:`.semantic`), language compliance
  (:mod:`.language`); MoverScore is reported as skipped (its package cannot run offline).

Entry point: :func:`compute_metrics` (and :func:`breakdown` per source/domain). Importing this package is cheap;
torch, bert-score, nltk ... load only when their metric runs.
"""
from lm_lexicon.metrics.bleu import (ReferenceSet, headword_references, nltk_method2_bleu, sentence_bleu_a,
                                     strip_periods, tokenize_a)
from lm_lexicon.metrics.compute import (METRICS, MetricResult, MetricSettings, breakdown, compute_metrics,
                                        expand_metric_names, format_results)
from lm_lexicon.metrics.text import MetricUnavailable

__all__ = ["compute_metrics", "breakdown", "format_results", "MetricSettings", "MetricResult", "MetricUnavailable",
           "METRICS", "expand_metric_names", "sentence_bleu_a", "ReferenceSet", "headword_references",
           "strip_periods", "tokenize_a", "nltk_method2_bleu"]
