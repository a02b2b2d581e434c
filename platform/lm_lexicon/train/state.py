"""The SFT loop's resumable state: where it is (step, data position), early stopping, and the eval history.

Written to every checkpoint as JSON (``trainer_state.json``); the field order is the file's key order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

# what a resumed run takes from its checkpoint; the rest (schedule, seed, precision, world) is the new run's own
PROGRESS_FIELDS = ("step", "next_epoch", "next_batch", "best_valid_loss", "best_step", "best_checkpoint",
                   "evals_without_improvement", "train_loss_first", "history", "stopped_early")
SUMMARY_FIELDS = ("step", "total_steps", "best_valid_loss", "best_step", "stopped_early", "seed", "precision")


@dataclass(kw_only=True)
class TrainerState:
    step: int = 0                      # optimizer updates done
    next_epoch: int = 0                # the data position of the next micro-batch
    next_batch: int = 0
    total_steps: int                   # the schedule's horizon
    warmup_steps: int
    best_valid_loss: Optional[float] = None
    best_step: Optional[int] = None
    best_checkpoint: Optional[str] = None
    evals_without_improvement: int = 0
    train_loss_first: Optional[float] = None
    history: list[dict] = field(default_factory=list)
    seed: int
    precision: str
    world_size: int
    stopped_early: bool = False
    deepspeed_zero_stage: Optional[int] = None  # only written by DeepSpeed runs

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if data["deepspeed_zero_stage"] is None:
            del data["deepspeed_zero_stage"]
        return data

    def resumed(self, saved: dict) -> "TrainerState":
        """This (fresh) state carrying on from a checkpoint's ``saved`` JSON state."""
        return dataclasses.replace(self, **{k: saved.get(k, getattr(self, k)) for k in PROGRESS_FIELDS})

    def record_validation(self, valid_loss: float, patience: Optional[int]) -> bool:
        """Update best/patience bookkeeping; True when training should stop."""
        if self.best_valid_loss is None or valid_loss < self.best_valid_loss:
            self.best_valid_loss, self.best_step = valid_loss, self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return patience is not None and self.evals_without_improvement >= patience

    def restores_best(self, restore_best: bool) -> bool:
        """True when the exported model should be the best checkpoint rather than the last weights."""
        return bool(restore_best and self.best_checkpoint and self.best_step != self.step)

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in SUMMARY_FIELDS}
