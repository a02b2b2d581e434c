"""Mixing sources: seeded per-source caps, and a split that is leak-free across sources.

Why the split needs care: sources share terms ("bank" is in WordNet, GCIDE and FOLDOC), so splitting each source on
its own would put a term's GCIDE senses in train and its WordNet senses in test. The rule is the WordNet one (no
term in two splits, terms compared case-folded), extended across sources:

* rows that arrive with a split (the packaged WordNet corpus, benchmark files) keep it and **pin** their terms to it;
* the other rows (dictd sources) are grouped into connected components of a graph linking each row's term to its
  definition, so neither a term nor an identical definition crosses splits (GCIDE's "Banc" and "Bank" share
  definitions the way WordNet synonyms share a gloss);
* a component holding pinned terms or definitions goes to their split; a free component is dealt out as WordNet's are
  (:func:`lm_lexicon.data.wordnet.assign_splits`): components larger than 0.5% of the rows go to train, the rest are
  shuffled with the seed and fill test, then valid, up to 10% each;
* a component pinned to different splits (e.g. FOLDOC's "SIR" and "SPUR", both "an early system on the IBM 650",
  while WordNet holds "sir" in train and "spur" in valid) cannot keep both the term rule and the definition rule:
  each row then follows its own term's pin (terms never leak), rows of unpinned terms go to train, and the
  component is counted as a conflict.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Optional

from lm_lexicon.data.records import SPLITS, Record
from lm_lexicon.data.wordnet import SPLIT_FRACTIONS, UnionFind


def term_key(term: str) -> str:
    """Terms are compared case-folded across sources ("Bank" in GCIDE is "bank" in WordNet)."""
    return term.casefold()


def cap_rows(rows: list[Record], max_rows: Optional[int], seed: int,
             source: str) -> tuple[list[Record], Optional[dict]]:
    """A seeded sample of at most ``max_rows`` rows (order kept), and what was done (None when nothing was cut).
    The source name is part of the seed, so two sources capped with the same seed are sampled independently."""
    if max_rows is None or len(rows) <= max_rows:
        return rows, None
    picked = sorted(random.Random(f"{seed}:{source}").sample(range(len(rows)), max_rows))
    return [rows[i] for i in picked], {"available": len(rows), "kept": max_rows, "seed": seed}


def _nodes(r: Record) -> tuple[str, str]:
    """A row's two graph nodes: its term and its definition (both case-folded)."""
    return "t:" + term_key(r.term), "d:" + r.definition.casefold()


def _pins(pinned: list[Record]) -> dict[str, set[str]]:
    """The splits of the pinned rows, by graph node."""
    pins: dict[str, set[str]] = defaultdict(set)
    for r in pinned:
        for node in _nodes(r):
            pins[node].add(r.split)
    return pins


def _components(free: list[Record]) -> dict[str, list[int]]:
    uf = UnionFind()
    for r in free:
        uf.union(*_nodes(r))
    comps: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(free):
        comps[uf.find(_nodes(r)[0])].append(i)
    return comps


def assign_mixed_splits(pinned: list[Record], free: list[Record], seed: int = 0,
                        fractions: Optional[dict[str, float]] = None, big_fraction: float = 0.005) -> dict:
    """Set ``split`` on every ``free`` row so that no term crosses splits, given the ``pinned`` rows' splits.

    Returns statistics: rows per split by how they were placed (pinned component / dealt), component counts and
    conflicts (see the module docstring).
    """
    fractions = fractions or SPLIT_FRACTIONS
    pins = _pins(pinned)
    comps = _components(free)
    placed: Counter = Counter()
    stats = {"components": len(comps), "pinned_components": 0, "conflict_components": 0, "conflict_rows": 0}
    loose: list[str] = []
    for cid in sorted(comps):
        rows = [free[i] for i in comps[cid]]
        splits = set().union(*(pins.get(node, set()) for r in rows for node in _nodes(r)))
        if not splits:
            loose.append(cid)
        elif len(splits) == 1:
            stats["pinned_components"] += 1
            for r in rows:
                r.split = next(iter(splits))
                placed[r.split] += 1
        else:
            stats["conflict_components"] += 1
            stats["conflict_rows"] += len(rows)
            for r in rows:
                own = pins.get(_nodes(r)[0], set())
                r.split = next(iter(own)) if len(own) == 1 else "train"
                placed[r.split] += 1
    dealt = _deal(comps, loose, free, placed, fractions, seed, big_fraction)
    stats["rows_in_pinned_components"] = {s: placed[s] for s in SPLITS}
    stats["rows_dealt"] = dealt
    return stats


def _deal(comps: dict[str, list[int]], loose: list[str], free: list[Record], placed: Counter,
          fractions: dict[str, float], seed: int, big_fraction: float) -> dict[str, int]:
    """Deal the free components to splits as :func:`lm_lexicon.data.wordnet.assign_splits` does."""
    total = len(free)
    targets = {s: fractions.get(s, 0.0) * total for s in SPLITS}
    filled = Counter(placed)
    big_limit = max(1.0, big_fraction * total)
    big = [c for c in loose if len(comps[c]) > big_limit]
    small = [c for c in loose if len(comps[c]) <= big_limit]
    random.Random(seed).shuffle(small)
    dealt: Counter = Counter()
    for cid in big + small:
        n = len(comps[cid])
        split = "train"
        if cid not in big:
            split = next((s for s in ("test", "valid") if filled[s] + n <= targets[s]), "train")
        for i in comps[cid]:
            free[i].split = split
        filled[split] += n
        dealt[split] += n
    return {s: dealt[s] for s in SPLITS}
