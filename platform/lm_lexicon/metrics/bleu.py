"""Protocol A sentence BLEU (Ishiwatari et al. 2019 / Huang et al. 2021 / LM-Lexicon), shared/DESIGN.md §4.

This is Moses ``mert/sentence-bleu`` (``smoothedSentenceBleu`` with smoothing 1), written out so that every number
can be checked by hand:

* preprocessing (all protocols): periods not followed by a digit are removed from hypotheses and references
  (``"a tree."`` -> ``"a tree"``, ``"3.5 cm"`` unchanged);
* tokens are whitespace-separated and case-sensitive; n = 1..4;
* each n-gram precision is ``(matches + 1) / (total + 1)`` -- the +1 on all orders, unigrams included -- where
  ``matches`` is clipped by the largest count of the n-gram in any single reference and ``total`` is the number of
  hypothesis n-grams (``max(c - n + 1, 0)``: a hypothesis shorter than n has precision (0+1)/(0+1) = 1 at order n);
* geometric mean of the four precisions;
* brevity penalty ``exp(1 - r/c)`` when ``c < r``, where ``c`` is the hypothesis length and ``r`` the length of the
  reference closest to ``c`` (ties: the shorter reference);
* **empty hypothesis** (``c = 0``, also after period stripping, e.g. ``"."``): the score is 0. Moses reaches the same
  value through ``exp(1 - r/0) = exp(-inf) = 0``; we return it explicitly instead of dividing by zero;
* references = all definitions of the same headword in the same split (:func:`headword_references`);
* corpus value = mean of the sentence scores over test lines, x 100.

Known differences from NLTK ``sentence_bleu(..., smoothing_function=method2)`` (the number DESIGN §4 quotes for the
baselines): NLTK returns 0 whenever no unigram matches (Moses gives ``1/(c+1)`` to the unigram precision and a
non-zero score), and NLTK gives an order with no hypothesis n-grams precision ``(0+1)/(1+1) = 1/2`` (Moses: 1).
Both push NLTK's mean below Protocol A's on short hypotheses; :func:`nltk_method2_bleu` reproduces NLTK's number
for comparisons.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

MAX_ORDER = 4
SMOOTHING = 1.0

_PERIOD = re.compile(r"\.(?!\d)")


def strip_periods(text: str) -> str:
    """Remove every period that is not followed by a digit (DESIGN §4: applied before every metric).

    ``"a tree."`` -> ``"a tree"``; ``"3.5 cm."`` -> ``"3.5 cm"``; ``"e.g."`` -> ``"eg"``. Whitespace is untouched.
    """
    return _PERIOD.sub("", text)


def tokenize_a(text: str) -> list[str]:
    """Protocol A tokens: periods stripped, then split on whitespace, case kept."""
    return strip_periods(text).split()


def ngram_counts(tokens: Sequence[str], max_order: int = MAX_ORDER) -> Counter:
    """Counts of every n-gram (as a tuple) for n = 1..max_order."""
    counts: Counter = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i:i + n])] += 1
    return counts


class ReferenceSet:
    """Pre-processed references of one headword: max n-gram counts over references and the reference lengths.

    Build it once per headword and score many hypotheses against it (the constant baseline does exactly that).
    """

    __slots__ = ("max_counts", "lengths")

    def __init__(self, references: Iterable[Sequence[str] | str], max_order: int = MAX_ORDER):
        max_counts: Counter = Counter()
        lengths: list[int] = []
        for ref in references:
            toks = tokenize_a(ref) if isinstance(ref, str) else list(ref)
            lengths.append(len(toks))
            for gram, c in ngram_counts(toks, max_order).items():
                if c > max_counts[gram]:
                    max_counts[gram] = c
        if not lengths:
            raise ValueError("a hypothesis needs at least one reference")
        self.max_counts = max_counts
        self.lengths = lengths

    def closest_length(self, c: int) -> int:
        """The reference length closest to ``c``; on a tie the shorter one."""
        return min(self.lengths, key=lambda r: (abs(r - c), r))


def sentence_stats(hyp: Sequence[str], refs: ReferenceSet, max_order: int = MAX_ORDER) -> tuple[list[int], list[int], int, int]:
    """(matches per order, totals per order, c, r) -- Moses' sufficient statistics for one sentence."""
    c = len(hyp)
    matches = [0] * max_order
    totals = [max(c - n + 1, 0) for n in range(1, max_order + 1)]
    for gram, cnt in ngram_counts(hyp, max_order).items():
        m = refs.max_counts.get(gram, 0)
        if m:
            matches[len(gram) - 1] += min(cnt, m)
    return matches, totals, c, refs.closest_length(c)


def sentence_bleu_a(hypothesis: str | Sequence[str], references: ReferenceSet | Iterable[str | Sequence[str]],
                    max_order: int = MAX_ORDER, smoothing: float = SMOOTHING) -> float:
    """Protocol A sentence BLEU of one hypothesis, in [0, 1] (not x100).

    ``hypothesis`` and ``references`` may be raw strings (periods are stripped and whitespace-split here) or token
    lists (used as given). An empty hypothesis scores 0 (see the module docstring).
    """
    hyp = tokenize_a(hypothesis) if isinstance(hypothesis, str) else list(hypothesis)
    refs = references if isinstance(references, ReferenceSet) else ReferenceSet(references, max_order)
    if not hyp:
        return 0.0
    matches, totals, c, r = sentence_stats(hyp, refs, max_order)
    log_p = sum(math.log(m + smoothing) - math.log(t + smoothing) for m, t in zip(matches, totals)) / max_order
    if c < r:
        log_p += 1.0 - r / c
    return math.exp(log_p)


def headword_key(item: Mapping) -> tuple[str, str]:
    """The reference-group key of a prediction/record: (split, term); exact, case-sensitive term."""
    return (str(item.get("split") or ""), str(item["term"]))


def headword_references(items: Iterable[Mapping | object]) -> dict[tuple[str, str], list[str]]:
    """Group definitions by headword: ``(split, term) -> [distinct definitions, first-seen order]``.

    ``items`` are records (with ``definition``) or prediction dicts (with ``references``). Use it on the *whole*
    split when only a sample is evaluated, so that each line still gets every definition of its headword.
    """
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    seen: dict[tuple[str, str], set] = defaultdict(set)
    for it in items:
        d = it if isinstance(it, Mapping) else it.__dict__
        key = headword_key(d)
        refs = d.get("references")
        if refs is None:
            refs = [d["definition"]]
        elif isinstance(refs, str):
            refs = [refs]
        for ref in refs:
            if ref not in seen[key]:
                seen[key].add(ref)
                groups[key].append(ref)
    return dict(groups)


def bleu_a_scores(predictions: Sequence[Mapping], reference_groups: Mapping[tuple[str, str], Sequence[str]] | None = None,
                  grouping: str = "headword") -> list[float]:
    """Per-line Protocol A sentence BLEU (x100) for prediction dicts (``term``, ``split``, ``prediction``,
    ``references``).

    ``grouping="headword"`` (the protocol): each line is scored against every definition of its (split, term) --
    from ``reference_groups`` when given (e.g. built from the full split with :func:`headword_references`), else
    pooled from the ``references`` of the predictions themselves. ``grouping="none"``: each line's own references.
    """
    if grouping not in ("headword", "none"):
        raise ValueError(f"grouping must be 'headword' or 'none', got {grouping!r}")
    cache: dict[tuple[str, ...], ReferenceSet] = {}
    if grouping == "headword" and reference_groups is None:
        reference_groups = headword_references(predictions)
    out: list[float] = []
    for i, p in enumerate(predictions):
        own = _as_list(p.get("references"))
        if grouping == "headword":
            refs = list(reference_groups.get(headword_key(p), ()))
            refs += [r for r in own if r not in refs]  # a line's own references always count
        else:
            refs = own
        if not refs:
            raise ValueError(f"prediction {i} (term {p.get('term')!r}) has no references")
        key = tuple(refs)
        rs = cache.get(key)
        if rs is None:
            rs = cache[key] = ReferenceSet(refs)
        out.append(100.0 * sentence_bleu_a(p.get("prediction") or "", rs))
    return out


def _as_list(refs) -> list[str]:
    if refs is None:
        return []
    if isinstance(refs, str):
        return [refs]
    return list(refs)


def nltk_method2_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """NLTK ``sentence_bleu`` with ``SmoothingFunction().method2`` on the same tokens (periods stripped, whitespace),
    in [0, 1]. For comparison with numbers reported that way (DESIGN §4 baselines), not a protocol of ours."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    import warnings

    hyp = tokenize_a(hypothesis)
    refs = [tokenize_a(r) for r in references]
    if not hyp:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "0 counts of n-gram overlaps" on every short hypothesis
        return float(sentence_bleu(refs, hyp, smoothing_function=SmoothingFunction().method2))
