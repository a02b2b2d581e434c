"""GPU-side settings derived from a recipe: the DeepSpeed config and the Ray resources a recipe asks for.

Only the config logic lives here and is unit-tested on CPU; DeepSpeed itself is imported on GPU workers only (the CPU
path never imports it). The ZeRO-3 engine path has not been run on GPU hardware from this repository yet.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

AUTO = "auto"


def resolve_deepspeed_config(path: str | Path, train_cfg, world_size: int) -> dict:
    """Load a DeepSpeed JSON config and fill its ``"auto"`` values from the recipe, refusing contradictions.

    The recipe is the single source of truth for batch sizes, clipping and precision, so a value written explicitly in
    the JSON must agree with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    ds = copy.deepcopy(ds)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    derived = {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "train_batch_size": train_cfg.batch_size * train_cfg.grad_accum * world_size,
        "gradient_clipping": train_cfg.grad_clip,
    }
    for key, value in derived.items():
        current = ds.get(key, AUTO)
        if current == AUTO:
            ds[key] = value
        elif current != value:
            raise ValueError(f"{path}: {key}={current!r} contradicts the recipe ({value!r} from train.batch_size="
                             f"{train_cfg.batch_size}, grad_accum={train_cfg.grad_accum}, world size {world_size}, "
                             f"grad_clip={train_cfg.grad_clip}); set it to \"auto\"")
    bf16 = train_cfg.precision in ("bf16", "auto")
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", AUTO) == AUTO:
        ds["bf16"]["enabled"] = bf16
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 0..3, got {stage!r}")
    for key, value in list(zero.items()):
        if value == AUTO:
            zero.pop(key)  # bucket sizes: DeepSpeed's own defaults (they depend on the model's hidden size)
    ds.setdefault("optimizer", {"type": "AdamW", "params": {
        "lr": train_cfg.lr, "betas": list(train_cfg.adam_betas), "weight_decay": train_cfg.weight_decay}})
    return ds


def expert_resources(resources_cfg) -> dict:
    """What one expert's Ray Train run reserves: workers, per-worker CPU/GPU, and totals."""
    per_worker = {"CPU": resources_cfg.cpus_per_worker}
    if resources_cfg.use_gpu:
        per_worker["GPU"] = resources_cfg.gpus_per_worker
    n = resources_cfg.workers_per_expert
    return {"workers": n, "per_worker": per_worker, "total": {k: v * n for k, v in per_worker.items()}}
