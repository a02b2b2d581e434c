"""How the SFT loop runs on one process or on data-parallel ranks: one small interface, three strategies.

The loop (:mod:`lm_lexicon.train.loop`) calls only these methods, in this order: ``setup`` (the model to run and
the optimizer), per micro-batch ``micro_batch`` (a context around its forward and backward) and ``backward``, per
optimizer step ``step_targets`` (the step's target tokens over all ranks), ``step`` (update, return the gradient
norm) and ``sum_over_ranks`` (the step's loss), then ``save_checkpoint``, ``load_checkpoint`` and ``export``.

* :class:`PlainStrategy`: one process, or ranks that do not share gradients.
* :class:`DDPStrategy`: a DDP-wrapped model under torch.distributed (Ray Train's ``prepare_model``). The loss is
  scaled so that the averaged gradient is the global per-token mean; gradients are all-reduced only on the last
  micro-batch of a step; only rank 0 writes.
* :class:`lm_lexicon.train.deepspeed_strategy.DeepSpeedStrategy`: a DeepSpeed ZeRO engine (GPU workers), imported
  only when a DeepSpeed config is given.

:func:`lm_lexicon.train.loop.make_strategy` picks one.
"""
from __future__ import annotations

import abc
import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

from lm_lexicon.train import parallel
from lm_lexicon.train.checkpoint import (CHECKPOINTS_DIR, OPTIMIZER_FILE, load_model_weights, save_checkpoint,
                                         save_model, write_summary, written_atomically)
from lm_lexicon.train.optim import clip_gradients, make_adamw
from lm_lexicon.train.state import TrainerState

log = logging.getLogger(__name__)


class Strategy(abc.ABC):
    """The interface, with the single-process answers of the reductions."""
    lockstep_eval = False  # True when a forward is a collective: evaluation must run in step on every rank

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0

    @abc.abstractmethod
    def setup(self, model, train_cfg):
        """Return ``(model to run, optimizer)`` for ``model`` (bare or DDP-wrapped)."""

    @abc.abstractmethod
    def backward(self, nll: torch.Tensor, n_targets: int, global_targets: int) -> None:
        """Backward of one micro-batch's summed NLL; ``n_targets``: this rank's target tokens in the whole step,
        ``global_targets``: every rank's (:meth:`step_targets`)."""

    @abc.abstractmethod
    def step(self):
        """Finish the optimizer step (clip, update, zero); return the gradient norm before clipping."""

    @abc.abstractmethod
    def save_checkpoint(self, directory: Path, tokenizer, state: TrainerState) -> Optional[Path]:
        """Write a resumable checkpoint; return its directory, or None on a rank that writes none."""

    @abc.abstractmethod
    def load_checkpoint(self, directory: Path, saved: dict) -> None:
        """Restore weights and optimizer from a checkpoint whose JSON loop state is ``saved``."""

    @abc.abstractmethod
    def export(self, tokenizer, state: TrainerState, out_dir: Path, *, restore_best: bool, save_dtype: str,
               last_checkpoint: Optional[Path]) -> Optional[Path]:
        """Write the final model to ``out_dir/model`` (the best checkpoint's weights when asked); None on a rank
        that writes none."""

    def state_fields(self) -> dict:
        """Extra :class:`TrainerState` fields this strategy records."""
        return {}

    def step_targets(self, n_targets: int) -> int:
        return n_targets

    def sum_over_ranks(self, value: float) -> float:
        return value

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()


class PlainStrategy(Strategy):
    """The loop's own AdamW, gradient clipping and checkpoints; the model trains in place."""

    def setup(self, model, train_cfg):
        self.model, self.grad_clip = model, train_cfg.grad_clip
        self.optimizer = make_adamw(model, train_cfg.weight_decay, train_cfg.lr, tuple(train_cfg.adam_betas))
        return model, self.optimizer

    def backward(self, nll: torch.Tensor, n_targets: int, global_targets: int) -> None:
        """Backward of a micro-batch's summed NLL, normalised by the target tokens of the whole step."""
        (nll / max(1, n_targets)).backward()

    def step(self):
        grad_norm = clip_gradients(parallel.unwrap(self.model).parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save_checkpoint(self, directory: Path, tokenizer, state: TrainerState) -> Optional[Path]:
        """Rank 0 writes; the other ranks get None."""
        if not self.is_main:
            return None
        return save_checkpoint(directory, self.model, tokenizer, self.optimizer, state)

    def load_checkpoint(self, directory: Path, saved: dict) -> None:
        if saved.get("world_size", 1) != self.world_size:
            log.warning("resuming with world_size %d (checkpoint: %d): the data order differs from an uninterrupted "
                        "run", self.world_size, saved.get("world_size", 1))
        load_model_weights(self.model, directory)
        device = next(parallel.unwrap(self.model).parameters()).device
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device,
                                                  weights_only=True)["optimizer"])

    def export(self, tokenizer, state: TrainerState, out_dir: Path, *, restore_best: bool, save_dtype: str,
               last_checkpoint: Optional[Path]) -> Optional[Path]:
        """Reset the model to the best weights if asked, and export it to ``out_dir/model`` (rank 0) in
        ``save_dtype``."""
        use_best = state.restores_best(restore_best)
        if use_best:
            best_dir = out_dir / CHECKPOINTS_DIR / state.best_checkpoint
            if best_dir.is_dir():
                load_model_weights(self.model, best_dir)
            elif self.is_main:  # only rank 0 has checkpoints on disk; the stage keeps rank 0's export
                log.warning("best checkpoint %s is gone; exporting the last weights", best_dir)
        if not self.is_main:
            return None
        with written_atomically(out_dir / "model") as tmp:
            save_model(self.model, tmp, save_dtype)
            tokenizer.save_pretrained(str(tmp))
            write_summary(tmp, state, "best" if use_best else "last", dtype=save_dtype)
        return out_dir / "model"


class DDPStrategy(PlainStrategy):
    """A DDP-wrapped model: DDP averages the ranks' gradients, so each rank divides its summed NLL by the step's
    target tokens over ALL ranks (times the world size) and the step's gradient is the global per-token mean,
    whatever each rank's share of the tokens (per-rank means would over-weight the rank with fewer targets)."""

    def step_targets(self, n_targets: int) -> int:
        return parallel.sum_over_ranks(n_targets)

    def sum_over_ranks(self, value: float) -> float:
        return parallel.sum_over_ranks(value)

    def micro_batch(self, last: bool):
        """All-reduce gradients only on the last micro-batch of the step."""
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, nll: torch.Tensor, n_targets: int, global_targets: int) -> None:
        (nll * (torch.distributed.get_world_size() / max(1, global_targets))).backward()

