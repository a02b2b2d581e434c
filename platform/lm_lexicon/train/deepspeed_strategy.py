"""The DeepSpeed strategy of the SFT loop (GPU workers whose recipe sets ``train.deepspeed``). Decisions (see
docs/GPU.md):

* **Optimizer from the DeepSpeed config**, built by :func:`lm_lexicon.distributed.resolve_deepspeed_config` from
  the recipe (AdamW, lr, betas, weight decay), so ZeRO partitions its state and DeepSpeed may use its fused kernels;
  our parameter groups (no decay on biases and norm gains) are passed as ``model_parameters``.
* **Learning-rate schedule from the loop**: no DeepSpeed scheduler; the loop writes each step's LR into the
  optimizer's param groups, so one schedule (and one resume rule: the LR is a function of the step) serves CPU, DDP
  and DeepSpeed.
* **Loss scaling**: the loop already divides the summed NLL by the target tokens of the whole optimizer step, so
  ``engine.backward(loss, scale_wrt_gas=False)``; ``engine.step()`` after every micro-batch lets DeepSpeed reduce
  gradients, clip (``gradient_clipping``) and update at the accumulation boundary.
* **Weights are saved as safetensors only**: under ZeRO-3 each rank holds a shard, so :meth:`full_state_dict`
  gathers module by module (``deepspeed.zero.GatheredParameters``) onto rank 0, which writes them with
  ``save_pretrained``. The optimizer and fp32 master state (needed for an exact resume) is DeepSpeed's own per-rank
  checkpoint under ``<checkpoint>/deepspeed/``, written and read only by DeepSpeed.
* **Every rank writes checkpoints** (each into its own local directory, and reports it: Ray Train merges the shards
  of one report); the exported model is copied from rank 0's best (or last) checkpoint, and the model object is NOT
  reset to the best weights (under ZeRO-3 it only holds a shard anyway).

This is the only module that imports ``deepspeed``, when a strategy is built: the CPU path never imports it.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Mapping, Optional

from lm_lexicon.distributed import DEEPSPEED_STATE_DIR, DEEPSPEED_TAG, check_deepspeed_batching
from lm_lexicon.train.checkpoint import (CHECKPOINTS_DIR, TRAINING_STATE_FILES, write_loop_state, write_summary,
                                         written_atomically)
from lm_lexicon.train.optim import param_groups
from lm_lexicon.train.state import TrainerState
from lm_lexicon.train.strategy import Strategy

log = logging.getLogger(__name__)


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed ZeRO engine built from a resolved config; it clips, reduces and updates."""
    lockstep_eval = True  # under ZeRO-3 a forward gathers each layer's parameters from all ranks

    def __init__(self, ds_config: Mapping, *, rank: int = 0, world_size: int = 1):
        super().__init__(rank, world_size)
        self.config = dict(ds_config)
        self.zero_stage = int((self.config.get("zero_optimization") or {}).get("stage", 0))

    def setup(self, model, train_cfg):
        import deepspeed  # GPU workers only (the [gpu] extra)

        check_deepspeed_batching(self.config, train_cfg, self.world_size)
        self._deepspeed = deepspeed
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, train_cfg.weight_decay), config=self.config)
        if scheduler is not None:
            raise ValueError("DeepSpeed built an LR scheduler; the training loop owns the learning rate")
        if optimizer is None:
            raise ValueError("DeepSpeed built no optimizer: the config needs an 'optimizer' section")
        self.engine, self.optimizer = engine, optimizer
        return engine, optimizer

    def state_fields(self) -> dict:
        return {"deepspeed_zero_stage": self.zero_stage}

    def backward(self, nll, n_targets: int, global_targets: int) -> None:
        """Backward of one micro-batch's step-normalised loss, then DeepSpeed's step: it only reduces, clips and
        updates at the accumulation boundary."""
        self.engine.backward(nll / max(1, n_targets), scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> float:
        """The update already happened in the last micro-batch's ``engine.step()``; return its gradient norm."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if hasattr(norm, "item") else norm)

    def save_checkpoint(self, directory: Path, tokenizer, state: TrainerState) -> Path:
        """EVERY rank writes, each into its own local directory: gathering ZeRO-3 weights and writing DeepSpeed's
        shards are collectives. Rank 0 adds the gathered weights as safetensors (``save_pretrained(state_dict=...)``,
        so the directory is a loadable model like on CPU), the tokenizer, the RNG state and the loop state."""
        with written_atomically(directory) as tmp:
            weights = self.full_state_dict()  # collective under ZeRO-3; None on ranks other than 0
            if self.is_main:
                self.engine.module.save_pretrained(str(tmp), state_dict=weights)
                tokenizer.save_pretrained(str(tmp))
                write_loop_state(tmp, state)
            del weights
            self.engine.save_checkpoint(str(tmp / DEEPSPEED_STATE_DIR), tag=DEEPSPEED_TAG, client_state={},
                                        save_latest=False)
        return Path(directory)

    def load_checkpoint(self, directory: Path, saved: dict) -> None:
        """Restore weights (fp32 master), optimizer and DeepSpeed's counters into this freshly built engine."""
        if saved.get("world_size", 1) != self.world_size:
            raise ValueError(f"{directory}: DeepSpeed state was written by {saved.get('world_size', 1)} ranks and "
                             f"cannot be loaded by {self.world_size} (ZeRO partitions per rank); resume with "
                             "the same resources.workers_per_expert")
        if not (directory / DEEPSPEED_STATE_DIR).is_dir():
            raise FileNotFoundError(f"{directory}: no {DEEPSPEED_STATE_DIR}/ state: this checkpoint was not written "
                                    "by a DeepSpeed run and cannot resume one")
        path, _ = self.engine.load_checkpoint(str(directory / DEEPSPEED_STATE_DIR), tag=DEEPSPEED_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed state (tag {DEEPSPEED_TAG!r}) to resume from")

    def export(self, tokenizer, state: TrainerState, out_dir: Path, *, restore_best: bool, save_dtype: str,
               last_checkpoint: Optional[Path]) -> Optional[Path]:
        """Rank 0 copies the best (or last) checkpoint's weights, gathered when it was written, to
        ``out_dir/model``; nothing is gathered again, so this is not a collective and the other ranks return."""
        if not self.is_main:
            return None
        use_best, source = state.restores_best(restore_best), last_checkpoint
        if use_best:
            best = out_dir / CHECKPOINTS_DIR / state.best_checkpoint
            if best.is_dir():
                source = best
            else:
                log.warning("best checkpoint %s is gone; exporting the last weights", best)
                use_best = False
        if source is None or not Path(source).is_dir():
            raise RuntimeError(f"no checkpoint to export the final model from (last: {source})")
        with written_atomically(out_dir / "model") as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(*TRAINING_STATE_FILES, DEEPSPEED_STATE_DIR))
            write_summary(tmp, state, "best" if use_best else "last")
        return out_dir / "model"

    def full_state_dict(self) -> Optional[dict]:
        """The whole model's weights as CPU tensors on rank 0 (``None`` elsewhere).

        Under ZeRO-3 this is a collective (every rank must call it): the parameters of one module at a time are
        gathered (``GatheredParameters`` with ``modifier_rank=0``, which also frees the gathered copies on exit),
        copied to CPU on rank 0, and re-partitioned. Parameters shared between modules (tied embeddings) stay shared.
        """
        module = self.engine.module
        if self.zero_stage < 3:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.is_main else None
        state: Optional[dict] = {} if self.is_main else None
        first_key: dict[int, str] = {}

        def visit(mod, prefix: str) -> None:
            params = list(mod.parameters(recurse=False))
            with self._deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if state is not None:
                    for name, p in mod.named_parameters(recurse=False):
                        ident = getattr(p, "ds_id", id(p))
                        if ident in first_key:
                            state[prefix + name] = state[first_key[ident]]
                        else:
                            state[prefix + name] = p.detach().cpu().clone()
                            first_key[ident] = prefix + name
                    for name, b in mod.named_buffers(recurse=False):
                        if b is not None and name not in mod._non_persistent_buffers_set:
                            state[prefix + name] = b.detach().cpu().clone()
            for name, child in mod.named_children():
                visit(child, f"{prefix}{name}.")

        visit(module, "")
        return state
