"""Batch generation of definitions: a dense checkpoint or the LM-Lexicon MoE, in process or on Ray Data.

:class:`DefinitionGenerator` loads a model once (a dense Hugging Face checkpoint through
:func:`lm_lexicon.seed_models.load_causal_lm`, or the MoE through :func:`lm_lexicon.moe.load`, told apart by
``config.json``'s ``model_type``) and generates ``n`` definitions per prompt:

* prompts are encoded exactly as training saw them (:func:`lm_lexicon.train.encode_prompt`: ``[BOS] prompt``,
  optionally left-truncated to ``max_prompt_tokens``), padded on the LEFT (positions follow the attention mask, so a
  padded row computes what it computes alone), in length-sorted batches, with the KV cache;
* only the new tokens are decoded, cut at the first EOS, special tokens skipped, whitespace stripped;
* the MoE gets ``domain_labels`` per row; rows are batched by domain, so a batch mixes domains only at a boundary;
  under ``domain`` routing without given domains, the MoE's own centroid router picks them (it loads its embedder
  on first use).

Decoding is Hugging Face's greedy loop (``do_sample=False``, ``num_beams=1``) with the logits processors built here:

* **repetition penalty** as in ``transformers``' ``RepetitionPenaltyLogitsProcessor`` (prompt and generated tokens,
  ``score / p`` if positive else ``score * p``), except that left-padding positions are ignored. The stock processor
  penalises the pad token of padded rows only — and pad is EOS for Llama-3-style tokenizers — so a row's output would
  depend on its batch;
* **sampling** (``do_sample=True``): temperature, top-k, top-p (the stock warpers, same order as ``transformers``),
  then the Gumbel-max trick: ``argmax(logits + g)``, ``g ~ Gumbel(0, 1)``, is an exact draw from
  ``softmax(logits)``. The noise of sequence ``k`` of a prompt comes from its own ``torch.Generator`` seeded by
  ``sha256(seed, k, prompt)``, so a sample depends on (seed, prompt, k) only — not on the batch size, the batch
  composition, the order of the rows, the Ray actor that ran it, or the global RNG. ``generate_split`` on Ray and
  in process therefore return the same samples.

The model's own ``generation_config`` sampling fields (Llama-3 ships ``do_sample=True, temperature=0.6``) are
overridden explicitly: what runs is exactly :class:`GenerationSettings`.

Ray Data: ``DefinitionGenerator`` is a callable class for ``map_batches(..., batch_format="numpy",
compute=ActorPoolStrategy(size=...))``. The ``predictions`` column it adds is a 1-D ``object`` array whose items
are Python ``list[str]``: Arrow stores it as ``list<string>`` (measured with Ray 2.60; a 2-D ``str`` array becomes a
fixed-width binary tensor padded to the longest string, and an object array of arrays falls back to pickled
Python objects). Read back through ``iter_batches(batch_format="numpy")`` each item is an ``object`` ndarray.
:func:`generate_split` carries a row index through the map (Ray Data does not promise order) and returns
prediction dicts in input order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from lm_lexicon._util import as_str_list

log = logging.getLogger(__name__)

KINDS = ("auto", "dense", "moe")
MOE_MODEL_TYPE = "lm_lexicon_moe"
NO_DOMAIN = -1  # the ``domain`` column's value for "not given" (Ray Data columns cannot hold None in an int array)


# =================================================================================================== settings
@dataclass
class GenerationSettings:
    """How to decode (shared/DESIGN.md §4: Best-of-N samples with T 0.6, top-k 50, top-p 0.9, rep. penalty 1.05).

    * ``do_sample=False``: greedy; ``num_return_sequences`` copies of the one greedy output are returned (computed
      once). The repetition penalty applies in both modes; set it to 1.0 for plain greedy.
    * ``batch_size``: sequences per forward pass, i.e. ``max(1, batch_size // num_return_sequences)`` prompts per
      batch, so memory stays bounded when N is large.
    * ``top_k=0`` / ``top_p=1.0`` / ``temperature=1.0`` switch that warper off.
    * ``seed``: the sampling seed (see the module docstring: a sample is a function of seed, prompt and index).
    * ``max_prompt_tokens``: left-truncate prompts to this many tokens, BOS included (None: no truncation).
    * ``no_repeat_ngram_size``: n > 0 forbids any n-gram from occurring twice in a row's GENERATED tokens (the
      prompt is not counted, so a definition may reuse the context's words). 0: off (the paper's setting). Small
      under-trained models loop ("a process of a process of ..."); 3 stops that without touching fluent output.
    * ``num_beams > 1`` (greedy mode only): beam search, the highest-scoring beam returned; the processors above
      apply to every beam.
    * ``length_penalty`` (beam search only): a finished beam scores ``sum log p / length ** length_penalty``
      (length in generated tokens). 1.0: mean log-probability per token; 0.0: the sequence's log-probability, which
      prefers shorter definitions; negative values prefer them more.
    """

    do_sample: bool = False
    temperature: float = 0.6
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    max_new_tokens: int = 64
    num_return_sequences: int = 1
    batch_size: int = 16
    seed: int = 0
    max_prompt_tokens: Optional[int] = None
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search: it needs do_sample=False")
        if not -4.0 <= self.length_penalty <= 4.0:
            raise ValueError(f"length_penalty must lie in [-4, 4], got {self.length_penalty}")
        for name in ("max_new_tokens", "num_return_sequences", "batch_size", "num_beams"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}")

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_any(cls, settings: "GenerationSettings | Mapping | None" = None, **overrides) -> "GenerationSettings":
        """Defaults (``None``), a :class:`GenerationSettings` or a dict of its fields; then ``overrides``."""
        if settings is None:
            base = cls()
        elif isinstance(settings, cls):
            base = settings
        elif isinstance(settings, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(f"unknown generation settings {unknown}; known: {sorted(known)}")
            base = cls(**dict(settings))
        else:
            raise TypeError(f"settings must be GenerationSettings or a dict, not {type(settings).__name__}")
        return base.replace(**overrides) if overrides else base

    @classmethod
    def from_eval_config(cls, eval_cfg, *, sample: Optional[bool] = None, seed: int = 0) -> "GenerationSettings":
        """Settings from :class:`lm_lexicon.config.EvalConfig`: sampling with ``best_of_n`` returns when
        ``best_of_n > 1`` (or ``sample=True``), else greedy, or beam search when ``num_beams > 1``."""
        n = int(getattr(eval_cfg, "best_of_n", 1))
        sample = n > 1 if sample is None else sample
        return cls(do_sample=sample, temperature=eval_cfg.temperature, top_k=eval_cfg.top_k, top_p=eval_cfg.top_p,
                   repetition_penalty=eval_cfg.repetition_penalty, max_new_tokens=eval_cfg.max_new_tokens,
                   num_return_sequences=n if sample else 1, batch_size=eval_cfg.batch_size, seed=seed,
                   no_repeat_ngram_size=getattr(eval_cfg, "no_repeat_ngram_size", 0),
                   num_beams=1 if sample else getattr(eval_cfg, "num_beams", 1),
                   length_penalty=getattr(eval_cfg, "length_penalty", 1.0))


def row_seed(seed: int, prompt: str, index: int) -> int:
    """The sampling seed of sequence ``index`` of ``prompt``: stable across processes (not Python's ``hash``)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{int(index)}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def detect_kind(model_path: str | Path) -> str:
    """``"moe"`` when ``config.json`` has ``model_type: lm_lexicon_moe``, else ``"dense"``."""
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_path}: no config.json (not a model directory)")
    model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    return "moe" if model_type == MOE_MODEL_TYPE else "dense"


# =================================================================================================== logits processors
def _processors(settings: GenerationSettings, pad_lengths: Sequence[int], row_seeds: Optional[list[int]],
                prompt_width: Optional[int] = None):
    """The processors of one batch (see the module docstring), as a ``LogitsProcessorList``. ``prompt_width``:
    the padded prompt length (where generated tokens start), needed by ``no_repeat_ngram_size``."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    class PaddingAwareRepetitionPenalty(LogitsProcessor):
        """``transformers``' repetition penalty over each row's tokens, left padding excluded."""

        def __init__(self, penalty: float, pad_lengths: Sequence[int]):
            self.penalty = float(penalty)
            self.pad_lengths = torch.as_tensor(list(pad_lengths), dtype=torch.long)

        def __call__(self, input_ids, scores):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            real = (positions[None, :] >= self.pad_lengths.to(input_ids.device)[:, None]).to(torch.int32)
            seen = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
            seen.scatter_add_(1, input_ids.clamp(0, scores.shape[1] - 1), real)  # [B, V] counts of real tokens
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            return torch.where(seen > 0, penalised, scores)

    class RowGumbelNoise(LogitsProcessor):
        """Adds Gumbel(0, 1) noise from one generator per row: greedy argmax then samples softmax(scores)."""

        def __init__(self, seeds: Sequence[int]):
            self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

        def __call__(self, input_ids, scores):
            # float32 uniforms (measured 2.8x faster than float64 for 256 rows x 30k tokens); u is clamped away
            # from 0 (and torch.rand never returns 1), so every noise value is finite
            u = torch.empty((len(self.generators), scores.shape[1]), dtype=torch.float32)
            for row, g in zip(u, self.generators):
                torch.rand(row.shape, generator=g, out=row)
            gumbel = u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()  # -log(-log(u))
            return scores + gumbel.to(device=scores.device, dtype=scores.dtype)

    class GeneratedNoRepeatNGram(LogitsProcessor):
        """Bans the token that would complete an n-gram already present in the row's generated tokens."""

        def __init__(self, n: int, start: int):
            self.n, self.start = int(n), int(start)

        def __call__(self, input_ids, scores):
            generated = input_ids[:, self.start:].tolist()
            if not generated or len(generated[0]) < self.n:
                return scores
            for row, tokens in enumerate(generated):
                tail = tuple(tokens[len(tokens) - self.n + 1:])
                banned = {tokens[i + self.n - 1] for i in range(len(tokens) - self.n + 1)
                          if tuple(tokens[i:i + self.n - 1]) == tail}
                if banned:
                    scores[row, list(banned)] = -float("inf")
            return scores

    procs = LogitsProcessorList()
    if settings.no_repeat_ngram_size:
        if prompt_width is None:
            raise ValueError("no_repeat_ngram_size needs the prompt width")
        procs.append(GeneratedNoRepeatNGram(settings.no_repeat_ngram_size, prompt_width))
    if settings.repetition_penalty != 1.0:
        procs.append(PaddingAwareRepetitionPenalty(settings.repetition_penalty, pad_lengths))
    if settings.do_sample:
        # same order as transformers' sampling warpers: temperature, top-k, top-p
        if settings.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            procs.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
        if settings.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=1))
        procs.append(RowGumbelNoise(row_seeds))
    return procs


# =================================================================================================== the generator
class DefinitionGenerator:
    """A model loaded once, generating definitions for batches of prompts (and scoring candidates).

    ``kind``: ``"auto"`` (from ``config.json``), ``"dense"`` or ``"moe"``. ``routing`` overrides an MoE's policy.
    ``torch_threads`` sets torch's intra-op threads (process-wide; e.g. the CPUs of a Ray actor).
    ``settings``: the default :class:`GenerationSettings` (or a dict of fields) of :meth:`generate` / ``__call__``.
    ``model_name``: what the ``model`` field of predictions says (default: the path).
    ``prompt_column`` / ``domain_column`` / ``output_column``: the Ray Data columns of ``__call__``.
    ``templates``: the prompt templates of :meth:`record_prompts` (default: the ones saved with the model,
    :meth:`lm_lexicon.data.prompts.PromptTemplates.load`).
    """

    def __init__(self, model_path: str | Path, kind: str = "auto", dtype: str = "float32", device: str = "cpu",
                 torch_threads: Optional[int] = None, settings: "GenerationSettings | Mapping | None" = None, *,
                 routing: Optional[str] = None, model_name: Optional[str] = None, prompt_column: str = "prompt",
                 domain_column: str = "domain", output_column: str = "predictions", templates=None):
        import torch

        from lm_lexicon.data.prompts import PromptTemplates, parse_templates

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.model_path = Path(model_path)
        self.kind = detect_kind(self.model_path) if kind == "auto" else kind
        self.model_name = model_name or str(model_path)
        self.templates = PromptTemplates.load(self.model_path) if templates is None else parse_templates(templates)
        self.settings = GenerationSettings.from_any(settings)
        self.prompt_column, self.domain_column, self.output_column = prompt_column, domain_column, output_column
        self.device = torch.device(device)
        self.router = None
        if self.kind == "moe":
            from lm_lexicon.moe import load as load_moe

            loaded = load_moe(self.model_path, dtype=dtype, device=self.device, routing=routing)
            self.model, self.tokenizer, self.router = loaded.model, loaded.tokenizer, loaded.router
        else:
            if routing is not None:
                raise ValueError("routing applies to an MoE only")
            from lm_lexicon.seed_models import load_causal_lm

            self.model, self.tokenizer = load_causal_lm(self.model_path, dtype=dtype, padding_side="left")
            self.model.to(self.device)
        self.model.eval()
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{model_path}: tokenizer has no pad token")
        self.eos_ids = self._eos_ids()
        self.stats = {"prompts": 0, "sequences": 0, "new_tokens": 0, "seconds": 0.0}

    def __repr__(self) -> str:
        return f"DefinitionGenerator({self.model_name!r}, kind={self.kind!r}, routing={self.routing!r})"

    # ---- properties ----
    @property
    def is_moe(self) -> bool:
        return self.kind == "moe"

    @property
    def routing(self) -> Optional[str]:
        return self.model.config.routing if self.is_moe else None

    @property
    def needs_domains(self) -> bool:
        """True for an MoE under ``domain`` routing: every row needs a domain label."""
        return self.is_moe and self.routing == "domain"

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [self.tokenizer.eos_token_id]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
        if not ids:
            raise ValueError(f"{self.model_path}: no EOS token: generation could never stop")
        return ids

    def record_prompts(self, records: Sequence) -> list[str]:
        """The prompts of ``records`` under this model's templates: what it was trained on."""
        from lm_lexicon.data.prompts import record_prompt

        return [record_prompt(r, self.templates) for r in records]

    # ---- domains ----
    def route(self, prompts: Sequence[str]) -> np.ndarray:
        """Domain of each prompt by the MoE's centroid router (its embedder is loaded on first use)."""
        if self.router is None:
            raise ValueError(f"{self.model_path}: domain routing needs domains, and this MoE has no router/ to pick "
                             "them; pass domains=")
        if self.router.embedder is None:
            from lm_lexicon.moe.hf_config import SECTION
            from lm_lexicon.partition.routing import DomainRouter

            router_dir = self.model_path / (self.model.config.to_dict().get(SECTION, {}).get("router_dir") or "router")
            self.router = DomainRouter.load(router_dir, load_embedder=True)
        return np.asarray(self.router.route_prompts(list(prompts)), dtype=np.int64)

    def _resolve_domains(self, prompts: Sequence[str], domains) -> Optional[np.ndarray]:
        """Domain per prompt (int64) for an MoE under domain routing; None when the model does not use them."""
        if domains is not None:
            domains = np.asarray(domains, dtype=np.int64).reshape(-1)
            if len(domains) != len(prompts):
                raise ValueError(f"{len(domains)} domains for {len(prompts)} prompts")
        if not self.needs_domains:
            return None
        if domains is None or (domains < 0).any():
            missing = np.ones(len(prompts), dtype=bool) if domains is None else domains < 0
            routed = self.route([p for p, m in zip(prompts, missing) if m])
            domains = np.full(len(prompts), NO_DOMAIN, dtype=np.int64) if domains is None else domains.copy()
            domains[missing] = routed
        n = self.model.config.n_experts
        if len(domains) and (domains.min() < 0 or domains.max() >= n):
            raise ValueError(f"domains must lie in [0, {n}), got {sorted(set(domains.tolist()))}")
        return domains

    # ---- encoding ----
    def encode_prompts(self, prompts: Sequence[str], max_prompt_tokens: Optional[int] = None) -> list[list[int]]:
        """Token ids of each prompt exactly as training saw it (:func:`lm_lexicon.train.encode_prompt`)."""
        from lm_lexicon.train import encode_prompt

        return [encode_prompt(self.tokenizer, p, max_prompt_tokens) for p in as_str_list(prompts, "prompt")]

    def _left_pad(self, rows: Sequence[Sequence[int]]):
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
                mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device), [width - len(r) for r in rows]

    def _generation_config(self, settings: GenerationSettings):
        from transformers import GenerationConfig

        # Every field that adds a processor or changes the search is set explicitly, so the model's own
        # generation_config (which fills fields left at None) cannot switch sampling or a penalty on. The sampling
        # warpers of transformers run only with do_sample=True, so temperature/top-k/top-p are left alone here.
        return GenerationConfig(
            do_sample=False, num_beams=int(settings.num_beams), length_penalty=float(settings.length_penalty),
            num_return_sequences=1,
            max_new_tokens=int(settings.max_new_tokens),
            min_new_tokens=None, min_length=0, repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
            output_scores=False, return_dict_in_generate=False)

    def _decode(self, new_tokens) -> list[str]:
        eos = set(self.eos_ids)
        out = []
        for row in new_tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            out.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return out

    # ---- generation ----
    def generate(self, prompts: Sequence[str], domains: Optional[Sequence[int]] = None,
                 settings: "GenerationSettings | Mapping | None" = None, **overrides) -> list[list[str]]:
        """``num_return_sequences`` definitions per prompt, in input order: ``[[str] * n] * len(prompts)``.

        ``domains``: one label per prompt for an MoE under domain routing (a batch may mix them; ``-1`` or None:
        route with the MoE's router); ignored by dense models and other routing policies. ``settings`` (default:
        the constructor's) and keyword ``overrides`` of its fields.
        """
        return self._generate(prompts, domains, settings, **overrides)[0]

    def _generate(self, prompts, domains=None, settings=None,
                  **overrides) -> tuple[list[list[str]], Optional[np.ndarray]]:
        import torch

        settings = GenerationSettings.from_any(settings if settings is not None else self.settings, **overrides)
        prompts = as_str_list(prompts, "prompt")
        domains = self._resolve_domains(prompts, domains)
        if not prompts:
            return [], domains
        t0 = time.perf_counter()
        encoded = self.encode_prompts(prompts, settings.max_prompt_tokens)
        n = settings.num_return_sequences
        copies = n if settings.do_sample else 1  # greedy: the n outputs are one output n times
        per_batch = max(1, settings.batch_size // copies)
        # one domain per batch where possible (a mixed batch reads every expert's FFN at each decoding step: 2x the
        # time of a dense model on CPU), then longest first: OOM shows early
        order = sorted(range(len(prompts)), key=lambda i: (int(domains[i]) if domains is not None else 0,
                                                           -len(encoded[i]), i))
        results: list[Optional[list[str]]] = [None] * len(prompts)
        gen_config = self._generation_config(settings)
        new_tokens = 0
        from lm_lexicon.console import bar

        progress = bar(f"{'sampling from' if settings.do_sample else 'generating with'} {self.model_name}",
                       total=len(prompts), unit="prompts")  # in-process use under the pipeline's terminal only
        with torch.inference_mode(), progress:
            for start in range(0, len(order), per_batch):
                idx = order[start:start + per_batch]
                rows = [encoded[i] for i in idx for _ in range(copies)]
                input_ids, attention_mask, pad_lengths = self._left_pad(rows)
                seeds = [row_seed(settings.seed, prompts[i], k) for i in idx for k in range(copies)] \
                    if settings.do_sample else None
                kwargs: dict[str, Any] = {}
                if domains is not None:
                    kwargs["domain_labels"] = torch.as_tensor(
                        [int(domains[i]) for i in idx for _ in range(copies)], dtype=torch.long, device=self.device)
                beams = int(settings.num_beams)  # beam search expands every row into `beams` rows
                row_pads = [p for p in pad_lengths for _ in range(beams)]
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                    logits_processor=_processors(settings, row_pads, seeds, input_ids.shape[1]), **kwargs)
                generated = out[:, input_ids.shape[1]:]
                texts = self._decode(generated)
                new_tokens += int(sum(min(len(r), _first_eos(r, self.eos_ids) + 1) for r in generated.tolist()))
                for j, i in enumerate(idx):
                    mine = texts[j * copies:(j + 1) * copies]
                    results[i] = mine if settings.do_sample else mine * n
                progress.advance(len(idx))
        self.stats["prompts"] += len(prompts)
        self.stats["sequences"] += len(prompts) * copies
        self.stats["new_tokens"] += new_tokens
        self.stats["seconds"] += time.perf_counter() - t0
        return [r if r is not None else [] for r in results], domains

    # ---- scoring ----
    def sequence_logprobs(self, prompts: Sequence[str], candidates: Sequence[str],
                          domains: Optional[Sequence[int]] = None, *, batch_size: Optional[int] = None,
                          include_eos: bool = True, max_length: Optional[int] = None) -> list[float]:
        """``log p(candidate | prompt)`` for each pair: the sum of the candidate's token log-probabilities.

        Sequences are built as in training (:func:`lm_lexicon.train.encode_example`: ``[BOS] prompt definition
        [EOS]``, the definition tokenised as it follows the prompt after one space); ``include_eos`` adds the
        log-probability of ending there (on by default: a candidate is scored as a complete definition). Used to
        keep the most likely sampled candidates as reward-model negatives. ``domains`` as in :meth:`generate`.
        """
        import torch
        import torch.nn.functional as F

        from lm_lexicon.train import IGNORE_INDEX, collate, encode_example

        prompts = as_str_list(prompts, "prompt")
        candidates = as_str_list(candidates, "candidate")
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts for {len(candidates)} candidates")
        domains = self._resolve_domains(prompts, domains)
        if max_length is None:
            max_length = int(getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or 1 << 20)
        examples = [encode_example(self.tokenizer, p, c, max_length) for p, c in zip(prompts, candidates)]
        if not include_eos:
            for e in examples:
                if e["labels"] and e["labels"][-1] == e["input_ids"][-1] == self.tokenizer.eos_token_id:
                    e["labels"] = e["labels"][:-1] + [IGNORE_INDEX]
        batch_size = batch_size or self.settings.batch_size
        order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
        out = [0.0] * len(examples)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collate([examples[i] for i in idx], self.tokenizer.pad_token_id)  # right padding
                kwargs: dict[str, Any] = {}
                if domains is not None:
                    kwargs["domain_labels"] = torch.as_tensor([int(domains[i]) for i in idx], device=self.device)
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device), use_cache=False,
                                    **kwargs).logits  # [b, t, V]
                targets = batch["labels"][:, 1:].to(self.device)  # [b, t-1]
                is_target = targets != IGNORE_INDEX
                logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [b, t-1, V]
                picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [b, t-1]
                sums = (picked * is_target).sum(dim=1).double()
                for j, i in enumerate(idx):
                    out[i] = float(sums[j])
        return out

    # ---- Ray Data ----
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data ``map_batches`` (``batch_format="numpy"``): adds ``predictions`` (``object`` array of
        ``list[str]``, one list of n strings per row) and ``domain`` (int64: the given or routed domain, -1 when the
        model uses none). All input columns are passed through."""
        if self.prompt_column not in batch:
            raise KeyError(f"batch has no column {self.prompt_column!r}; columns: {sorted(batch)}")
        prompts = [str(p) for p in batch[self.prompt_column]]
        domains = batch.get(self.domain_column)
        outputs, used = self._generate(prompts, domains)
        column = np.empty(len(outputs), dtype=object)
        for i, texts in enumerate(outputs):
            column[i] = [str(t) for t in texts]
        out = dict(batch)
        out[self.output_column] = column
        if used is not None:
            out[self.domain_column] = used.astype(np.int64)
        elif domains is not None:
            out[self.domain_column] = np.asarray(domains, dtype=np.int64)
        else:
            out[self.domain_column] = np.full(len(prompts), NO_DOMAIN, dtype=np.int64)
        return out


def _first_eos(row: Sequence[int], eos_ids: Sequence[int]) -> int:
    eos = set(eos_ids)
    return next((i for i, t in enumerate(row) if t in eos), len(row))


# =================================================================================================== a whole split
def prediction_dict(record, predictions: Sequence[str], domain: Optional[int], model: str) -> dict:
    """The prediction dict of one record: ``{term, context, lang, source, split, reference, references,
    prediction, predictions, domain, model}`` (``references`` and ``split`` are what
    :func:`lm_lexicon.metrics.compute_metrics` reads; ``prediction`` is the first of ``predictions``)."""
    predictions = [str(p) for p in predictions]
    return {
        "term": record.term, "context": record.context, "lang": record.lang, "source": record.source,
        "split": record.split, "pos": record.pos, "sense_id": record.sense_id,
        "reference": record.definition, "references": [record.definition],
        "prediction": predictions[0] if predictions else "", "predictions": predictions,
        "domain": None if domain is None or int(domain) < 0 else int(domain), "model": model,
    }


def generate_split(records: Sequence, model_path: str | Path, settings: "GenerationSettings | Mapping | None" = None,
                   *, domains: Optional[Sequence[int]] = None, use_ray: bool = True, num_actors: int = 1,
                   kind: str = "auto", dtype: str = "float32", device: str = "cpu", routing: Optional[str] = None,
                   torch_threads: Optional[int] = None, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                   model_name: Optional[str] = None, rows_per_call: Optional[int] = None,
                   prompts: Optional[Sequence[str]] = None, templates=None) -> list[dict]:
    """Generate for every record; return prediction dicts (:func:`prediction_dict`) in input order.

    ``use_ray=True``: Ray Data ``map_batches`` over an actor pool of ``num_actors`` :class:`DefinitionGenerator`
    (each loads the model once; ``cpus_per_actor`` / ``gpus_per_actor`` reserved each; ``torch_threads`` per actor).
    Ray must be initialised by the caller (:func:`lm_lexicon.ray_utils.init_ray`), or Ray Data starts a default
    local instance. Rows are sorted by prompt length before the map (similar lengths share a batch) and carry their
    index through it. ``use_ray=False`` runs the same generator in this process. Samples are identical either way
    (per-row seeds). ``domains``: per record, for an MoE under domain routing (None or -1: the MoE's router).
    ``rows_per_call``: rows handed to each ``__call__`` (default 4 generation batches).
    ``prompts``: one prompt per record instead of the training prompt (e.g. few-shot prompts for ICL baselines).
    ``templates``: the prompt templates of the training prompts (default: the ones saved with the model; give them
    for a model that has none, e.g. the untrained seed asked in a run's training format).
    """
    from lm_lexicon.data.prompts import PromptTemplates, parse_templates, record_prompt

    records = list(records)
    settings = GenerationSettings.from_any(settings)
    name = model_name or str(model_path)
    if domains is not None and len(domains) != len(records):
        raise ValueError(f"{len(domains)} domains for {len(records)} records")
    if not records:
        return []
    if prompts is None:
        templates = PromptTemplates.load(model_path) if templates is None else parse_templates(templates)
        prompts = [record_prompt(r, templates) for r in records]
    else:
        prompts = as_str_list(prompts, "prompt")
        if len(prompts) != len(records):
            raise ValueError(f"{len(prompts)} prompts for {len(records)} records")
    given = np.full(len(records), NO_DOMAIN, dtype=np.int64) if domains is None else \
        np.asarray([NO_DOMAIN if d is None else int(d) for d in domains], dtype=np.int64)
    ctor = dict(model_path=str(model_path), kind=kind, dtype=dtype, device=device, torch_threads=torch_threads,
                settings=settings.to_dict(), routing=routing, model_name=name)

    if not use_ray:
        gen = DefinitionGenerator(**ctor)
        outputs, used = gen._generate(prompts, None if domains is None else given)
        doms = used if used is not None else given
        return [prediction_dict(r, o, d, name) for r, o, d in zip(records, outputs, doms)]

    import ray.data
    from ray.data import ActorPoolStrategy

    per_call = rows_per_call or max(1, settings.batch_size // max(1, settings.num_return_sequences
                                                                   if settings.do_sample else 1)) * 4
    order = sorted(range(len(prompts)), key=lambda i: (int(given[i]), -len(prompts[i]), i))  # as _generate's
    items = [{"row": int(i), "prompt": prompts[i], "domain": int(given[i])} for i in order]
    n_blocks = max(1, min(max(1, num_actors) * 8, len(items) // per_call))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        DefinitionGenerator,
        fn_constructor_kwargs=ctor,
        batch_size=per_call,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=max(1, int(num_actors))),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )
    from lm_lexicon.console import bar

    outputs: list[Optional[list[str]]] = [None] * len(records)
    doms = np.full(len(records), NO_DOMAIN, dtype=np.int64)
    with bar(f"generating with {name}", total=len(records), unit="rows") as progress:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for row, preds, dom in zip(batch["row"], batch["predictions"], batch["domain"]):
                row = int(row)
                if outputs[row] is not None:
                    raise RuntimeError(f"Ray Data returned row {row} twice")
                outputs[row] = [str(p) for p in preds]
                doms[row] = int(dom)
            progress.advance(len(batch["row"]))
    missing = [i for i, o in enumerate(outputs) if o is None]
    if missing:
        raise RuntimeError(f"Ray Data returned no prediction for {len(missing)} rows (first: {missing[:5]})")
    return [prediction_dict(r, o, d, name) for r, o, d in zip(records, outputs, doms)]
