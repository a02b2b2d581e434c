"""Training: the supervised fine-tuning loop of the experts and of the MoE fine-tune, and the pieces the reward
model shares with it.

* :mod:`.tokens` — prompt/definition -> token ids and labels, the same layout for training and generation;
* :mod:`.batching` — tokenised datasets, padding, length-bucketed batches a resumed run can regenerate;
* :mod:`.loss` — the definition loss, and the validation loss (also under data parallelism);
* :mod:`.optim`, :mod:`.precision` — AdamW groups and the LR schedule; bf16 autocast and seeding;
* :mod:`.state`, :mod:`.checkpoint` — the resumable loop state and the files a checkpoint holds;
* :mod:`.strategy` (+ :mod:`.deepspeed_strategy`) — one process, DDP or DeepSpeed behind one interface;
* :mod:`.loop` — :func:`train`, the loop itself;
* :mod:`.ray_worker` — the Ray Train worker scaffold the experts stage and the MoE fine-tune run (imports Ray).
"""
import importlib

# the public names, by submodule; imported on first use, so that the stages can import the Ray scaffold
# (lm_lexicon.train.ray_worker) without importing torch on the driver
_EXPORTS = {
    "batching": ("LengthBucketBatchSampler", "SFTDataset", "collate"),
    "checkpoint": ("load_model_weights", "read_trainer_state", "save_model"),
    "loop": ("train",),
    "loss": ("definition_nll", "evaluate_loss"),
    "optim": ("LRSchedule", "clip_gradients", "lr_factor", "make_adamw", "param_groups", "train_only_ffn"),
    "precision": ("autocast_context", "cpu_supports_bf16", "resolve_precision", "set_seed"),
    "state": ("TrainerState",),
    "tokens": ("IGNORE_INDEX", "bos_ids", "encode_example", "encode_prompt", "record_prompt"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
