"""The definition loss: summed next-token NLL over definition (+EOS) tokens, for training and for evaluation.

Logits are computed only at positions whose next token is a target (``logits_to_keep`` mask), which skips the LM
head on prompt and padding positions — for the MiniLM decoder the 30k-word head is about half of the model's FLOPs
per token (measured: a step with half the positions as prompt is 1.38x faster).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from lm_lexicon.data.records import Record
from lm_lexicon.train import parallel
from lm_lexicon.train.batching import LengthBucketBatchSampler, SFTDataset, collate
from lm_lexicon.train.parallel import unwrap
from lm_lexicon.train.precision import autocast_context, resolve_precision
from lm_lexicon.train.tokens import IGNORE_INDEX


@dataclass(frozen=True)
class ForwardSpec:
    """Which optional forward arguments the model takes."""
    logits_to_keep: bool
    use_cache: bool


def forward_spec(model) -> ForwardSpec:
    params = inspect.signature(unwrap(model).forward).parameters
    return ForwardSpec(logits_to_keep="logits_to_keep" in params, use_cache="use_cache" in params)


def definition_nll(model, batch: dict[str, torch.Tensor],
                   spec: Optional[ForwardSpec] = None) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target (label != -100) tokens, and their count.

    Summed, not averaged, so gradient accumulation and evaluation can divide by the exact token count of the whole
    step / set. Logits are requested only where the next token is a target; the loss is computed in float32 even
    under bf16 autocast.
    """
    spec = spec or forward_spec(model)
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
        nll = nll + unwrap(model).config.aux_loss_coef * aux.float() * n_targets
    return nll, n_targets


def _rank_batches(batches: list, lockstep: bool) -> tuple[list, Optional[list[bool]]]:
    """This rank's share of the evaluation batches; with ``lockstep``, padded with fillers (marked False) so that
    every rank runs as many forwards."""
    if not parallel.is_distributed():
        return batches, None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = batches[rank::world]
    if not lockstep:
        return mine, None
    rounds = math.ceil(len(batches) / world)
    counted = [True] * len(mine) + [False] * (rounds - len(mine))
    return mine + [batches[0]] * (rounds - len(mine)), counted


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
    model = unwrap(model)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    spec = forward_spec(model)
    was_training = model.training
    model.eval()
    batches, counted = _rank_batches(LengthBucketBatchSampler(dataset.lengths, batch_size, shuffle=False).batches(0),
                                     lockstep)
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
    if parallel.is_distributed():
        torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
