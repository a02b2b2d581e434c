"""Supervised fine-tuning of a causal LM on definition modeling: prompt -> definition + EOS, loss on the definition.

A plain, readable PyTorch loop rather than the Hugging Face ``Trainer``: it has to run unchanged inside a Ray Train
worker (model wrapped by ``ray.train.torch.prepare_model``, or driven by a DeepSpeed ZeRO engine when the recipe
sets ``train.deepspeed`` on GPUs; checkpoints handed to ``ray.train.report``), and the pieces that matter here —
masking (:mod:`~lm_lexicon.train.tokens`), length bucketing (:mod:`~lm_lexicon.train.batching`), resumable state
(:mod:`~lm_lexicon.train.state`), early stopping — are short enough to read in one place. What differs between one
process, DDP and DeepSpeed sits behind one :mod:`~lm_lexicon.train.strategy` object. Nothing here imports Ray, nor
DeepSpeed (:mod:`lm_lexicon.train.deepspeed_strategy` does, only when a DeepSpeed config is passed).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from lm_lexicon.data.records import Record
from lm_lexicon.train.batching import LengthBucketBatchSampler, SFTDataset, batch_stream, collate
from lm_lexicon.train.checkpoint import CHECKPOINTS_DIR, RNG_FILE, prune_checkpoints, read_trainer_state, set_rng_state
from lm_lexicon.train.loss import definition_nll, evaluate_loss, forward_spec
from lm_lexicon.train.optim import LRSchedule, train_only_ffn
from lm_lexicon.train.parallel import is_distributed, unwrap
from lm_lexicon.train.precision import autocast_context, resolve_precision, set_seed
from lm_lexicon.train.state import TrainerState
from lm_lexicon.train.strategy import DDPStrategy, PlainStrategy, Strategy
from lm_lexicon.train.tokens import IGNORE_INDEX

log = logging.getLogger(__name__)

ReportFn = Callable[[dict, Optional[Path]], None]
StepFn = Callable[[int, int, float], None]


def train(model, tokenizer, train_records: Sequence[Record], valid_records: Sequence[Record] | None, train_cfg,
          out_dir: str | Path, *, resume_from: str | Path | None = None, report_fn: Optional[ReportFn] = None,
          max_steps: Optional[int] = None, seed: Optional[int] = None, rank: int = 0, world_size: int = 1,
          keep_checkpoints: int = 2, restore_best: bool = True, progress: bool = True,
          train_domains: Optional[Sequence[int]] = None, valid_domains: Optional[Sequence[int]] = None,
          deepspeed_config: Optional[dict] = None, step_fn: Optional[StepFn] = None,
          prompt_templates=None) -> dict:
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
      GPU workers only). The bare model goes in (never DDP-wrapped) and
      :class:`~lm_lexicon.train.deepspeed_strategy.DeepSpeedStrategy` drives it: every rank writes checkpoints
      and passes its own directory to ``report_fn``, and the ``model`` object is NOT reset to the best weights.
    * ``step_fn(step, stop_at, loss)`` after every optimizer step on rank 0 (a progress bar on the driver,
      :func:`lm_lexicon.console.step_reporter`).
    * ``prompt_templates``: the :class:`~lm_lexicon.data.prompts.PromptTemplates` the prompts are built with (None:
      the defaults); the caller saves them beside the checkpoints and the model (they belong to the model).
    """
    started_at = time.time()
    out_dir = Path(out_dir)
    seed = train_cfg.seeds[0] if seed is None else seed
    set_seed(seed + rank)
    base = unwrap(model)
    device = next(base.parameters()).device
    precision = resolve_precision(train_cfg.precision, device)
    n_dropout, n_trainable = _prepare_model(base, train_cfg)
    data = _Data.build(tokenizer, train_records, valid_records, train_cfg, seed, rank, world_size, train_domains,
                       valid_domains, prompt_templates)
    horizon = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * data.batches_per_epoch / train_cfg.grad_accum))
    stop_at = horizon if max_steps is None else min(max_steps, horizon)
    warmup = int(round(train_cfg.warmup_ratio * horizon))

    strategy = make_strategy(deepspeed_config, rank, world_size)
    model, optimizer = strategy.setup(model, train_cfg)
    state = TrainerState(total_steps=horizon, warmup_steps=warmup, seed=seed, precision=precision,
                         world_size=world_size, **strategy.state_fields())
    if resume_from is not None:
        state = _resume(Path(resume_from), strategy, state, rank, seed)
    model.train()

    fit = _Fit(model, tokenizer, strategy, optimizer, state, data, train_cfg, out_dir, precision, device,
               LRSchedule(train_cfg.lr, horizon, warmup, train_cfg.schedule))
    fit.run(stop_at, keep_checkpoints, report_fn, step_fn, progress)
    final = strategy.export(tokenizer, state, out_dir, restore_best=restore_best, save_dtype=train_cfg.save_dtype,
                            last_checkpoint=fit.last_ckpt or (Path(resume_from) if resume_from is not None else None))
    return fit.result(started_at=started_at, precision=precision, dropout_modules=n_dropout,
                      trainable_parameters=n_trainable, model_dir=final)


def make_strategy(deepspeed_config: Optional[dict], rank: int, world_size: int) -> Strategy:
    """DeepSpeed when a resolved DeepSpeed config is given, DDP inside a torch.distributed group, else plain."""
    if deepspeed_config is not None:
        from lm_lexicon.train.deepspeed_strategy import DeepSpeedStrategy

        return DeepSpeedStrategy(deepspeed_config, rank=rank, world_size=world_size)
    if is_distributed():
        return DDPStrategy(rank, world_size)
    return PlainStrategy(rank, world_size)


def _prepare_model(base, train_cfg) -> tuple[int, int]:
    """Dropout, frozen tensors and gradient checkpointing as the recipe asks; returns (dropout modules, trainable
    parameters)."""
    from lm_lexicon.seed_models import apply_dropout

    limit = getattr(base.config, "max_position_embeddings", None)
    if limit is not None and train_cfg.max_length > limit:
        raise ValueError(f"train.max_length={train_cfg.max_length} exceeds the model's max_position_embeddings={limit}")
    n_dropout = apply_dropout(base, train_cfg.dropout)
    if train_cfg.trainable == "ffn":
        train_only_ffn(base)
    if train_cfg.gradient_checkpointing:
        # non-reentrant: with frozen embeddings no checkpointed input requires grad, which reentrant would drop
        _enable_activation_checkpointing(base, {"use_reentrant": False})
    return n_dropout, sum(p.numel() for p in base.parameters() if p.requires_grad)


def _enable_activation_checkpointing(base, checkpoint_kwargs: dict) -> None:
    """transformers renamed gradient checkpointing to activation checkpointing (the old name warns, and goes in v6);
    versions before the rename have only the old name."""
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


@dataclass
class _Data:
    train_set: SFTDataset
    valid_set: SFTDataset
    sampler: LengthBucketBatchSampler
    batches_per_epoch: int

    @classmethod
    def build(cls, tokenizer, train_records, valid_records, train_cfg, seed: int, rank: int, world_size: int,
              train_domains, valid_domains, templates=None) -> "_Data":
        train_set = SFTDataset(tokenizer, train_records, train_cfg.max_length, train_domains, templates)
        valid_set = SFTDataset(tokenizer, valid_records or [], train_cfg.max_length,
                               valid_domains if valid_records else None, templates)
        if len(train_set) == 0:
            raise ValueError("no training records")
        sampler = LengthBucketBatchSampler(train_set.lengths, train_cfg.batch_size, seed=seed,
                                           num_replicas=world_size, rank=rank)
        batches_per_epoch = len(sampler.batches(0))
        if batches_per_epoch == 0:
            raise ValueError(f"{len(train_set)} training rows give no batch on each of {world_size} ranks")
        return cls(train_set, valid_set, sampler, batches_per_epoch)


def _resume(directory: Path, strategy: Strategy, fresh: TrainerState, rank: int, seed: int) -> TrainerState:
    saved = read_trainer_state(directory)
    if saved["total_steps"] != fresh.total_steps or saved["warmup_steps"] != fresh.warmup_steps:
        log.warning("resuming with a different schedule: checkpoint horizon %d (warm-up %d), now %d (%d)",
                    saved["total_steps"], saved["warmup_steps"], fresh.total_steps, fresh.warmup_steps)
    strategy.load_checkpoint(directory, saved)
    set_rng_state(torch.load(directory / RNG_FILE, weights_only=True))
    if rank:  # the checkpoint holds rank 0's RNG; other ranks need their own dropout streams
        torch.manual_seed(seed * 1000003 + rank * 7919 + saved["step"])
    return fresh.resumed(saved)


class _Fit:
    """One call's optimizer steps, evaluations and checkpoints, and the counters its metrics come from."""

    def __init__(self, model, tokenizer, strategy: Strategy, optimizer, state: TrainerState, data: _Data, train_cfg,
                 out_dir: Path, precision: str, device: torch.device, schedule: LRSchedule):
        self.model, self.tokenizer, self.strategy, self.optimizer = model, tokenizer, strategy, optimizer
        self.state, self.data, self.cfg, self.schedule = state, data, train_cfg, schedule
        self.precision, self.device = precision, device
        self.spec = forward_spec(model)
        self.ckpt_root = out_dir / CHECKPOINTS_DIR
        self.step_losses: list[float] = []  # losses since the last report
        self.last_loss: Optional[float] = None
        self.train_tokens, self.train_seconds = 0, 0.0
        self.last_ckpt: Optional[Path] = None

    def run(self, stop_at: int, keep_checkpoints: int, report_fn: Optional[ReportFn], step_fn: Optional[StepFn],
            progress: bool) -> None:
        from tqdm.auto import tqdm

        state, is_main = self.state, self.strategy.is_main
        stream = batch_stream(self.data.sampler, state.next_epoch, state.next_batch)
        bar = tqdm(total=stop_at, initial=state.step, desc="sft", disable=not (progress and is_main),
                   dynamic_ncols=True)
        stop = state.step >= stop_at or state.stopped_early
        try:
            while not stop:
                lr, grad_norm = self._step(stream)
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{lr:.2e}")
                if step_fn is not None and is_main:
                    step_fn(state.step, stop_at, self.last_loss)
                at_end = state.step >= stop_at
                if state.step % self.cfg.eval_every == 0 or at_end:
                    stop = self._evaluate_and_save(lr, grad_norm, keep_checkpoints, report_fn)
                stop = stop or at_end
        finally:
            bar.close()

    def _step(self, stream) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its learning rate and gradient norm."""
        t0 = time.perf_counter()
        group = [next(stream) for _ in range(self.cfg.grad_accum)]
        micro = [collate([self.data.train_set[i] for i in idx], self.tokenizer.pad_token_id) for _, _, idx in group]
        n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        global_targets = self.strategy.step_targets(n_targets)
        lr = self.schedule.apply(self.optimizer, self.state.step)
        step_nll = 0.0
        for k, batch in enumerate(micro):
            batch = {name: t.to(self.device) for name, t in batch.items()}
            with self.strategy.micro_batch(last=k == len(micro) - 1):
                with autocast_context(self.precision, self.device):
                    nll, _ = definition_nll(self.model, batch, self.spec)
                self.strategy.backward(nll, n_targets, global_targets)
            step_nll += float(nll.detach())
            self.train_tokens += int(batch["attention_mask"].sum())
        grad_norm = self.strategy.step()
        self.train_seconds += time.perf_counter() - t0

        self.state.step += 1
        epoch, index, _ = group[-1]
        self.state.next_epoch, self.state.next_batch = (epoch, index + 1)
        # the step's loss over every rank's tokens (what rank 0 reports)
        self.last_loss = self.strategy.sum_over_ranks(step_nll) / max(1, global_targets)
        if self.state.train_loss_first is None:
            self.state.train_loss_first = self.last_loss
        self.step_losses.append(self.last_loss)
        return lr, grad_norm

    def _evaluate_and_save(self, lr: float, grad_norm, keep_checkpoints: int, report_fn: Optional[ReportFn]) -> bool:
        """Validation, early-stopping bookkeeping, a checkpoint and a report; True when training should stop."""
        state, cfg = self.state, self.cfg
        metrics = {"step": state.step, "epoch": state.step * cfg.grad_accum / self.data.batches_per_epoch,
                   "train_loss": float(np.mean(self.step_losses)), "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": self.tokens_per_s()}
        self.step_losses = []
        stop = False
        if len(self.data.valid_set):
            valid_loss = evaluate_loss(self.model, self.tokenizer, self.data.valid_set, batch_size=cfg.batch_size,
                                       precision=self.precision, lockstep=self.strategy.lockstep_eval)
            metrics["valid_loss"] = valid_loss
            stop = state.record_validation(valid_loss, cfg.early_stopping_patience)
            metrics["best_valid_loss"] = state.best_valid_loss
        state.history.append(metrics)
        ckpt_name = f"step-{state.step:07d}"
        if state.best_step == state.step:
            state.best_checkpoint = ckpt_name
        self.last_ckpt = self.strategy.save_checkpoint(self.ckpt_root / ckpt_name, self.tokenizer, state)
        if self.last_ckpt is not None:
            prune_checkpoints(self.ckpt_root, keep_checkpoints,
                              {state.best_checkpoint} if state.best_checkpoint else set())
        if report_fn is not None:
            report_fn(dict(metrics), self.last_ckpt)
        if stop:
            state.stopped_early = True
            log.info("early stopping at step %d: no improvement for %d evals (best %.4f at step %s)",
                     state.step, state.evals_without_improvement, state.best_valid_loss, state.best_step)
        return stop

    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0

    def result(self, *, started_at: float, precision: str, dropout_modules: int, trainable_parameters: int,
               model_dir: Optional[Path]) -> dict:
        state, data, history = self.state, self.data, self.state.history
        return {
            "train_loss_first": state.train_loss_first,
            "train_loss_last": self.last_loss if self.last_loss is not None else (
                history[-1]["train_loss"] if history else None),
            "valid_loss": history[-1].get("valid_loss") if history else None,
            "best_valid_loss": state.best_valid_loss,
            "best_step": state.best_step,
            "steps": state.step,
            "total_steps": state.total_steps,
            "stopped_early": state.stopped_early,
            "tokens_per_s": self.tokens_per_s(),
            "seconds": self.train_seconds,
            "started_at": started_at,  # wall clock (Unix time) of this call: when jobs ran, side by side or not
            "finished_at": time.time(),
            "precision": precision,
            "dropout_modules": dropout_modules,
            "trainable_parameters": trainable_parameters,
            # the token budget: passes over the data times its tokens (prompt + definition) and its target tokens
            "epochs_done": state.step * self.cfg.grad_accum / data.batches_per_epoch,
            "dataset_tokens": sum(data.train_set.lengths),
            "dataset_target_tokens": data.train_set.n_target_tokens,
            "n_train": len(data.train_set),
            "n_valid": len(data.valid_set),
            "model_dir": str(model_dir) if model_dir else None,
            "checkpoint_dir": str(self.last_ckpt) if self.last_ckpt else None,
        }
