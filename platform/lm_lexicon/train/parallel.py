"""Data-parallel plumbing that several training modules need: the model inside a wrapper, ranks, sums over ranks."""
from __future__ import annotations

import torch


def unwrap(model):
    """The Hugging Face model inside a DDP/FSDP-style wrapper or a DeepSpeed engine (``.module``)."""
    return getattr(model, "module", model)


def is_distributed() -> bool:
    """True inside an initialised torch.distributed group of more than one rank."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def sum_over_ranks(value: float) -> float:
    """``value`` summed over the data-parallel ranks (float64 all-reduce: exact for token counts)."""
    total = torch.tensor([float(value)], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        total = total.cuda()
    torch.distributed.all_reduce(total)
    return float(total.item()) if isinstance(value, float) else int(round(total.item()))
