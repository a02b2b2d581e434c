"""Optimiser and learning-rate schedule, shared by the SFT loop and the reward model: AdamW without decay on
biases and norm gains, linear warm-up then cosine/linear/constant, the LR a pure function of the step (so resuming
needs no scheduler state)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lm_lexicon.train.parallel import unwrap


def train_only_ffn(model) -> int:
    """Freeze every tensor but the FFN projections that the merge turns into experts; return the trainable count.

    The other tensors (attention, norms, embeddings, LM head) then stay the seed's in every expert, so the merge's
    average of them is the seed itself, exactly.
    """
    from lm_lexicon.moe.ffn_spec import spec_for_config

    base = unwrap(model)
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
    for _, p in unwrap(model).named_parameters():
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


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every update: ``peak`` x :func:`lr_factor`."""
    peak: float
    total_steps: int
    warmup_steps: int
    kind: str

    def at(self, step: int) -> float:
        return self.peak * lr_factor(step, self.total_steps, self.warmup_steps, self.kind)

    def apply(self, optimizer, step: int) -> float:
        """Write update ``step``'s learning rate into every param group of ``optimizer``; return it."""
        lr = self.at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def clip_gradients(parameters, max_norm: float):
    """Clip the gradients' global norm to ``max_norm``; return the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
