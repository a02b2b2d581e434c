"""Language compliance: does the model answer in the language it was asked for?

An offline identifier (``langid``, its model ships inside the package) is restricted to the languages of interest
(by default the languages the prompts name, :data:`lm_lexicon.data.prompts.LANGUAGE_NAMES`, plus every expected
language in the predictions), and a prediction complies when the detected language equals the expected one.
An empty prediction has no language and does not comply. Short texts are hard to identify: read the value with the
per-language breakdown in the settings. The same rule filters Best-of-N samples (:func:`complies`).
"""
from __future__ import annotations

import copy
from collections import Counter, defaultdict
from typing import Sequence

from lm_lexicon.metrics.text import MetricUnavailable, _version

_IDENTIFIERS: dict = {}
_FULL: list = []  # the unrestricted identifier, decoded once per process (it takes seconds)


def _identifier(languages: tuple[str, ...]):
    lid = _IDENTIFIERS.get(languages)
    if lid is None:
        if not _FULL:
            try:
                from langid.langid import LanguageIdentifier, model
            except ImportError as e:
                raise MetricUnavailable(f"langid is not installed ({e})") from e
            _FULL.append(LanguageIdentifier.from_modelstring(model, norm_probs=True))
        full = _FULL[0]
        known = set(full.nb_classes)
        unknown = [l for l in languages if l not in known]
        if unknown:
            raise MetricUnavailable(f"langid does not know language(s) {unknown}")
        # set_languages rebinds the instance's arrays from the full model it keeps: a shallow copy per label set
        # shares the decoded model and leaves langid's module-level identifier alone
        lid = copy.copy(full)
        lid.set_languages(list(languages))
        _IDENTIFIERS[languages] = lid
    return lid


def detect_languages(texts: Sequence[str], languages: Sequence[str]) -> list[str | None]:
    """The detected language code of each text among ``languages`` (``None`` for an empty text)."""
    lid = _identifier(tuple(sorted(set(languages))))
    return [lid.classify(t)[0] if t.strip() else None for t in texts]


def label_set(expected: Sequence[str], languages: Sequence[str] | None = None) -> list[str]:
    """The identifier's label set: ``languages`` (default: the languages the prompts name) plus every expected one."""
    if languages is None:
        from lm_lexicon.data.prompts import LANGUAGE_NAMES

        languages = list(LANGUAGE_NAMES)
    return sorted(set(languages) | set(expected))


def complies(texts: Sequence[str], expected: Sequence[str], languages: Sequence[str] | None = None) -> list[bool]:
    """Whether each text is identified as its expected language (an empty text never is). The rule of
    :func:`language_compliance`, for filtering (e.g. Best-of-N samples)."""
    if len(texts) != len(expected):
        raise ValueError(f"{len(texts)} texts for {len(expected)} expected languages")
    if not texts:
        return []
    detected = detect_languages(texts, label_set(expected, languages))
    return [d is not None and d == e for d, e in zip(detected, expected)]


def language_compliance(hyps: Sequence[str], expected: Sequence[str],
                        languages: Sequence[str] | None = None) -> tuple[list[float], dict]:
    """Per line 100 if the detected language of the prediction is the expected one, else 0.

    ``settings["per_language"]``: per expected language, ``n`` (lines), ``compliant`` (lines that comply),
    ``share`` (compliant / n, in [0, 1]) and ``compliance`` (the same x100, the metric's scale).
    """
    scores, settings, _ = compliance_with_detections(hyps, expected, languages)
    return scores, settings


def compliance_with_detections(hyps: Sequence[str], expected: Sequence[str],
                               languages: Sequence[str] | None = None) -> tuple[list[float], dict, list[str | None]]:
    """:func:`language_compliance` plus the detected language of each line (None for an empty line)."""
    langs = label_set(expected, languages)
    detected = detect_languages(hyps, langs)
    scores = [100.0 if d is not None and d == e else 0.0 for d, e in zip(detected, expected)]
    by_lang: dict[str, list[float]] = defaultdict(list)
    confusion: dict[str, Counter] = defaultdict(Counter)
    for s, d, e in zip(scores, detected, expected):
        by_lang[e].append(s)
        confusion[e][d or "<empty>"] += 1
    settings = {"identifier": f"langid {_version('langid')} (restricted, normalized probabilities)",
                "languages": langs, "empty prediction": "does not comply",
                "per_language": {l: {"n": len(v), "compliant": sum(1 for x in v if x > 0),
                                     "share": sum(1 for x in v if x > 0) / len(v), "compliance": sum(v) / len(v)}
                                 for l, v in sorted(by_lang.items())},
                "detected": {l: dict(c) for l, c in sorted(confusion.items())}}
    return scores, settings, detected
