"""Language compliance: does the model answer in the language it was asked for?

An offline identifier (``langid``, its model ships inside the package) is restricted to the languages of interest
(by default the languages the prompts name, :data:`lm_lexicon.data.prompts.LANGUAGE_NAMES`, plus every expected
language in the predictions), and a prediction complies when the detected language equals the expected one.
An empty prediction has no language and does not comply. Short texts are hard to identify: read the value with the
per-language breakdown in the settings.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

from lm_lexicon.metrics.text import MetricUnavailable, _version

_IDENTIFIERS: dict = {}


def _identifier(languages: tuple[str, ...]):
    lid = _IDENTIFIERS.get(languages)
    if lid is None:
        try:
            from langid.langid import LanguageIdentifier, model
        except ImportError as e:
            raise MetricUnavailable(f"langid is not installed ({e})") from e
        lid = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        known = set(lid.nb_classes)
        unknown = [l for l in languages if l not in known]
        if unknown:
            raise MetricUnavailable(f"langid does not know language(s) {unknown}")
        lid.set_languages(list(languages))  # on this instance only, not langid's module-level identifier
        _IDENTIFIERS[languages] = lid
    return lid


def detect_languages(texts: Sequence[str], languages: Sequence[str]) -> list[str | None]:
    """The detected language code of each text among ``languages`` (``None`` for an empty text)."""
    lid = _identifier(tuple(sorted(set(languages))))
    return [lid.classify(t)[0] if t.strip() else None for t in texts]


def language_compliance(hyps: Sequence[str], expected: Sequence[str],
                        languages: Sequence[str] | None = None) -> tuple[list[float], dict]:
    """Per line 100 if the detected language of the prediction is the expected one, else 0."""
    if languages is None:
        from lm_lexicon.data.prompts import LANGUAGE_NAMES

        languages = list(LANGUAGE_NAMES)
    langs = sorted(set(languages) | set(expected))
    detected = detect_languages(hyps, langs)
    scores = [100.0 if d is not None and d == e else 0.0 for d, e in zip(detected, expected)]
    by_lang: dict[str, list[float]] = defaultdict(list)
    confusion: dict[str, Counter] = defaultdict(Counter)
    for s, d, e in zip(scores, detected, expected):
        by_lang[e].append(s)
        confusion[e][d or "<empty>"] += 1
    settings = {"identifier": f"langid {_version('langid')} (restricted, normalized probabilities)",
                "languages": langs, "empty prediction": "does not comply",
                "per_language": {l: {"n": len(v), "compliance": sum(v) / len(v)} for l, v in sorted(by_lang.items())},
                "detected": {l: dict(c) for l, c in sorted(confusion.items())}}
    return scores, settings
