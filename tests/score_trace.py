"""Compare two decoding runs of the same model without depending on float ties (a helper for the tests).

Two computations of one function — cached and uncached decoding, a row alone and inside a left-padded batch, a mixed
batch and a batch of one domain, this process and a Ray actor — agree to float rounding (measured here: <= 1e-6 of
the largest score), not bit for bit, and which kernels a CPU picks decides the rounding. A random tiny model's
next-token scores are nearly flat (greedy top-2 margins down to ~5e-4), so comparing generated tokens would compare
roundings, and a 1e-7 difference at a near tie turns into another token. Instead a :class:`ScoreTrace` records
the final scores (after every logits processor) of each row at each decoding step, keyed by (row, generated prefix),
and :func:`assert_same_decoding` compares two traces wherever both runs decoded the same prefix:

* the scores must agree within a tolerance (a broken property — padding leaking into a row, a wrong expert, a route
  re-decided per token — moves them by 1e-2 or more);
* a row whose runs then pick different tokens has therefore hit a near tie (two vectors within the tolerance can only
  have different argmaxes where their top two are within twice the tolerance): allowed, and the comparison of that
  row ends there, as the two runs no longer share a prefix.

Rows that never diverged must produce identical outputs, which the tests then check exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

Key = tuple  # (row id, generated prefix as a tuple of token ids)


class ScoreTrace:
    """Final scores per (row id, generated prefix), from one or more ``generate`` calls."""

    def __init__(self, eos_ids: Iterable[int] = ()):
        self.eos_ids = {int(e) for e in eos_ids}
        self.scores: dict[Key, torch.Tensor] = {}

    def processor(self, row_ids: Sequence[Hashable], prompt_width: int) -> "ScoreRecorder":
        """A logits processor recording into this trace, for a batch whose input row i is ``row_ids[i]`` and whose
        prompts are ``prompt_width`` tokens wide (beam search's expanded rows map back to their input row)."""
        return ScoreRecorder(self, list(row_ids), int(prompt_width))

    def processors(self, row_ids: Sequence[Hashable], prompt_width: int) -> LogitsProcessorList:
        return LogitsProcessorList([self.processor(row_ids, prompt_width)])

    def rows(self) -> set:
        return {row for row, _ in self.scores}

    def keys_of(self, row) -> list[Key]:
        return sorted((k for k in self.scores if k[0] == row), key=lambda k: len(k[1]))

    def chosen(self, key: Key) -> int:
        """The token a greedy or Gumbel-max step picked: the argmax of its final scores."""
        return int(self.scores[key].argmax())

    def min_margin(self, row) -> float:
        """The smallest top-1 minus top-2 score over the row's steps: how far its decisions are from a tie."""
        margins = [float("inf")]
        for key in self.keys_of(row):
            s = self.scores[key]
            finite = s[torch.isfinite(s)]
            if finite.numel() > 1:  # top-p may leave one token: no decision to make
                top = finite.topk(2).values
                margins.append(float(top[0] - top[1]))
        return min(margins)


class ScoreRecorder(LogitsProcessor):
    """Appended last to a generation's processors: stores the scores, returns them unchanged."""

    def __init__(self, trace: ScoreTrace, row_ids: list, prompt_width: int):
        self.trace, self.row_ids, self.prompt_width = trace, row_ids, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        expand = input_ids.shape[0] // len(self.row_ids)  # beams: rows are repeat_interleave'd
        generated = input_ids[:, self.prompt_width:].tolist()
        for r, prefix in enumerate(generated):
            if self.trace.eos_ids & set(prefix):
                continue  # a finished row: what follows its EOS is padding
            key = (self.row_ids[r // expand], tuple(prefix))
            if key not in self.trace.scores:  # beams of one prompt share the empty prefix: same scores
                self.trace.scores[key] = scores[r].detach().float().cpu().clone()
        return scores


@dataclass
class Comparison:
    compared: int = 0  # (row, prefix) steps compared
    max_diff: float = 0.0  # the largest score difference seen
    diverged: set = field(default_factory=set)  # rows whose runs picked different tokens at a near tie
    mask_mismatches: int = 0  # scores finite in one run, -inf in the other (a top-k / top-p cut at a near tie)


def assert_same_decoding(a: ScoreTrace, b: ScoreTrace, atol: float = 1e-5, rtol: float = 1e-4, *,
                         rows: Optional[Iterable] = None, beams: bool = False,
                         max_mask_mismatches: int = 2) -> Comparison:
    """Assert that two runs score every prefix both decoded within ``atol + rtol * max|score|`` (see the module
    docstring); ``max|score|`` is the largest finite score of the step, as a step's rounding error is set by the
    size of its vector (the hidden state, the head), not by each entry's own value.

    Measured between two computations of these fixtures (batch shape, left padding, 1 or 2 threads, cached or not,
    Mixtral or ours): differences <= 1e-6 of the largest score; the default allows 100 times that, which also
    covers a simulated CPU whose every matmul output is off by 1e-6 relative (~10 roundings, 20x the real spread).
    A broken property moves scores by 1e-2 or more (asserted by the tests where it matters); scores here stay
    <= ~35, so the tolerance stays below 4e-3.

    ``rows``: the row ids to compare (default: every row of ``a``; each must be in ``b``). ``beams``: beam search,
    whose kept beams are not an argmax: only the scores of shared prefixes are compared, and a row counts as
    diverged when the two runs explored different prefixes. ``max_mask_mismatches``: per step, how many tokens may be
    cut (-inf) in one run and not the other — a near tie at a top-k / top-p boundary; a broken mask cuts many."""
    rows = set(a.rows()) if rows is None else set(rows)
    assert rows, "nothing was recorded"
    out = Comparison()
    for row in sorted(rows, key=repr):
        keys_a, keys_b = a.keys_of(row), set(b.keys_of(row))
        assert keys_a and (row, ()) in keys_b, f"row {row!r}: the first step is missing from a run"
        for key in keys_a:
            if key not in keys_b:
                continue
            sa, sb = a.scores[key], b.scores[key]
            fa, fb = torch.isfinite(sa), torch.isfinite(sb)
            both = fa & fb
            mismatched = int((fa ^ fb).sum())
            assert mismatched <= max_mask_mismatches, \
                f"row {row!r} after {len(key[1])} tokens: {mismatched} tokens cut in one run only"
            diff = float((sa[both] - sb[both]).abs().max())
            scale = float(sb[fb].abs().max())
            assert diff <= atol + rtol * scale, f"row {row!r} after {len(key[1])} tokens: scores differ by {diff:.3g}" \
                                                f" > {atol:g} + {rtol:g} * {scale:.3g}"
            out.compared += 1
            out.max_diff = max(out.max_diff, diff)
            out.mask_mismatches += mismatched
            if not beams and a.chosen(key) != b.chosen(key):
                out.diverged.add(row)
        if beams and set(keys_a) != keys_b:
            out.diverged.add(row)
    return out


# =================================================================================================== DefinitionGenerator
class DefinitionTraces:
    """Records the scores of :class:`lm_lexicon.evaluate.generate.DefinitionGenerator` batches: ``run(gen.generate,
    ...)`` returns ``(output, trace)``. Rows are keyed by (prompt token ids, sampling seed or None) — see
    :func:`definition_rows` — and the trace processor is appended after the generator's own."""

    def __init__(self, monkeypatch):
        import lm_lexicon.evaluate.generate as generate

        build = generate._processors
        self.trace: Optional[ScoreTrace] = None

        def with_trace(settings, pad_lengths, row_seeds, prompt_width=None):
            procs = build(settings, pad_lengths, row_seeds, prompt_width)
            if self.trace is not None:
                procs.append(_DefinitionRows(self.trace, list(pad_lengths), row_seeds, prompt_width))
            return procs

        monkeypatch.setattr(generate, "_processors", with_trace)

    def run(self, generate, *args, eos_ids: Iterable[int] = (), **kwargs):
        """Call ``generate(*args, **kwargs)`` (a generator's method, or anything that runs one in this process)."""
        if not eos_ids:
            eos_ids = getattr(getattr(generate, "__self__", None), "eos_ids", ())
        self.trace = ScoreTrace(eos_ids)
        try:
            return generate(*args, **kwargs), self.trace
        finally:
            self.trace = None


class _DefinitionRows(LogitsProcessor):
    """A recorder for DefinitionGenerator batches: the row id comes from the (unpadded) prompt and its seed."""

    def __init__(self, trace: ScoreTrace, pad_lengths: list, row_seeds, prompt_width: int):
        self.trace, self.pad_lengths, self.row_seeds, self.width = trace, pad_lengths, row_seeds, prompt_width

    def __call__(self, input_ids, scores):
        ids = [tuple(input_ids[r, pad:self.width].tolist()) for r, pad in enumerate(self.pad_lengths)]
        seeds = self.row_seeds or [None] * len(ids)
        return ScoreRecorder(self.trace, list(zip(ids, seeds)), self.width)(input_ids, scores)


def definition_rows(generator, prompts: Sequence[str], settings) -> list[list[tuple]]:
    """The trace row ids of each prompt's sequences under ``settings``: ``[[(prompt ids, seed)] * n]`` (greedy: one
    row, whose output the generator repeats n times)."""
    from lm_lexicon.evaluate.generate import row_seed

    ids = [tuple(p) for p in generator.encode_prompts(prompts, settings.max_prompt_tokens)]
    if not settings.do_sample:
        return [[(p, None)] for p in ids]
    return [[(p, row_seed(settings.seed, prompt, k)) for k in range(settings.num_return_sequences)]
            for p, prompt in zip(ids, prompts)]


def assert_same_definitions(a: list, trace_a: ScoreTrace, b: list, trace_b: ScoreTrace,
                            rows: list[list[tuple]], **tolerance) -> Comparison:
    """Two DefinitionGenerator outputs (``[[str] * n]`` per prompt) of the same prompts and settings: the scores agree
    (:func:`assert_same_decoding`) and every sequence that met no near tie is the same text."""
    assert len(a) == len(b) == len(rows)
    same = assert_same_decoding(trace_a, trace_b, rows=[r for per_prompt in rows for r in per_prompt], **tolerance)
    for i, per_prompt in enumerate(rows):
        for k, row in enumerate(per_prompt):
            if row not in same.diverged:
                assert a[i][k] == b[i][k], f"prompt {i}, sequence {k}: the same decisions gave different texts"
    return same


# A decision taken with a top-2 margin above this cannot be flipped by the rounding of another computation of the
# same scores (<= 1e-6 relative here, scores <= ~35): used where only one of two runs can be traced (Ray, Serve).
DECISIVE_MARGIN = 1e-3


def assert_equal_where_decisive(got: list, expected: list, trace: ScoreTrace, rows: list[list[tuple]],
                                margin: float = DECISIVE_MARGIN) -> int:
    """``got`` (from a run that cannot be traced, e.g. a Ray actor) equals ``expected`` (traced) for every sequence
    whose traced decisions all had a top-2 margin above ``margin``; returns how many sequences were compared."""
    assert len(got) == len(expected) == len(rows)
    compared = 0
    for i, per_prompt in enumerate(rows):
        for k, row in enumerate(per_prompt):
            assert trace.keys_of(row), f"prompt {i}, sequence {k} was not traced"
            if trace.min_margin(row) > margin:
                assert got[i][k] == expected[i][k], f"prompt {i}, sequence {k}: {got[i][k]!r} != {expected[i][k]!r}"
                compared += 1
    return compared
