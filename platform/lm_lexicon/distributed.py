"""GPU-side pieces derived from a recipe: the DeepSpeed config, and the Ray resources a recipe asks for on a cluster's
node types.

Nothing here imports DeepSpeed: the engine is driven by :class:`lm_lexicon.train.deepspeed_strategy.DeepSpeedStrategy`
on GPU workers whose recipe sets ``train.deepspeed``. The config logic is unit-tested on CPU; the ZeRO-3 engine itself
has not been run on GPU hardware from this repository yet (docs/GPU.md says exactly what is and is not tested).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

AUTO = "auto"
DEEPSPEED_STATE_DIR = "deepspeed"   # inside an SFT checkpoint: DeepSpeed's own (ZeRO-partitioned) training state
DEEPSPEED_TAG = "state"


# =================================================================================================== DeepSpeed config
def resolve_deepspeed_config(path: str | Path, train_cfg, world_size: int) -> dict:
    """Load a DeepSpeed JSON config and fill its ``"auto"`` values from the recipe, refusing contradictions.

    The recipe is the single source of truth for batch sizes, clipping and precision, so a value written explicitly in
    the JSON must agree with it. The optimizer defaults to AdamW with the recipe's lr/betas/weight decay; a
    ``scheduler`` section is refused: the SFT loop sets the learning rate of every step itself (warm-up then
    cosine/linear decay, :func:`lm_lexicon.train.lr_factor`), the same schedule on CPU, under DDP and under DeepSpeed.
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
    if "scheduler" in ds:
        raise ValueError(f"{path}: remove the 'scheduler' section: the training loop sets the learning rate of every "
                         f"step from train.schedule/warmup_ratio (one schedule for CPU, DDP and DeepSpeed)")
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


def check_deepspeed_batching(ds_config: Mapping, train_cfg, world_size: int) -> None:
    """The loop groups ``grad_accum`` micro-batches of ``batch_size`` rows per optimizer step on each rank; DeepSpeed
    must count the same way or its accumulation boundary would fall mid-step. Raises ValueError on a mismatch."""
    expected = {"train_micro_batch_size_per_gpu": train_cfg.batch_size,
                "gradient_accumulation_steps": train_cfg.grad_accum,
                "train_batch_size": train_cfg.batch_size * train_cfg.grad_accum * world_size}
    wrong = {k: (ds_config.get(k), v) for k, v in expected.items() if ds_config.get(k) != v}
    if wrong:
        raise ValueError("DeepSpeed config does not match the training loop (world size "
                         f"{world_size}): " + ", ".join(f"{k}={got!r}, expected {want!r}"
                                                        for k, (got, want) in wrong.items())
                         + "; build it with resolve_deepspeed_config")
    if "scheduler" in ds_config:
        raise ValueError("DeepSpeed config has a 'scheduler' section; the training loop owns the learning rate")


def deepspeed_enabled(cfg) -> bool:
    """True when a recipe trains through DeepSpeed: ``train.deepspeed`` set and GPUs used (validated together)."""
    return bool(cfg.train.deepspeed) and bool(cfg.resources.use_gpu)


# =================================================================================================== Ray resources
def expert_resources(resources_cfg) -> dict:
    """What one expert's Ray Train run reserves: workers, per-worker CPU/GPU, and totals."""
    per_worker = {"CPU": resources_cfg.cpus_per_worker}
    if resources_cfg.use_gpu:
        per_worker["GPU"] = resources_cfg.gpus_per_worker
    n = resources_cfg.workers_per_expert
    return {"workers": n, "per_worker": per_worker, "total": {k: v * n for k, v in per_worker.items()}}


def cluster_node_types(cluster: Mapping[str, Any]) -> dict[str, dict]:
    """The node types of a Ray cluster launcher config (``cluster.yaml`` as a dict), as plain descriptions:
    ``{name: {"resources": {"CPU": .., "GPU": ..}, "min_workers", "max_workers", "instance_type", "head"}}``.

    ``max_workers`` of a worker type is capped by the global ``max_workers``; the head counts as one node of its
    type that the autoscaler never adds. Resources must be written out in the config (they are for cluster.yaml:
    nothing here asks a cloud API).
    """
    types = cluster.get("available_node_types") or {}
    if not types:
        raise ValueError("cluster config has no available_node_types")
    global_max = int(cluster.get("max_workers", 0))
    head = cluster.get("head_node_type")
    out = {}
    for name, spec in types.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        node_config = spec.get("node_config") or {}
        is_head = name == head
        out[name] = {
            "resources": {"CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0),
                          **{k: v for k, v in resources.items() if k not in ("CPU", "GPU")}},
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": 0 if is_head else min(int(spec.get("max_workers", global_max)), global_max),
            "instance_type": node_config.get("InstanceType") or node_config.get("machineType"),
            "head": is_head,
        }
    return out
