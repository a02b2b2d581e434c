"""Best-of-N (shared/DESIGN.md §4): an outcome reward model, reward-model and oracle selection, the BoN curve.

**Reward model.** ``r(x, y)`` = a linear head on a backbone's last hidden states, one of two kinds
(``reward_config.json`` ``backbone``):

* ``"encoder"`` (the cheap one): the attention-masked mean over the pair ``[CLS] prompt [SEP] definition [SEP]`` (the
  tokenizer's own pair encoding). The encoder defaults to the bundled all-MiniLM-L6-v2 (resolved like
  :class:`lm_lexicon.partition.embed.Embedder`: offline, hub ids from the local cache only unless
  ``LM_LEXICON_ALLOW_DOWNLOADS=1``). Directories saved before the key existed are this kind.
* ``"seed"``: the pretrained seed causal LM's backbone (:meth:`RewardModel.from_seed`) reading exactly what the policy
  was trained on (:func:`lm_lexicon.train.encode_example`: ``[BOS] prompt, a space, the definition, EOS``), pooled at
  the LAST real token: in a causal model it is the only position that has read the prompt and the whole definition.
  Right padding; over ``max_length`` the prompt loses its first tokens (after BOS), never the definition.
* ``"policy"``: a fine-tuned causal LM of the pipeline (the dense model; :meth:`RewardModel.from_policy`) on the same
  input, scoring ``beta`` x its mean log-probability of the definition's tokens and EOS plus a last-token head that
  starts at zero: untrained, it ranks a policy's samples by how confident the policy's sibling is in them, per token
  (so length alone neither helps nor hurts); training moves both parts. Its LM head stays, tied weights saved once.
* ``"retrieval"``: no network (:mod:`lm_lexicon.evaluate.best_of_n.retrieval`): a candidate's agreement with the
  definitions of the nearest training prompts and with the other samples, and its length, weighted by a pairwise
  logistic fit. :func:`lm_lexicon.evaluate.best_of_n.io.load_reward_model` reads a directory of any kind.

Training minimises the pairwise (Bradley-Terry) loss

    L = -log sigma(r(x, y_w) - r(x, y_l))

with ``y_w`` the gold definition and ``y_l`` a definition the model sampled for the same prompt.

**Preference data** (:func:`build_preference_pairs`), paper-style: for every training record, sample N
definitions (:class:`lm_lexicon.evaluate.generate.DefinitionGenerator`, T 0.6 / top-k 50 / top-p 0.9 / rep. penalty
1.05), keep the ``top_k = 8`` most likely by the generator's own sequence log-probability
(:meth:`~lm_lexicon.evaluate.generate.DefinitionGenerator.sequence_logprobs`) — the hardest negatives, the ones the
policy would actually produce — and pair each with the gold definition. A candidate equal to the gold definition
(compared lower-cased, periods stripped, whitespace collapsed) is not a negative and is skipped, as are empty and
duplicate candidates. ``ratio`` optionally subsamples negatives per gold (default: all kept ones, i.e. 1 : top_k).

**Selection.** :func:`best_of_n` takes the argmax of the reward scores; :func:`oracle_best_of_n` the candidate with
the best sentence BLEU (Protocol A) against the references — an UPPER BOUND that looks at the answer, never a
result to report as a method. :func:`bon_curve` gives mean BLEU of the selected candidate for N = 1, 2, 4 ...
(using the first N samples of each input: samples are i.i.d., so the prefix is a fair draw of N), and
:func:`plot_bon_curve` draws it.

Persistence: ``reward_config.json`` + ``model.safetensors`` (backbone and head) + the backbone's ``config.json`` (in
``encoder/`` for both kinds; :meth:`RewardModel.load` rebuilds it with ``AutoModel.from_config``) and the tokenizer's
JSON/text files. Never pickle.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from lm_lexicon._util import as_str_list

log = logging.getLogger(__name__)

REWARD_FORMAT = "lm_lexicon.evaluate.best_of_n.reward/1"
CONFIG_FILE = "reward_config.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_DIR = "encoder"
TOKENIZER_DIR = "tokenizer"
DEFAULT_NS = (1, 2, 4, 8, 16, 32)
BACKBONES = ("encoder", "seed", "policy")
POOLING = {"encoder": "mean", "seed": "last", "policy": "last"}


# =================================================================================================== preference data
@dataclass(frozen=True)
class PreferencePair:
    """``chosen`` (gold) is preferred over ``rejected`` (a sample) for ``prompt``; ``index``: the record's."""

    prompt: str
    chosen: str
    rejected: str
    index: int = -1

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_definition(text: str) -> str:
    """What "equal to the gold definition" compares: lower-cased (the bundled vocabulary is uncased, so the MiniLM
    decoder writes lower case), periods not followed by a digit stripped (the evaluation's preprocessing),
    whitespace collapsed."""
    from lm_lexicon.metrics.bleu import strip_periods

    return " ".join(strip_periods(text).lower().split())


def _gold_and_prompt(record: Any, templates=None) -> tuple[str, str]:
    from lm_lexicon.data.records import Record
    from lm_lexicon.train import record_prompt

    if isinstance(record, Mapping):
        if "prompt" in record and "definition" in record:
            return record["prompt"], record["definition"]
        gold = record.get("definition", record.get("reference"))
        record = Record(term=record["term"], context=record.get("context") or "", definition=gold or "",
                        source=record.get("source") or "", lang=record.get("lang") or "en")
    return record_prompt(record, templates), record.definition


def build_preference_pairs(records: Sequence[Any], samples_per_record: Sequence[Sequence[str]],
                           logprobs: Optional[Sequence[Sequence[float]]] = None, top_k: int = 8,
                           ratio: Optional[int] = None, *, seed: int = 0, templates=None) -> list[PreferencePair]:
    """(gold, sampled) preference pairs for reward-model training (policy in the module docstring).

    ``records``: :class:`~lm_lexicon.data.records.Record` (or dicts with term/context/lang and definition or
    reference, or with prompt and definition). ``samples_per_record[i]``: the N definitions sampled for record i.
    ``logprobs[i][j]``: the generator's log-probability of sample j (then the ``top_k`` most likely are kept; without
    it, the first ``top_k`` in sample order). ``ratio``: at most this many negatives per gold, a seeded random subset
    of the kept ones (None: all of them). Records whose samples all equal the gold contribute no pair.
    ``templates``: the prompt templates of the records' prompts (None: the defaults), the sampled model's.
    """
    if len(samples_per_record) != len(records):
        raise ValueError(f"{len(samples_per_record)} sample lists for {len(records)} records")
    if logprobs is not None and len(logprobs) != len(records):
        raise ValueError(f"{len(logprobs)} log-probability lists for {len(records)} records")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if ratio is not None and ratio < 1:
        raise ValueError(f"ratio must be >= 1 or None, got {ratio}")
    rng = np.random.default_rng(seed)
    pairs: list[PreferencePair] = []
    for i, (record, samples) in enumerate(zip(records, samples_per_record)):
        prompt, gold = _gold_and_prompt(record, templates)
        gold_key = normalize_definition(gold)
        if isinstance(samples, str):
            raise TypeError(f"samples_per_record[{i}] is a string; expected a list of strings")
        scores = list(logprobs[i]) if logprobs is not None else None
        if scores is not None and len(scores) != len(samples):
            raise ValueError(f"record {i}: {len(scores)} log-probabilities for {len(samples)} samples")
        best: dict[str, tuple[float, int, str]] = {}  # normalized -> (logprob, first position, text)
        for j, text in enumerate(samples):
            text = str(text).strip()
            key = normalize_definition(text)
            if not key or key == gold_key:
                continue
            lp = scores[j] if scores is not None else 0.0
            if key not in best or lp > best[key][0]:
                best[key] = (lp, best[key][1] if key in best else j, text)
        ranked = sorted(best.values(), key=lambda v: (-v[0], v[1])) if scores is not None else \
            sorted(best.values(), key=lambda v: v[1])
        kept = [text for _, _, text in ranked[:top_k]]
        if ratio is not None and len(kept) > ratio:
            chosen = sorted(rng.choice(len(kept), size=ratio, replace=False).tolist())
            kept = [kept[j] for j in chosen]
        pairs.extend(PreferencePair(prompt, gold, text, i) for text in kept)
    return pairs


class RankedPairs(list):
    """The pairs of :func:`build_ranked_sample_pairs` (a list of :class:`PreferencePair`) and ``stats``: what was
    kept and what dropped, in unordered pairs of distinct samples of one record -- ``sample_pairs`` (all of them),
    ``ties`` (equal BLEU), ``near_ties`` (gap below the margin), ``eligible`` (gap >= margin), ``drawn`` (kept after
    the ``per_record`` cap), ``records`` and ``records_without_two_samples`` (fewer than two distinct samples)."""

    def __init__(self, pairs=(), stats: Optional[dict] = None):
        super().__init__(pairs)
        self.stats = dict(stats or {})


def build_ranked_sample_pairs(records: Sequence[Any], samples_per_record: Sequence[Sequence[str]],
                              references: Sequence[Sequence[str] | str], per_record: int = 4,
                              margin: float = 0.05, *, seed: int = 0, templates=None) -> RankedPairs:
    """(better sample, worse sample) pairs of the same prompt, ranked by Protocol A BLEU against ``references[i]``.

    Gold-vs-sample pairs teach the reward model to tell a dictionary definition from the policy's samples; Best-of-N
    needs it to rank the samples among themselves, which those pairs never show it. Here the reference decides which
    of two samples is better: every pair of distinct (normalised) samples whose BLEU differs by at least ``margin``
    (in [0, 1]) is a candidate, and at most ``per_record`` of them are drawn (seeded, uniformly). Ties and near-ties
    (gap below ``margin``: the reference cannot tell them apart) are dropped and counted in ``.stats``
    (:class:`RankedPairs`), as are records with fewer than two distinct samples. ``templates``: as in
    :func:`build_preference_pairs`.
    """
    if len(samples_per_record) != len(records) or len(references) != len(records):
        raise ValueError(f"{len(records)} records, {len(samples_per_record)} sample lists, "
                         f"{len(references)} reference lists")
    if per_record < 0:
        raise ValueError(f"per_record must be >= 0, got {per_record}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    stats = {"margin": margin, "records": len(records), "records_without_two_samples": 0, "sample_pairs": 0,
             "ties": 0, "near_ties": 0, "eligible": 0, "drawn": 0}
    pairs = RankedPairs(stats=stats)
    if per_record == 0:
        return pairs
    rng = np.random.default_rng(seed)
    for i, (record, samples, refs) in enumerate(zip(records, samples_per_record, references)):
        if isinstance(samples, str):
            raise TypeError(f"samples_per_record[{i}] is a string; expected a list of strings")
        prompt, _ = _gold_and_prompt(record, templates)
        distinct: dict[str, str] = {}
        for text in samples:
            text = str(text).strip()
            key = normalize_definition(text)
            if key and key not in distinct:
                distinct[key] = text
        texts = list(distinct.values())
        if len(texts) < 2:
            pairs.stats["records_without_two_samples"] += 1
            continue
        scores = _bleu_a_scores(texts, refs)
        gaps = [abs(scores[a] - scores[b]) for a in range(len(texts)) for b in range(a + 1, len(texts))]
        pairs.stats["sample_pairs"] += len(gaps)
        pairs.stats["ties"] += sum(g < 1e-12 for g in gaps)
        pairs.stats["near_ties"] += sum(1e-12 <= g < margin for g in gaps)
        candidates = [(scores[a] - scores[b], a, b) for a in range(len(texts)) for b in range(len(texts))
                      if scores[a] - scores[b] >= max(margin, 1e-12)]
        pairs.stats["eligible"] += len(candidates)
        if not candidates:
            continue
        if len(candidates) > per_record:  # a seeded random subset: every sample can appear, not just the extremes
            chosen = sorted(rng.choice(len(candidates), size=per_record, replace=False).tolist())
            candidates = [candidates[k] for k in chosen]
        pairs.extend(PreferencePair(prompt, texts[a], texts[b], i) for _, a, b in candidates)
    pairs.stats["drawn"] = len(pairs)
    return pairs


def word_count(text: str) -> int:
    """Length in Protocol A tokens (whitespace words, periods stripped): what the length comparisons count."""
    from lm_lexicon.metrics.bleu import strip_periods

    return len(strip_periods(text).split())


def length_matched(pairs: Sequence[PreferencePair], max_gap: int = 0) -> list[PreferencePair]:
    """The pairs whose two definitions differ by at most ``max_gap`` words: on them a reward model cannot win by
    preferring the shorter (or longer) one."""
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    return [p for p in pairs if abs(word_count(p.chosen) - word_count(p.rejected)) <= max_gap]


def balance_lengths(pairs: Sequence[PreferencePair], seed: int = 0) -> tuple[list[PreferencePair], int]:
    """A seeded subset in which the preferred definition is the shorter one in exactly as many pairs as it is the
    longer one (pairs of equal length all stay): trained on it, a reward model gains nothing by preferring a length.
    Returns ``(pairs, in their original order; how many were dropped)``."""
    pairs = list(pairs)
    gaps = [word_count(p.rejected) - word_count(p.chosen) for p in pairs]
    shorter = [i for i, g in enumerate(gaps) if g > 0]
    longer = [i for i, g in enumerate(gaps) if g < 0]
    majority, minority = (shorter, longer) if len(shorter) > len(longer) else (longer, shorter)
    excess = len(majority) - len(minority)
    if excess == 0:
        return pairs, 0
    drop = set(np.random.default_rng(seed).choice(majority, size=excess, replace=False).tolist())
    return [p for i, p in enumerate(pairs) if i not in drop], excess


def shorter_wins_accuracy(pairs: Sequence[PreferencePair]) -> float:
    """Accuracy of the rule "prefer the shorter definition" (a tie in length counts as half right): how much of a
    reward model's accuracy length alone could explain."""
    pairs = list(pairs)
    if not pairs:
        return float("nan")
    gaps = np.array([word_count(p.rejected) - word_count(p.chosen) for p in pairs])
    return float(np.mean((gaps > 0) + 0.5 * (gaps == 0)))


# =================================================================================================== the model
def _torch_modules():
    import torch
    import torch.nn as nn

    from lm_lexicon.train import IGNORE_INDEX as IGNORE

    class RewardNet(nn.Module):
        """Backbone + linear head on its last hidden states, ``[B, T] -> [B]``: their masked mean
        (``pooling="mean"``) or the last real token's (``"last"``; rows padded on the right)."""

        def __init__(self, encoder: nn.Module, hidden_size: int, pooling: str = "mean"):
            super().__init__()
            if pooling not in ("mean", "last"):
                raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
            self.encoder = encoder  # the backbone; the name keeps the state-dict keys of the saved encoder kind
            self.head = nn.Linear(hidden_size, 1)
            self.pooling = pooling

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.encoder(**kwargs).last_hidden_state  # [B, T, H]
            if self.pooling == "last":
                last = attention_mask.sum(1).long() - 1  # [B]
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, H]
            return self.head(pooled).squeeze(-1)  # [B]

    class LikelihoodRewardNet(nn.Module):
        """A causal LM scoring a definition by its own judgement, ``[B, T] -> [B]``: ``beta`` x the mean
        log-probability of the definition's tokens and EOS (positions whose label is not ignored), plus a linear head
        on the last real token's hidden state (zero at start, so the untrained model ranks by likelihood alone)."""

        def __init__(self, lm: nn.Module, hidden_size: int, beta: float = 1.0):
            super().__init__()
            self.encoder = lm  # the causal LM, its head included (same attribute name as the other kind)
            self.head = nn.Linear(hidden_size, 1)
            self.beta = float(beta)

        def forward(self, input_ids, attention_mask, labels):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                               use_cache=False)
            logits = out.logits[:, :-1].float()  # [B, T-1, V]: position t predicts token t+1
            targets = labels[:, 1:]  # [B, T-1]
            scored = targets != IGNORE
            token_lp = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            mean_lp = (token_lp * scored).sum(1) / scored.sum(1).clamp(min=1)  # [B]
            last = attention_mask.sum(1).long() - 1  # [B]
            pooled = out.hidden_states[-1][torch.arange(input_ids.shape[0], device=input_ids.device), last]  # [B, H]
            return self.beta * mean_lp + self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)  # [B]

    return torch, RewardNet, LikelihoodRewardNet


def _init_head(net, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=g) * 0.02)
        net.head.bias.zero_()


def _untied(net, missing_keys: Sequence[str], loaded: Mapping[str, Any]) -> list[str]:
    """The missing keys that are not a tied alias of a loaded tensor (those were saved once, under another name)."""
    state = net.state_dict()
    loaded_ptrs = {state[k].data_ptr() for k in loaded if k in state}
    return [k for k in missing_keys if state[k].data_ptr() not in loaded_ptrs]


class RewardModel:
    """The outcome reward model ``r(prompt, definition) -> float`` (module docstring).

    Build with :meth:`from_encoder` (a fresh head on a pretrained encoder), :meth:`from_seed` (on the pretrained
    seed LM) or :meth:`load`. Not an ``nn.Module``
    (its :meth:`train` trains; the network is ``.net``).
    """

    def __init__(self, net, tokenizer, config: dict, device: str = "cpu"):
        import torch

        self.net = net
        self.tokenizer = tokenizer
        self.config = dict(config)
        self.max_length = int(config.get("max_length", 128))
        self.backbone = self.config.setdefault("backbone", "encoder")  # saved before seed backbones: the encoder
        if self.backbone not in BACKBONES:
            raise ValueError(f"reward model backbone must be one of {BACKBONES}, got {self.backbone!r}")
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.history: list[dict] = list(config.get("history") or [])

    def __repr__(self) -> str:
        name = self.config.get({"seed": "seed_model", "policy": "policy_model"}.get(self.backbone, "encoder"))
        return (f"RewardModel(backbone={self.backbone!r}, model={name!r}, "
                f"layers={self.config.get('num_hidden_layers')}, max_length={self.max_length})")

    # ---- construction ----
    @classmethod
    def from_encoder(cls, encoder: str = "bundled-minilm", *, max_length: int = 128,
                     num_hidden_layers: Optional[int] = None, seed: int = 0, device: str = "cpu",
                     trust_remote_code: bool = False) -> "RewardModel":
        """A pretrained encoder (``"bundled-minilm"``, a local directory, or a cached hub id) with a fresh head
        (``N(0, 0.02)``, drawn with ``seed``). ``num_hidden_layers`` keeps only the first k layers (fast tests)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from lm_lexicon.partition.embed import ALLOW_DOWNLOADS_ENV, downloads_allowed, resolve_encoder

        _, RewardNet, _ = _torch_modules()
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4, got {max_length}")
        path = resolve_encoder(encoder)
        local_only = Path(path).exists() or not downloads_allowed()
        kwargs = dict(local_files_only=local_only, trust_remote_code=trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
            if num_hidden_layers is not None:
                if not 1 <= num_hidden_layers <= config.num_hidden_layers:
                    raise ValueError(f"num_hidden_layers must lie in [1, {config.num_hidden_layers}]")
                config.num_hidden_layers = int(num_hidden_layers)
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # dropped layers are "unused weights": expected, not news
            try:
                model = AutoModel.from_pretrained(path, config=config, use_safetensors=True, **kwargs)
            finally:
                hf_logging.set_verbosity(verbosity)
        except OSError as e:
            hint = "" if not local_only or Path(path).exists() else \
                f" (hub ids load from the local cache only; set {ALLOW_DOWNLOADS_ENV}=1 to allow downloads)"
            raise OSError(f"cannot load encoder {encoder!r}{hint}: {e}") from e
        hidden = int(model.config.hidden_size)
        net = RewardNet(model, hidden)
        _init_head(net, seed)
        cfg = {"format": REWARD_FORMAT, "backbone": "encoder", "encoder": encoder, "encoder_path": path,
               "pooling": POOLING["encoder"],
               "input": "tokenizer pair encoding of (prompt, definition)", "max_length": int(max_length),
               "num_hidden_layers": int(model.config.num_hidden_layers), "hidden_size": hidden, "seed": int(seed),
               "loss": "-log sigmoid(r(x, y_w) - r(x, y_l))"}
        return cls(net, tokenizer, cfg, device)

    @classmethod
    def from_seed(cls, seed_model: str = "bundled-smollm2", *, max_length: int = 128, seed: int = 0,
                  device: str = "cpu", trust_remote_code: bool = False, attn_implementation: Optional[str] = None,
                  cache_dir: str | Path | None = None) -> "RewardModel":
        """The pretrained seed causal LM's backbone (``transformers.AutoModel`` of
        :func:`lm_lexicon.seed_models.resolve_seed_model`, float32, its LM head left out) with a fresh head on the
        last token (``N(0, 0.02)``, drawn with ``seed``). ``attn_implementation``: e.g. ``"eager"`` (None:
        transformers' default); it is saved, so a loaded model runs the same kernel."""
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from lm_lexicon.seed_models import resolve_seed_model

        _, RewardNet, _ = _torch_modules()
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        path = resolve_seed_model(seed_model, cache_dir=cache_dir)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the causal LM's head is an "unused weight" here: expected, not news
        try:
            model = AutoModel.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                              local_files_only=True, trust_remote_code=trust_remote_code, **extra)
        finally:
            hf_logging.set_verbosity(verbosity)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer has no eos_token; the policy's input format ends with one")
        if tokenizer.pad_token is None:  # padding is masked and never pooled: any id will do
            tokenizer.pad_token = tokenizer.eos_token
        hidden = int(model.config.hidden_size)
        net = RewardNet(model, hidden, pooling=POOLING["seed"])
        _init_head(net, seed)
        cfg = {"format": REWARD_FORMAT, "backbone": "seed", "seed_model": seed_model, "seed_path": str(path),
               "pooling": POOLING["seed"], "attn_implementation": attn_implementation,
               "input": "[BOS] prompt, a space, the definition, EOS (lm_lexicon.train.encode_example); right padded; "
                        "the prompt truncated from the left", "max_length": int(max_length),
               "num_hidden_layers": int(model.config.num_hidden_layers), "hidden_size": hidden, "seed": int(seed),
               "loss": "-log sigmoid(r(x, y_w) - r(x, y_l))"}
        return cls(net, tokenizer, cfg, device)

    @classmethod
    def from_policy(cls, model_dir: str | Path, *, max_length: int = 128, beta: float = 1.0, device: str = "cpu",
                    attn_implementation: Optional[str] = None) -> "RewardModel":
        """A fine-tuned causal LM of this project (e.g. the pipeline's dense model) as the reward model: ``beta`` x
        its mean log-probability of the definition and EOS, plus a last-token head that starts at zero
        (:class:`LikelihoodRewardNet` in :func:`_torch_modules`). Float32; the directory's safetensors only."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _, _, LikelihoodRewardNet = _torch_modules()
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json (the policy model the reward model starts from)")
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True,
                                                  local_files_only=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{model_dir}: the tokenizer has no eos_token; the policy's input format ends with one")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        hidden = int(lm.config.get_text_config().hidden_size)
        net = LikelihoodRewardNet(lm, hidden, beta)
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.zero_()
        cfg = {"format": REWARD_FORMAT, "backbone": "policy", "policy_model": str(model_dir), "beta": float(beta),
               "pooling": POOLING["policy"], "attn_implementation": attn_implementation,
               "input": "[BOS] prompt, a space, the definition, EOS (lm_lexicon.train.encode_example); right padded; "
                        "the prompt truncated from the left", "max_length": int(max_length),
               "num_hidden_layers": int(lm.config.get_text_config().num_hidden_layers), "hidden_size": hidden,
               "score": "beta * mean log p(definition tokens, EOS | prompt) + head(last hidden state)",
               "loss": "-log sigmoid(r(x, y_w) - r(x, y_l))"}
        return cls(net, tokenizer, cfg, device)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "RewardModel":
        """Read a directory written by :meth:`save` (safetensors + JSON; nothing unpickled, nothing downloaded)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        _, RewardNet, LikelihoodRewardNet = _torch_modules()
        directory = Path(directory)
        cfg_path = directory / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a reward model directory)")
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("format") != REWARD_FORMAT:
            raise ValueError(f"{cfg_path}: format {cfg.get('format')!r}, expected {REWARD_FORMAT!r}")
        backbone = cfg.get("backbone", "encoder")
        if backbone == "retrieval":
            raise ValueError(f"{cfg_path}: a retrieval reward model (no network): read it with "
                             f"lm_lexicon.evaluate.best_of_n.io.load_reward_model")
        if backbone not in BACKBONES:
            raise ValueError(f"{cfg_path}: backbone {backbone!r}, expected one of {BACKBONES}")
        enc_config = AutoConfig.from_pretrained(str(directory / ENCODER_DIR), local_files_only=True)
        extra = {"attn_implementation": cfg["attn_implementation"]} if cfg.get("attn_implementation") else {}
        if backbone == "policy":
            net = LikelihoodRewardNet(AutoModelForCausalLM.from_config(enc_config, **extra),
                                      int(enc_config.get_text_config().hidden_size), cfg.get("beta", 1.0))
        else:
            net = RewardNet(AutoModel.from_config(enc_config, **extra), int(enc_config.hidden_size),
                            pooling=cfg.get("pooling", POOLING[backbone]))
        state = load_file(str(directory / WEIGHTS_FILE))
        result = net.load_state_dict(state, strict=False)
        net.encoder.tie_weights()  # tied tensors are saved once (save): the other name shares the loaded one
        missing = _untied(net, result.missing_keys, state)
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{directory}: weights do not match the reward model: missing "
                               f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR), local_files_only=True)
        return cls(net, tokenizer, cfg, device)

    def save(self, directory: str | Path) -> Path:
        """Write ``reward_config.json``, ``model.safetensors``, ``encoder/config.json`` and ``tokenizer/``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state, seen = {}, set()
        for name, tensor in self.net.state_dict().items():
            if tensor.data_ptr() in seen:  # a tied weight (a causal LM's head and embeddings): saved once
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().to("cpu").clone().contiguous()
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "lm_lexicon": REWARD_FORMAT})
        self.net.encoder.config.save_pretrained(str(directory / ENCODER_DIR))
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        cfg = dict(self.config, history=self.history)
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return directory

    # ---- scoring ----
    def _encode(self, prompts: Sequence[str], definitions: Sequence[str]):
        if self.backbone in ("seed", "policy"):
            return self._encode_as_policy(prompts, definitions)
        enc = self.tokenizer(list(prompts), list(definitions), truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _encode_as_policy(self, prompts: Sequence[str], definitions: Sequence[str]):
        """The policy's training input (module docstring), right padded; over ``max_length`` the prompt's first tokens
        after BOS go, so the definition and its EOS, which the last-token head reads, are never cut. The policy kind
        also gets the training labels (the definition's tokens and EOS; the rest ignored), which it scores."""
        import torch

        from lm_lexicon.train import IGNORE_INDEX, bos_ids, encode_example

        n_bos = len(bos_ids(self.tokenizer))
        rows = []
        for prompt, definition in zip(prompts, definitions):
            example = encode_example(self.tokenizer, prompt, definition, max_length=1 << 30)
            ids, labels = example["input_ids"], example["labels"]
            if len(ids) > self.max_length:
                cut = len(ids) - (self.max_length - n_bos)
                ids, labels = ids[:n_bos] + ids[cut:], labels[:n_bos] + labels[cut:]
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, labels) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :len(ids)] = 1
            label_ids[i, :len(labels)] = torch.tensor(labels, dtype=torch.long)
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if self.backbone == "policy":
            batch["labels"] = label_ids.to(self.device)
        return batch

    def score(self, prompts: Sequence[str], definitions: Sequence[str], batch_size: int = 64,
              pools: Optional[Sequence[Sequence[str]]] = None) -> np.ndarray:
        """``r(prompt_i, definition_i)`` for each pair: float32 ``[n]``, in input order (eval mode, no dropout).
        ``pools`` (the other candidates of each pair's prompt) is for the retrieval model: a network scores each pair
        on its own."""
        import torch

        del pools

        prompts, definitions = as_str_list(prompts, "prompt"), as_str_list(definitions, "definition")
        if len(prompts) != len(definitions):
            raise ValueError(f"{len(prompts)} prompts for {len(definitions)} definitions")
        out = np.empty(len(prompts), dtype=np.float32)
        if not prompts:
            return out
        order = np.argsort([-(len(p) + len(d)) for p, d in zip(prompts, definitions)], kind="stable")
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    enc = self._encode([prompts[i] for i in idx], [definitions[i] for i in idx])
                    out[idx] = self.net(**enc).float().cpu().numpy()
        finally:
            self.net.train(was_training)
        return out

    def score_candidates(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                         batch_size: int = 64) -> list[list[float]]:
        """Scores of every candidate of every prompt: ``[[r(x_i, y_ij)]_j]_i`` (for :func:`best_of_n`)."""
        return score_candidate_lists(self, prompts, candidates, batch_size)

    # ---- training ----
    def train(self, pairs: Sequence[PreferencePair], epochs: int = 1, lr: float = 2e-5, batch_size: int = 16,
              seed: int = 0, *, weight_decay: float = 0.01, warmup_ratio: float = 0.1, schedule: str = "linear",
              grad_clip: float = 1.0, train_encoder: bool = True, precision: str = "fp32",
              valid_pairs: Optional[Sequence[PreferencePair]] = None) -> dict:
        """Minimise ``-log sigma(r(x, y_w) - r(x, y_l))`` over ``pairs``; return metrics.

        AdamW (no decay on biases/norms), linear warm-up over ``warmup_ratio`` of the steps then ``schedule``
        (``linear`` / ``cosine`` / ``constant``, :func:`lm_lexicon.train.lr_factor`), gradient clipping, pairs
        shuffled per epoch with ``(seed, epoch)``; ``train_encoder=False`` trains the head only. Each step encodes
        the chosen and rejected sides in one forward; ``precision`` (``fp32`` / ``bf16`` / ``auto``,
        :func:`lm_lexicon.train.resolve_precision`) runs the training forwards under bf16 autocast (weights and scoring
        stay float32). Metrics: ``epoch_loss`` / ``epoch_accuracy`` (mean over the
        epoch's training steps, dropout on), ``loss_first`` / ``loss_last`` (first and last step),
        ``valid_accuracy`` per epoch when ``valid_pairs`` are given, ``steps``, ``seconds``.
        """
        import torch.nn.functional as F

        from lm_lexicon.train import (LRSchedule, autocast_context, clip_gradients, make_adamw, resolve_precision,
                                      set_seed)

        pairs = list(pairs)
        if not pairs:
            raise ValueError("no preference pairs to train on")
        if epochs < 1 or batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        set_seed(seed)
        precision = resolve_precision(precision, self.device)
        for p in self.net.encoder.parameters():
            p.requires_grad_(train_encoder)
        optimizer = make_adamw(self.net, weight_decay, lr)
        steps_per_epoch = math.ceil(len(pairs) / batch_size)
        total = steps_per_epoch * epochs
        lr_schedule = LRSchedule(lr, total, int(round(warmup_ratio * total)), schedule)
        metrics: dict[str, Any] = {"pairs": len(pairs), "epochs": epochs, "lr": lr, "batch_size": batch_size,
                                   "seed": seed, "precision": precision, "epoch_loss": [], "epoch_accuracy": [],
                                   "loss_first": None, "loss_last": None,
                                   "valid_accuracy": [] if valid_pairs else None}
        step = 0
        t0 = time.perf_counter()
        self.net.train()
        from lm_lexicon.console import bar

        progress = bar("training the reward model", total=total, unit="steps")
        try:
            for epoch in range(epochs):
                order = np.random.default_rng([seed, epoch]).permutation(len(pairs))
                losses, correct = [], 0
                for start in range(0, len(order), batch_size):
                    batch = [pairs[i] for i in order[start:start + batch_size]]
                    b = len(batch)
                    prompts = [p.prompt for p in batch] * 2
                    definitions = [p.chosen for p in batch] + [p.rejected for p in batch]
                    with autocast_context(precision, self.device):
                        rewards = self.net(**self._encode(prompts, definitions)).float()  # [2b]
                    margin = rewards[:b] - rewards[b:]  # r(x, y_w) - r(x, y_l)
                    loss = F.softplus(-margin).mean()  # = -log sigmoid(margin), numerically stable
                    lr_schedule.apply(optimizer, step)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip:
                        clip_gradients([p for p in self.net.parameters() if p.requires_grad], grad_clip)
                    optimizer.step()
                    step += 1
                    value = float(loss.detach())
                    if metrics["loss_first"] is None:
                        metrics["loss_first"] = value
                    metrics["loss_last"] = value
                    losses.append(value * b)
                    correct += int((margin.detach() > 0).sum())
                    progress.update(completed=step, note=f"loss {value:.3f}")
                metrics["epoch_loss"].append(sum(losses) / len(pairs))
                metrics["epoch_accuracy"].append(correct / len(pairs))
                if valid_pairs:
                    metrics["valid_accuracy"].append(pairwise_accuracy(self, valid_pairs))
                log.info("reward model epoch %d: loss %.4f, train accuracy %.3f", epoch, metrics["epoch_loss"][-1],
                         metrics["epoch_accuracy"][-1])
        finally:
            progress.close()
            self.net.eval()
            for p in self.net.encoder.parameters():
                p.requires_grad_(True)
        metrics["steps"] = step
        metrics["seconds"] = time.perf_counter() - t0
        metrics["pairs_per_s"] = len(pairs) * epochs / metrics["seconds"] if metrics["seconds"] else 0.0
        self.history.append({k: v for k, v in metrics.items()})
        return metrics


def score_candidate_lists(model, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                          batch_size: int = 64) -> list[list[float]]:
    """``model.score`` on every candidate of every prompt in one flat call, regrouped per prompt; each candidate's
    pool is its own list (which a model that compares candidates, the retrieval one, reads)."""
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts for {len(candidates)} candidate lists")
    flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
    flat_c = [c for cs in candidates for c in cs]
    pools = [list(cs) for cs in candidates for _ in cs]
    flat = np.asarray(model.score(flat_p, flat_c, batch_size, pools=pools)).tolist()
    out, k = [], 0
    for cs in candidates:
        out.append(flat[k:k + len(cs)])
        k += len(cs)
    return out


def pair_pools(pairs: Sequence[PreferencePair], pools: Sequence[Sequence[str]]) -> list[list[str]]:
    """Per pair, the samples of its record (``pools[pair.index]``): the candidates its two definitions are compared
    with. By record, not by prompt: the senses of a term without context share a prompt, not their samples."""
    out = []
    for p in pairs:
        if not 0 <= p.index < len(pools):
            raise ValueError(f"pair of record {p.index}: no samples for it among {len(pools)} records")
        out.append(list(pools[p.index]))
    return out


def pairwise_accuracy(model: RewardModel, pairs: Sequence[PreferencePair], batch_size: int = 64,
                      pools: Optional[Sequence[Sequence[str]]] = None) -> float:
    """Fraction of pairs with ``r(x, y_w) > r(x, y_l)`` (strictly; a tie counts as wrong). ``pools[i]``: record i's
    samples, the candidates a definition is compared with (the retrieval model's ``sample_agreement``)."""
    pairs = list(pairs)
    if not pairs:
        return float("nan")
    prompts = [p.prompt for p in pairs]
    extra = {} if pools is None else {"pools": pair_pools(pairs, pools)}
    chosen = model.score(prompts, [p.chosen for p in pairs], batch_size, **extra)
    rejected = model.score(prompts, [p.rejected for p in pairs], batch_size, **extra)
    return float(np.mean(chosen > rejected))


# =================================================================================================== selection
def best_of_n(candidates: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> list[str]:
    """The highest-scoring candidate of each input (the first one on a tie)."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidate lists for {len(scores)} score lists")
    out = []
    for i, (cs, ss) in enumerate(zip(candidates, scores)):
        if len(cs) != len(ss):
            raise ValueError(f"input {i}: {len(cs)} candidates for {len(ss)} scores")
        if not len(cs):
            raise ValueError(f"input {i} has no candidates")
        out.append(cs[int(np.argmax(np.asarray(ss, dtype=np.float64)))])
    return out


MetricFn = Callable[[str, Sequence[str]], float]


def _references(refs) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


def _bleu_a_scores(candidates: Sequence[str], references) -> list[float]:
    from lm_lexicon.metrics.bleu import ReferenceSet, sentence_bleu_a

    rs = ReferenceSet(_references(references))
    return [sentence_bleu_a(c, rs) for c in candidates]


def _metric_scores(candidates: Sequence[str], references, metric: Optional[MetricFn]) -> list[float]:
    if metric is None:
        return _bleu_a_scores(candidates, references)
    refs = _references(references)
    return [float(metric(c, refs)) for c in candidates]


def oracle_best_of_n(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[str] | str],
                     metric: Optional[MetricFn] = None) -> list[str]:
    """UPPER BOUND, not a method: the candidate that scores best against the references.

    ``metric(hypothesis, references) -> float`` (default: Protocol A sentence BLEU,
    :func:`lm_lexicon.metrics.sentence_bleu_a`; for the protocol, pass all definitions of the headword as the
    references). The first candidate wins a tie.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidate lists for {len(references)} reference lists")
    return best_of_n(candidates, [_metric_scores(cs, refs, metric) for cs, refs in zip(candidates, references)])


Scorer = Any  # "oracle" | "first" | per-candidate scores [[float]] | callable(candidates) -> [[float]]


def bon_curve(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[str] | str],
              scorer: Scorer = "oracle", ns: Sequence[int] = DEFAULT_NS,
              metric: Optional[MetricFn] = None) -> dict[int, float]:
    """Mean metric x 100 (default Protocol A sentence BLEU) of the candidate picked among the first N, per N.

    ``scorer``: ``"oracle"`` (best metric against the references: an upper bound), ``"first"`` (no selection: the
    N=1 baseline at every N), per-candidate scores ``[[float]]`` aligned with ``candidates`` (e.g.
    :meth:`RewardModel.score_candidates`), ``{n: scores of the first n candidates}`` (a model that compares the
    candidates with one another scores each prefix anew), or a callable ``candidates -> [[float]]`` called once.
    N larger than the smallest candidate list is left out. Every scorer agrees at N=1 (the first sample).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidate lists for {len(references)} reference lists")
    if not candidates:
        return {}
    metric_scores = [_metric_scores(cs, refs, metric) for cs, refs in zip(candidates, references)]
    if isinstance(scorer, str):
        if scorer == "oracle":
            sel = metric_scores
        elif scorer == "first":
            sel = [[1.0] + [0.0] * (len(cs) - 1) for cs in candidates]
        else:
            raise ValueError(f"scorer must be 'oracle', 'first', scores or a callable, got {scorer!r}")
    elif callable(scorer):
        sel = scorer(candidates)
    else:
        sel = scorer
    by_n = sel if isinstance(sel, Mapping) else None  # {n: scores of the first n}: a model that compares candidates
    if by_n is None and (len(sel) != len(candidates) or any(len(s) != len(c) for s, c in zip(sel, candidates))):
        raise ValueError("scores must have one value per candidate")
    available = min(len(cs) for cs in candidates)
    curve: dict[int, float] = {}
    for n in sorted(set(int(n) for n in ns)):
        if n < 1 or n > available:
            continue
        rows = sel if by_n is None else by_n[n]
        picked = [ms[int(np.argmax(np.asarray(ss[:n], dtype=np.float64)))] for ms, ss in zip(metric_scores, rows)]
        curve[n] = 100.0 * float(np.mean(picked))
    return curve


def plot_bon_curve(curve: Mapping, path: str | Path, *, title: str = "Best-of-N",
                   ylabel: str = "sentence BLEU (Protocol A)") -> Path:
    """Write a PNG of one curve ``{n: value}`` or several ``{label: {n: value}}`` (log2 x axis). Label an oracle
    curve as an upper bound (e.g. ``"oracle (upper bound)"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if curve and all(isinstance(v, (int, float)) for v in curve.values()):
        curves = {"best-of-N": curve}
    else:
        curves = dict(curve)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ticks: set[int] = set()
    for label, c in curves.items():
        xs = sorted(int(n) for n in c)
        ticks.update(xs)
        style = "--" if "oracle" in str(label).lower() else "-"
        ax.plot(xs, [c[n] if n in c else c[str(n)] for n in xs], style, marker="o", label=str(label))
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(sorted(ticks))
        ax.set_xticklabels([str(t) for t in sorted(ticks)])
    ax.set_xlabel("N (samples per input)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


