"""Supervised fine-tuning of a causal LM on definition modeling: prompt -> definition + EOS, loss on the definition.

A plain, readable PyTorch loop rather than the Hugging Face ``Trainer``: it has to run unchanged inside a Ray Train
worker (model wrapped by ``ray.train.torch.prepare_model``, or driven by a DeepSpeed ZeRO engine when the recipe
sets ``train.deepspeed`` on GPUs; checkpoints handed to ``ray.train.report``), and the pieces that matter here —
masking, length bucketing, resumable state, early stopping — are short enough to read in one place. Nothing in this
module imports Ray, nor DeepSpeed (:mod:`lm_lexicon.distributed` does, only when a DeepSpeed config is passed).

Sequence layout (the same for training and generation, see :func:`encode_prompt`)::

    [BOS] prompt-tokens  definition-tokens [EOS]   [PAD]...
    -100  -100 ...       = input ids ...    = eos  -100 ...      <- labels

* BOS is whatever the tokenizer itself puts before a text (Llama: ``<|begin_of_text|>``, the MiniLM decoder:
  ``[CLS]``, Qwen: nothing), so a plain batched ``tokenizer(prompts)`` + ``generate()`` sees what training saw.
* The definition is tokenised as it follows the prompt after one space (``prompt + " " + definition``), so byte-level
  BPE vocabularies see the leading-space word forms they will have to generate.
* Labels hold the input ids (Hugging Face convention); the shift happens in the loss: position ``i`` predicts
  token ``i + 1``. Logits are computed only at positions whose next token is a target (``logits_to_keep`` mask),
  which skips the LM head on prompt and padding positions — for the MiniLM decoder the 30k-word head is about half
  of the model's FLOPs per token (measured: a step with half the positions as prompt is 1.38x faster).

Truncation (``max_length`` counts every token, BOS and EOS included): the definition keeps up to
``max(budget - prompt, budget // 4)`` tokens, where budget = ``max_length`` - BOS; the prompt gets the rest and is
truncated from the LEFT, because its tail (``... What is the definition of "term"?``) names the term and asks the
question, while the start of a long context is the least needed part. A definition cut short loses its EOS: the
model must not learn to stop mid-sentence.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lm_lexicon.data.prompts import format_prompt
from lm_lexicon.data.records import Record

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHECKPOINT_FORMAT = "lm_lexicon.sft/1"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"

ReportFn = Callable[[dict, Optional[Path]], None]


# =================================================================================================== tokenisation
def _bos_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer itself puts BEFORE a text (Llama: BOS; MiniLM decoder: [CLS]; Qwen: none).

    Taken from the tokenizer's own behaviour rather than from ``bos_token_id`` (GPT-2 has a BOS it never adds), so
    that training prefixes exactly what ``tokenizer(prompt)`` gives a batched ``generate()``. Suffixes a tokenizer
    appends (BERT's ``[SEP]``) are deliberately not copied: after a prompt comes the definition, not an end mark.
    """
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: the model could never learn where a definition ends")
    return int(tokenizer.eos_token_id)


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _split_prompt_definition(tokenizer, prompts: list[str], definitions: list[str]) -> tuple[list, list]:
    """Token ids of each prompt and of its definition as it follows the prompt after one space.

    The pair is tokenised jointly and split where the prompt's own tokens end; in the rare case a tokenizer merges
    across the boundary (so the joint tokens do not start with the prompt's), the definition is tokenised alone.
    """
    prompt_ids = _ids(tokenizer, prompts)
    joint_ids = _ids(tokenizer, [f"{p} {d}" for p, d in zip(prompts, definitions)])
    definition_ids = []
    for p, j, d in zip(prompt_ids, joint_ids, definitions):
        if j[:len(p)] == p:
            definition_ids.append(j[len(p):])
        else:
            definition_ids.append(_ids(tokenizer, [d])[0])
    return prompt_ids, definition_ids


def _truncate(prompt_ids: list[int], target_ids: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Fit prompt + target into ``budget`` tokens (policy in the module docstring)."""
    if len(prompt_ids) + len(target_ids) <= budget:
        return prompt_ids, target_ids
    target_keep = min(len(target_ids), max(budget - len(prompt_ids), budget // 4))
    prompt_keep = budget - target_keep
    return (prompt_ids[len(prompt_ids) - prompt_keep:] if prompt_keep > 0 else []), target_ids[:target_keep]


def _assemble(bos: list[int], prompt_ids: list[int], definition_ids: list[int], eos: int, max_length: int) -> dict:
    budget = max_length - len(bos)
    if budget < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt and a definition")
    prompt_ids, target = _truncate(prompt_ids, list(definition_ids) + [eos], budget)
    input_ids = bos + prompt_ids + target
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + target
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_example(tokenizer, prompt: str, definition: str, max_length: int) -> dict:
    """``{input_ids, attention_mask, labels}`` (unpadded lists) for one prompt/definition pair.

    Labels are -100 on BOS and prompt tokens and equal the input ids on definition tokens and the final EOS, which
    is part of the loss so the model learns to stop. See the module docstring for the truncation policy.
    """
    prompt_ids, definition_ids = _split_prompt_definition(tokenizer, [prompt], [definition])
    return _assemble(_bos_ids(tokenizer), prompt_ids[0], definition_ids[0], _eos_id(tokenizer), max_length)


def encode_prompt(tokenizer, prompt: str, max_prompt_tokens: Optional[int] = None) -> list[int]:
    """The token ids a model is given at generation time: ``[BOS] + prompt``, left-truncated like in training.

    ``max_prompt_tokens`` counts BOS. Use this (or ``tokenizer(prompt)``, identical for the supported tokenizers
    when no truncation is needed) so that generation sees what training saw.
    """
    bos = _bos_ids(tokenizer)
    ids = _ids(tokenizer, [prompt])[0]
    if max_prompt_tokens is not None:
        keep = max(0, max_prompt_tokens - len(bos))
        ids = ids[len(ids) - keep:] if keep else []
    return bos + ids


def record_prompt(record: Record, templates=None) -> str:
    """The prompt of a record (shared/DESIGN.md §2) under ``templates`` (None: the defaults: the paper's template, or
    the multilingual one)."""
    return format_prompt(record.term, record.context, record.lang, templates=templates)


class SFTDataset(torch.utils.data.Dataset):
    """Records tokenised once, up front (fast batched tokenisation), as unpadded examples.

    ``lengths`` (tokens per example) drives the length-bucketed batching.
    """

    def __init__(self, tokenizer, records: Sequence[Record], max_length: int,
                 domains: Optional[Sequence[int]] = None, templates=None):
        self.max_length = max_length
        records = list(records)
        if domains is not None and len(domains) != len(records):
            raise ValueError(f"{len(domains)} domain labels for {len(records)} records")
        prompts = [record_prompt(r, templates) for r in records]
        definitions = [r.definition for r in records]
        bos, eos = _bos_ids(tokenizer), _eos_id(tokenizer)
        self.examples: list[dict] = []
        if records:
            prompt_ids, definition_ids = _split_prompt_definition(tokenizer, prompts, definitions)
            self.examples = [_assemble(bos, p, d, eos, max_length) for p, d in zip(prompt_ids, definition_ids)]
            if domains is not None:  # the MoE's domain routing: the expert each sequence goes to
                for example, domain in zip(self.examples, domains):
                    example["domain"] = int(domain)
        self.lengths = [len(e["input_ids"]) for e in self.examples]
        self.n_target_tokens = sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch: padding has attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[row, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[row, :k] = 1
        labels[row, :k] = torch.tensor(e["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "domain" in examples[0]:
        batch["domain_labels"] = torch.tensor([e["domain"] for e in examples], dtype=torch.long)
        # sequence-level routing decides from the prompt, as it will at generation time
        batch["routing_mask"] = (attention_mask == 1) & (labels == IGNORE_INDEX)
    return batch


class LengthBucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar-length examples, so little compute is spent on padding; random yet reproducible.

    Per epoch: shuffle all indices with a generator seeded by ``(seed, epoch)``, cut them into pools of
    ``batch_size * pool_batches``, sort each pool by length, cut pools into batches, shuffle the batch order.
    The order is a pure function of ``(seed, epoch)`` — no hidden state — so a resumed run can regenerate an epoch
    and skip the batches it already did. With ``num_replicas > 1`` (data-parallel ranks) each rank takes every
    ``num_replicas``-th batch, and all ranks get the same number of batches (DDP all-reduces must pair up).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 pool_batches: int = 50, drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError("batch_size and pool_batches must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.lengths = list(lengths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.pool_batches, self.drop_last = pool_batches, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n).tolist()
            pool = self.batch_size * self.pool_batches
            pools = [sorted(order[i:i + pool], key=lambda j: self.lengths[j]) for i in range(0, n, pool)]
        else:
            rng = None
            pools = [sorted(range(n), key=lambda j: self.lengths[j])]
        batches = [p[i:i + self.batch_size] for p in pools for i in range(0, len(p), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
        if self.num_replicas > 1:
            per_rank = len(batches) // self.num_replicas
            batches = batches[self.rank::self.num_replicas][:per_rank]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


# =================================================================================================== precision, seeds
def cpu_supports_bf16() -> bool:
    """True when this CPU has NATIVE bf16 arithmetic (x86 AVX512-BF16 / AMX-BF16, Arm BF16), where autocast pays off.

    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: it is also true on plain AVX-512, where oneDNN emulates
    bf16 and autocast is no faster. Measured here (AMD EPYC with avx512_bf16, 2 cores): one training step of the
    MiniLM decoder at batch 16 x 64 tokens is ~2.1x faster under bf16 autocast than in fp32.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: stay on the safe side
        return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where the device computes bf16 natively, else ``"fp32"``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# =================================================================================================== loss
def _unwrap(model):
    """The Hugging Face model inside a DDP/FSDP-style wrapper (``.module``), for saving and introspection."""
    return getattr(model, "module", model)


@dataclass(frozen=True)
class _ForwardSpec:
    logits_to_keep: bool
    use_cache: bool


def _forward_spec(model) -> _ForwardSpec:
    params = inspect.signature(_unwrap(model).forward).parameters
    return _ForwardSpec(logits_to_keep="logits_to_keep" in params, use_cache="use_cache" in params)


def definition_nll(model, batch: dict[str, torch.Tensor], spec: Optional[_ForwardSpec] = None) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target (label != -100) tokens, and their count.

    Summed, not averaged, so gradient accumulation and evaluation can divide by the exact token count of the whole
    step / set. Logits are requested only where the next token is a target; the loss is computed in float32 even
    under bf16 autocast.
    """
    spec = spec or _forward_spec(model)
    labels = batch["labels"]
    next_labels = labels[:, 1:]
    is_target = next_labels != IGNORE_INDEX
    n_targets = int(is_target.sum())
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for routing_input in ("domain_labels", "routing_mask"):  # MoE only (see lm_lexicon.moe)
        if routing_input in batch:
            kwargs[routing_input] = batch[routing_input]
    if spec.use_cache:
        kwargs["use_cache"] = False
    if spec.logits_to_keep:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = is_target
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    logits = out.logits
    targets = next_labels[is_target]
    if logits.dim() == 3:  # the model ignored the mask or does not support it: select here
        logits = logits[:, :-1][is_target]
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    aux = getattr(out, "aux_loss", None)
    if aux is not None and model.training:  # MoE token routing: load balancing, weighted per target token
        nll = nll + _unwrap(model).config.aux_loss_coef * aux.float() * n_targets
    return nll, n_targets


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _sum_over_ranks(value: float) -> float:
    """``value`` summed over the data-parallel ranks (float64 all-reduce: exact for token counts)."""
    total = torch.tensor([float(value)], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        total = total.cuda()
    torch.distributed.all_reduce(total)
    return float(total.item()) if isinstance(value, float) else int(round(total.item()))


@torch.no_grad()
def evaluate_loss(model, tokenizer, records: Sequence[Record] | SFTDataset, *, max_length: int = 128,
                  batch_size: int = 16, precision: str = "fp32", domains: Optional[Sequence[int]] = None,
                  lockstep: bool = False, templates=None) -> float:
    """Mean token NLL over definition (+EOS) tokens of ``records`` (nats per token; exp() of it is perplexity).

    Under torch.distributed each rank scores every ``world_size``-th batch and the sums are all-reduced, so every
    rank gets the same number (early-stopping decisions must agree across ranks). ``lockstep``: every rank runs the
    same number of forward passes (a rank short of a batch re-scores one and discards it), needed when a forward
    is itself a collective (DeepSpeed ZeRO-3 gathers each layer's parameters from all ranks). ``templates``: the
    prompt templates of records (None: the defaults).
    """
    dataset = records if isinstance(records, SFTDataset) else \
        SFTDataset(tokenizer, records, max_length, domains, templates)
    if len(dataset) == 0:
        return float("nan")
    # score with the bare model: a DDP wrapper's forward broadcasts buffers (a collective), and ranks may run
    # different numbers of evaluation batches
    model = _unwrap(model)
    device = next(_unwrap(model).parameters()).device
    precision = resolve_precision(precision, device)
    spec = _forward_spec(model)
    was_training = model.training
    model.eval()
    sampler = LengthBucketBatchSampler(dataset.lengths, batch_size, shuffle=False)
    batches = sampler.batches(0)
    counted = None
    if _distributed():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        mine = batches[rank::world]
        if lockstep:
            rounds = math.ceil(len(batches) / world)
            counted = [True] * len(mine) + [False] * (rounds - len(mine))
            mine = mine + [batches[0]] * (rounds - len(mine))
        batches = mine
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for b, indices in enumerate(batches):
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices], tokenizer.pad_token_id).items()}
            with autocast_context(precision, device):
                nll, n = definition_nll(model, batch, spec)
            if counted is not None and not counted[b]:
                continue  # a lockstep filler: the forward ran for the collective, the score is not this rank's
            totals[0] += nll.double()
            totals[1] += n
    finally:
        model.train(was_training)
    if _distributed():
        torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


# =================================================================================================== optimisation
def train_only_ffn(model) -> int:
    """Freeze every tensor but the FFN projections that the merge turns into experts; return the trainable count.

    The other tensors (attention, norms, embeddings, LM head) then stay the seed's in every expert, so the merge's
    average of them is the seed itself, exactly.
    """
    from lm_lexicon.moe.ffn_spec import spec_for_config

    base = _unwrap(model)
    spec = spec_for_config(base.config)
    for name, p in base.named_parameters():
        p.requires_grad_(spec.parse_dense_key(name) is not None)
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"train.trainable=ffn found no FFN tensor in {type(base).__name__} ({spec.name} spec)")
    return trainable


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (incl. embeddings); never decay biases and norm gains (1-D tensors).

    Decaying a LayerNorm/RMSNorm gain pulls it towards 0, i.e. shrinks the whole normalised activation — not the
    regularisation weight decay is meant to be.
    """
    decay, no_decay = [], []
    for _, p in _unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW over :func:`param_groups`, fused into one kernel where torch has it for the parameters' device (CPU and
    CUDA): the per-tensor loop of the default implementation took 23% of a SmolLM2-135M step on 2 CPU cores, the fused
    one 7%."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR for update number ``step`` (0-based): linear warm-up, then cosine/linear/constant.

    Warm-up starts at 1/warmup (not 0: an update at LR 0 is wasted work) and reaches the peak at the last warm-up
    step; the decay reaches 0 one step after the horizon, so the last update is never at LR 0.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


# =================================================================================================== checkpoints
def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model, tokenizer, optimizer, state: dict) -> Path:
    """Write a resumable checkpoint: model + tokenizer (safetensors via ``save_pretrained``, so the directory is
    also a loadable model), optimizer state and RNG states (``torch.save`` of plain tensors/numbers, read back with
    ``weights_only=True``), and the loop state as JSON. Written to a temporary sibling then renamed, so a crash never
    leaves a half checkpoint that looks complete.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _unwrap(model).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    torch.save({"optimizer": optimizer.state_dict()}, tmp / OPTIMIZER_FILE)
    torch.save(_rng_state(), tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(dict(state, format=CHECKPOINT_FORMAT), indent=2) + "\n", encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return directory


def _save_deepspeed_checkpoint(directory: Path, runner, tokenizer, state: dict, is_main: bool) -> Path:
    """:func:`save_checkpoint` under DeepSpeed. EVERY rank calls it, each with its own local directory: gathering
    ZeRO-3 weights and writing DeepSpeed's state are collectives. Rank 0 writes the gathered weights as safetensors
    (``save_pretrained(state_dict=...)``, so the directory is a loadable model like on CPU), the tokenizer, the
    RNG state and the loop state; every rank writes its DeepSpeed shard under ``deepspeed/``."""
    from lm_lexicon.distributed import DEEPSPEED_STATE_DIR

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = runner.full_state_dict()  # collective under ZeRO-3; None on ranks other than 0
    if is_main:
        runner.module.save_pretrained(str(tmp), state_dict=weights)
        tokenizer.save_pretrained(str(tmp))
        torch.save(_rng_state(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, format=CHECKPOINT_FORMAT), indent=2) + "\n",
                                      encoding="utf-8")
    del weights
    runner.save_state(tmp / DEEPSPEED_STATE_DIR)
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return directory


def save_model(model, directory: Path, dtype: str = "float32") -> None:
    """``save_pretrained`` (safetensors) with the floating-point weights cast to ``dtype``; the model object keeps
    its own dtype (training goes on in float32)."""
    base = _unwrap(model)
    if dtype == "float32":
        base.save_pretrained(str(directory))
        return
    target = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    state = {k: v.detach().to(target) if v.is_floating_point() else v for k, v in base.state_dict().items()}
    base.save_pretrained(str(directory), state_dict=state)
    config_path = Path(directory) / "config.json"  # it states the in-memory model's dtype: say what the file holds
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_trainer_state(directory: str | Path) -> dict:
    """The JSON loop state of a checkpoint (step, data position, early-stopping state, history)."""
    state = json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: not an lm_lexicon SFT checkpoint (format {state.get('format')!r})")
    return state


def load_model_weights(model, directory: str | Path) -> None:
    """Load the safetensors weights of a ``save_pretrained`` directory (sharded or not) into ``model`` in place."""
    from safetensors.torch import load_file

    target = _unwrap(model)
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no .safetensors weights")
    expected = set(target.state_dict().keys())
    loaded: set[str] = set()
    for f in files:
        shard = load_file(str(f))
        unknown = set(shard) - expected
        if unknown:
            raise RuntimeError(f"{f}: weights the model does not have: {sorted(unknown)[:5]}")
        target.load_state_dict(shard, strict=False)
        loaded |= set(shard)
    # tied parameters (e.g. an LM head tied to the embeddings) are saved once; they share storage with a loaded key
    tensors = target.state_dict(keep_vars=True)
    loaded_storage = {tensors[k].data_ptr() for k in loaded}
    missing = sorted(k for k in expected - loaded if tensors[k].data_ptr() not in loaded_storage)
    if missing:
        raise RuntimeError(f"{directory}: checkpoint lacks weights {missing[:5]}")


def _prune_checkpoints(root: Path, keep: int, protect: set[str]) -> None:
    ckpts = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in ckpts[:-keep] if keep > 0 else ckpts:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


# =================================================================================================== training loop
def train(model, tokenizer, train_records: Sequence[Record], valid_records: Sequence[Record] | None, train_cfg,
          out_dir: str | Path, *, resume_from: str | Path | None = None, report_fn: Optional[ReportFn] = None,
          max_steps: Optional[int] = None, seed: Optional[int] = None, rank: int = 0, world_size: int = 1,
          keep_checkpoints: int = 2, restore_best: bool = True, progress: bool = True,
          train_domains: Optional[Sequence[int]] = None, valid_domains: Optional[Sequence[int]] = None,
          deepspeed_config: Optional[dict] = None,
          step_fn: Optional[Callable[[int, int, float], None]] = None, prompt_templates=None) -> dict:
    """Fine-tune ``model`` in place on prompt -> definition; return metrics.

    * Schedule horizon: ``train_cfg.max_steps`` if set, else ``ceil(epochs * batches_per_epoch / grad_accum)``.
      The ``max_steps`` ARGUMENT only says where to stop this call (a global step <= horizon) and never changes
      the schedule, so training to step k, then resuming to step n, equals one run to step n.
    * Every ``train_cfg.eval_every`` steps and at the end: validation loss, early-stopping bookkeeping
      (``early_stopping_patience`` evals without improvement stop the run), a checkpoint under
      ``out_dir/checkpoints/step-NNNNNNN`` (the newest ``keep_checkpoints`` and the best are kept) and
      ``report_fn(metrics, checkpoint_dir)``. Only rank 0 writes; other ranks get ``checkpoint_dir=None``.
    * At the end, ``out_dir/model`` holds the final model (the best by validation loss when ``restore_best`` and
      validation ran; the model object is also reset to those weights).
    * ``rank``/``world_size``: data-parallel shard of this process (pass Ray Train's world rank/size and do NOT
      use ``prepare_data_loader``: this loop batches by length itself). The model may be DDP-wrapped.
    * Dropout ``train_cfg.dropout`` is applied to the model; seed ``seed`` (default ``train_cfg.seeds[0]``).
    * ``train_domains`` / ``valid_domains``: the domain of each record, for an MoE under domain routing (they
      reach its forward as ``domain_labels``, with the prompt positions as ``routing_mask``).
    * ``deepspeed_config``: a resolved DeepSpeed config (:func:`lm_lexicon.distributed.resolve_deepspeed_config`;
      GPU workers only). The bare model goes in (never DDP-wrapped); a
      :class:`~lm_lexicon.distributed.DeepSpeedRunner` builds the engine, and steps go through ``engine.backward`` /
      ``engine.step`` (DeepSpeed clips and updates at the accumulation boundary; the LR schedule stays this loop's).
      Every rank then writes checkpoints (rank 0: gathered safetensors weights, tokenizer, loop and RNG state; every
      rank: its DeepSpeed shard under ``deepspeed/``) and passes its own directory to ``report_fn`` (Ray Train
      merges the shards of one report). The exported model is copied from rank 0's best (or last) checkpoint; the
      ``model`` object is NOT reset to the best weights (under ZeRO-3 it only holds a shard anyway).
    * ``step_fn(step, stop_at, loss)`` after every optimizer step on rank 0 (a progress bar on the driver,
      :func:`lm_lexicon.console.step_reporter`).
    * ``prompt_templates``: the :class:`~lm_lexicon.data.prompts.PromptTemplates` the prompts are built with (None:
      the defaults); the caller saves them beside the checkpoints and the model (they belong to the model).
    """
    from tqdm.auto import tqdm

    from lm_lexicon.seed_models import apply_dropout

    started_at = time.time()
    out_dir = Path(out_dir)
    seed = train_cfg.seeds[0] if seed is None else seed
    is_main = rank == 0
    set_seed(seed + rank)
    base = _unwrap(model)
    device = next(base.parameters()).device
    precision = resolve_precision(train_cfg.precision, device)
    _check_positions(base, train_cfg.max_length)
    n_dropout = apply_dropout(base, train_cfg.dropout)
    if train_cfg.trainable == "ffn":
        train_only_ffn(base)
    if train_cfg.gradient_checkpointing:
        # non-reentrant: with frozen embeddings no checkpointed input requires grad, which reentrant would drop
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)

    train_set = SFTDataset(tokenizer, train_records, train_cfg.max_length, train_domains, prompt_templates)
    valid_set = SFTDataset(tokenizer, valid_records or [], train_cfg.max_length,
                           valid_domains if valid_records else None, prompt_templates)
    if len(train_set) == 0:
        raise ValueError("no training records")
    sampler = LengthBucketBatchSampler(train_set.lengths, train_cfg.batch_size, seed=seed,
                                       num_replicas=world_size, rank=rank)
    batches_per_epoch = len(sampler.batches(0))
    if batches_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training rows give no batch on each of {world_size} ranks")
    horizon = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * batches_per_epoch / train_cfg.grad_accum))
    stop_at = horizon if max_steps is None else min(max_steps, horizon)
    warmup = int(round(train_cfg.warmup_ratio * horizon))

    runner = None
    if deepspeed_config is not None:
        from lm_lexicon.distributed import DeepSpeedRunner, check_deepspeed_batching

        check_deepspeed_batching(deepspeed_config, train_cfg, world_size)
        runner = DeepSpeedRunner(model, deepspeed_config, param_groups(model, train_cfg.weight_decay), rank=rank)
        model, optimizer = runner.engine, runner.optimizer
    else:
        optimizer = make_adamw(model, train_cfg.weight_decay, train_cfg.lr, tuple(train_cfg.adam_betas))
    state = {"step": 0, "next_epoch": 0, "next_batch": 0, "total_steps": horizon, "warmup_steps": warmup,
             "best_valid_loss": None, "best_step": None, "best_checkpoint": None, "evals_without_improvement": 0,
             "train_loss_first": None, "history": [], "seed": seed, "precision": precision,
             "world_size": world_size, "stopped_early": False}
    if runner is not None:
        state["deepspeed_zero_stage"] = runner.zero_stage
    if resume_from is not None:
        state = _resume(Path(resume_from), model, optimizer, state, device, rank, seed, runner)
    model.train()

    spec = _forward_spec(model)
    ckpt_root = out_dir / "checkpoints"
    stream = _micro_batches(sampler, state["next_epoch"], state["next_batch"])
    step_losses: list[float] = []  # losses since the last report
    last_loss = None
    train_tokens, train_seconds = 0, 0.0
    bar = tqdm(total=stop_at, initial=state["step"], desc="sft", disable=not (progress and is_main),
               dynamic_ncols=True)
    last_ckpt = None
    stop = state["step"] >= stop_at or state["stopped_early"]
    try:
        while not stop:
            t0 = time.perf_counter()
            group = [next(stream) for _ in range(train_cfg.grad_accum)]
            micro = [collate([train_set[i] for i in idx], tokenizer.pad_token_id) for _, _, idx in group]
            n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            # DDP averages the ranks' gradients: each rank divides its summed NLL by the step's target tokens over
            # ALL ranks (times the world size), so the step's gradient is the global per-token mean, whatever each
            # rank's share of the tokens (per-rank means would over-weight the rank with fewer targets)
            ddp = runner is None and _distributed()
            global_targets = _sum_over_ranks(n_targets) if ddp else n_targets
            rank_share = torch.distributed.get_world_size() / max(1, global_targets) if ddp else None
            lr = train_cfg.lr * lr_factor(state["step"], horizon, warmup, train_cfg.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_nll = 0.0
            for k, batch in enumerate(micro):
                batch = {name: t.to(device) for name, t in batch.items()}
                if runner is not None:  # DeepSpeed reduces gradients and updates at its accumulation boundary
                    with autocast_context(precision, device):
                        nll, _ = definition_nll(model, batch, spec)
                    runner.micro_step(nll / max(1, n_targets))
                else:
                    # DDP: all-reduce gradients only on the last micro-batch of the step
                    sync = k == len(micro) - 1 or not hasattr(model, "no_sync")
                    with (contextlib.nullcontext() if sync else model.no_sync()):
                        with autocast_context(precision, device):
                            nll, _ = definition_nll(model, batch, spec)
                        (nll * rank_share if ddp else nll / max(1, n_targets)).backward()
                step_nll += float(nll.detach())
                train_tokens += int(batch["attention_mask"].sum())
            if runner is not None:
                grad_norm = runner.grad_norm()  # clipped by DeepSpeed (gradient_clipping = train.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), train_cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - t0

            state["step"] += 1
            epoch, index, _ = group[-1]
            state["next_epoch"], state["next_batch"] = (epoch, index + 1)
            if ddp:  # the step's loss over every rank's tokens (what rank 0 reports)
                step_nll = _sum_over_ranks(step_nll)
            last_loss = step_nll / max(1, global_targets)
            if state["train_loss_first"] is None:
                state["train_loss_first"] = last_loss
            step_losses.append(last_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}")
            if step_fn is not None and is_main:
                step_fn(state["step"], stop_at, last_loss)

            at_end = state["step"] >= stop_at
            if state["step"] % train_cfg.eval_every == 0 or at_end:
                metrics = {"step": state["step"], "epoch": state["step"] * train_cfg.grad_accum / batches_per_epoch,
                           "train_loss": float(np.mean(step_losses)), "lr": lr, "grad_norm": float(grad_norm),
                           "tokens_per_s": train_tokens / train_seconds if train_seconds else 0.0}
                step_losses = []
                if len(valid_set):
                    valid_loss = evaluate_loss(model, tokenizer, valid_set, batch_size=train_cfg.batch_size,
                                               precision=precision, lockstep=runner is not None)
                    metrics["valid_loss"] = valid_loss
                    stop = _early_stopping(state, valid_loss, train_cfg.early_stopping_patience)
                    metrics["best_valid_loss"] = state["best_valid_loss"]
                state["history"].append(metrics)
                ckpt_name = f"step-{state['step']:07d}"
                if state["best_step"] == state["step"]:
                    state["best_checkpoint"] = ckpt_name
                last_ckpt = None
                if runner is not None:  # every rank: gathering ZeRO-3 weights and DeepSpeed's shards are collective
                    last_ckpt = _save_deepspeed_checkpoint(ckpt_root / ckpt_name, runner, tokenizer, state, is_main)
                    _prune_checkpoints(ckpt_root, keep_checkpoints,
                                       {state["best_checkpoint"]} if state["best_checkpoint"] else set())
                elif is_main:
                    last_ckpt = save_checkpoint(ckpt_root / ckpt_name, model, tokenizer, optimizer, state)
                    _prune_checkpoints(ckpt_root, keep_checkpoints,
                                       {state["best_checkpoint"]} if state["best_checkpoint"] else set())
                if report_fn is not None:
                    report_fn(dict(metrics), last_ckpt)
                if stop:
                    state["stopped_early"] = True
                    log.info("early stopping at step %d: no improvement for %d evals (best %.4f at step %s)",
                             state["step"], state["evals_without_improvement"], state["best_valid_loss"],
                             state["best_step"])
            stop = stop or at_end
    finally:
        bar.close()

    if runner is not None:
        final = _finish_deepspeed(tokenizer, state, out_dir, ckpt_root, restore_best, is_main,
                                  last_ckpt or (Path(resume_from) if resume_from is not None else None))
    else:
        final = _finish(model, tokenizer, state, out_dir, ckpt_root, restore_best, is_main, train_cfg.save_dtype)
    history = state["history"]
    return {
        "train_loss_first": state["train_loss_first"],
        "train_loss_last": last_loss if last_loss is not None else (history[-1]["train_loss"] if history else None),
        "valid_loss": history[-1].get("valid_loss") if history else None,
        "best_valid_loss": state["best_valid_loss"],
        "best_step": state["best_step"],
        "steps": state["step"],
        "total_steps": horizon,
        "stopped_early": state["stopped_early"],
        "tokens_per_s": train_tokens / train_seconds if train_seconds else 0.0,
        "seconds": train_seconds,
        "started_at": started_at,  # wall clock (Unix time) of this call: when jobs ran, side by side or not
        "finished_at": time.time(),
        "precision": precision,
        "dropout_modules": n_dropout,
        "trainable_parameters": n_trainable,
        # the token budget: passes over the data times its tokens (prompt + definition) and its target tokens
        "epochs_done": state["step"] * train_cfg.grad_accum / batches_per_epoch,
        "dataset_tokens": sum(train_set.lengths),
        "dataset_target_tokens": train_set.n_target_tokens,
        "n_train": len(train_set),
        "n_valid": len(valid_set),
        "model_dir": str(final) if final else None,
        "checkpoint_dir": str(last_ckpt) if last_ckpt else None,
    }


def _check_positions(model, max_length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"train.max_length={max_length} exceeds the model's max_position_embeddings={limit}")


def _micro_batches(sampler: LengthBucketBatchSampler, epoch: int, index: int) -> Iterator[tuple[int, int, list[int]]]:
    """Endless ``(epoch, index, batch)`` stream starting at a saved data position; steps may straddle epochs."""
    while True:
        batches = sampler.batches(epoch)
        for i in range(index, len(batches)):
            yield epoch, i, batches[i]
        epoch, index = epoch + 1, 0


def _early_stopping(state: dict, valid_loss: float, patience: Optional[int]) -> bool:
    """Update best/patience bookkeeping; True when training should stop."""
    best = state["best_valid_loss"]
    if best is None or valid_loss < best:
        state["best_valid_loss"], state["best_step"] = valid_loss, state["step"]
        state["evals_without_improvement"] = 0
    else:
        state["evals_without_improvement"] += 1
    return patience is not None and state["evals_without_improvement"] >= patience


def _resume(directory: Path, model, optimizer, fresh: dict, device, rank: int, seed: int, runner=None) -> dict:
    saved = read_trainer_state(directory)
    if saved["total_steps"] != fresh["total_steps"] or saved["warmup_steps"] != fresh["warmup_steps"]:
        log.warning("resuming with a different schedule: checkpoint horizon %d (warm-up %d), now %d (%d)",
                    saved["total_steps"], saved["warmup_steps"], fresh["total_steps"], fresh["warmup_steps"])
    if runner is not None:
        from lm_lexicon.distributed import DEEPSPEED_STATE_DIR

        if saved.get("world_size", 1) != fresh["world_size"]:
            raise ValueError(f"{directory}: DeepSpeed state was written by {saved.get('world_size', 1)} ranks and "
                             f"cannot be loaded by {fresh['world_size']} (ZeRO partitions per rank); resume with "
                             "the same resources.workers_per_expert")
        if not (directory / DEEPSPEED_STATE_DIR).is_dir():
            raise FileNotFoundError(f"{directory}: no {DEEPSPEED_STATE_DIR}/ state: this checkpoint was not written "
                                    "by a DeepSpeed run and cannot resume one")
        runner.load_state(directory / DEEPSPEED_STATE_DIR)  # weights (fp32 master), optimizer, DeepSpeed counters
    else:
        if saved.get("world_size", 1) != fresh["world_size"]:
            log.warning("resuming with world_size %d (checkpoint: %d): the data order differs from an uninterrupted "
                        "run", fresh["world_size"], saved.get("world_size", 1))
        load_model_weights(model, directory)
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device,
                                             weights_only=True)["optimizer"])
    _set_rng_state(torch.load(directory / RNG_FILE, weights_only=True))
    if rank:  # the checkpoint holds rank 0's RNG; other ranks need their own dropout streams
        torch.manual_seed(seed * 1000003 + rank * 7919 + saved["step"])
    state = dict(fresh)
    for key in ("step", "next_epoch", "next_batch", "best_valid_loss", "best_step", "best_checkpoint",
                "evals_without_improvement", "train_loss_first", "history", "stopped_early"):
        state[key] = saved.get(key, fresh[key])
    return state


def _finish(model, tokenizer, state: dict, out_dir: Path, ckpt_root: Path, restore_best: bool, is_main: bool,
            save_dtype: str = "float32"):
    """Reset to the best weights if asked, and export the final model to ``out_dir/model`` (rank 0) in
    ``save_dtype``."""
    best = state.get("best_checkpoint")
    if restore_best and best and state["best_step"] != state["step"]:
        best_dir = ckpt_root / best
        if best_dir.is_dir():
            load_model_weights(model, best_dir)
        elif not is_main:
            pass  # only rank 0 has checkpoints on disk; the stage keeps rank 0's export
        else:
            log.warning("best checkpoint %s is gone; exporting the last weights", best_dir)
    if not is_main:
        return None
    final = out_dir / "model"
    tmp = out_dir / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, tmp, save_dtype)
    tokenizer.save_pretrained(str(tmp))
    summary = {k: state[k] for k in ("step", "total_steps", "best_valid_loss", "best_step", "stopped_early",
                                     "seed", "precision")}
    summary["weights"] = "best" if (restore_best and best and state["best_step"] != state["step"]) else "last"
    summary["dtype"] = save_dtype
    (tmp / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def _finish_deepspeed(tokenizer, state: dict, out_dir: Path, ckpt_root: Path, restore_best: bool, is_main: bool,
                      last_dir: Optional[Path]):
    """:func:`_finish` under DeepSpeed: rank 0 exports the best (or last) checkpoint's safetensors weights, already
    gathered when the checkpoint was written, to ``out_dir/model``; nothing is gathered again, so this is not a
    collective and the other ranks return at once."""
    from lm_lexicon.distributed import DEEPSPEED_STATE_DIR

    if not is_main:
        return None
    best = state.get("best_checkpoint")
    use_best = bool(restore_best and best and state["best_step"] != state["step"])
    source = last_dir
    if use_best:
        if (ckpt_root / best).is_dir():
            source = ckpt_root / best
        else:
            log.warning("best checkpoint %s is gone; exporting the last weights", ckpt_root / best)
            use_best = False
    if source is None or not Path(source).is_dir():
        raise RuntimeError(f"no checkpoint to export the final model from (last: {source})")
    final = out_dir / "model"
    tmp = out_dir / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(STATE_FILE, RNG_FILE, OPTIMIZER_FILE,
                                                               DEEPSPEED_STATE_DIR))
    summary = {k: state[k] for k in ("step", "total_steps", "best_valid_loss", "best_step", "stopped_early",
                                     "seed", "precision")}
    summary["weights"] = "best" if use_best else "last"
    (tmp / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final
