"""GPU-side pieces derived from a recipe: the DeepSpeed config, the Ray resources a recipe asks for, the plan of a
recipe on a cluster node type, and the DeepSpeed engine the SFT loop drives on GPU workers.

Only :class:`DeepSpeedRunner` touches DeepSpeed, and it imports it when it is built, on a GPU worker whose recipe
sets ``train.deepspeed``: the CPU path never imports it (a test checks). The config logic and the engine wiring are
unit-tested on CPU (the wiring against a stand-in ``deepspeed`` module); the ZeRO-3 engine itself has not been run
on GPU hardware from this repository yet (docs/GPU.md says exactly what is and is not tested).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

AUTO = "auto"
DEEPSPEED_STATE_DIR = "deepspeed"   # inside an SFT checkpoint: DeepSpeed's own (ZeRO-partitioned) training state
DEEPSPEED_TAG = "state"


# =================================================================================================== DeepSpeed config
def resolve_deepspeed_config(path: str | Path, train_cfg, world_size: int) -> dict:
    """Load a DeepSpeed JSON config and fill its ``"auto"`` values from the recipe, refusing contradictions.

    The recipe is the single source of truth for batch sizes, clipping and precision, so a value written explicitly in
    the JSON must agree with it. The optimizer defaults to AdamW with the recipe's lr/betas/weight decay; a
    ``scheduler`` section is refused: the SFT loop sets the learning rate of every step itself (warm-up then
    cosine/linear decay, :func:`lm_lexicon.sft.lr_factor`), the same schedule on CPU, under DDP and under DeepSpeed.
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


def resources_plan(cfg, node: Mapping[str, float], max_nodes: int, *, with_dense: bool = True) -> dict:
    """How a recipe's expert stage runs on ``max_nodes`` nodes of one type with resources ``node`` (``{"CPU": 96,
    "GPU": 8}``): a pure function of the config and the node description, for planning and for tests.

    Ray Train workers of one expert need ``{CPU: cpus_per_worker, GPU: gpus_per_worker}`` each and may span nodes;
    jobs are the N experts plus the dense baseline (``with_dense``). Returns per-worker and per-expert reservations,
    how many workers fit on one node, how many nodes one expert spans, how many jobs train at once ("trials in
    parallel", also capped by ``resources.max_concurrent_experts``), how many waves that takes, the GPUs and nodes
    in use at once, and the global batch of one optimizer step. Raises ValueError when not even one expert fits.
    """
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    r = cfg.resources
    node_cpu, node_gpu = float(node.get("CPU", 0)), float(node.get("GPU", 0))
    gpus_per_worker = r.gpus_per_worker if r.use_gpu else 0.0
    if r.use_gpu and node_gpu < gpus_per_worker:
        raise ValueError(f"a training worker needs {gpus_per_worker:g} GPU(s); this node type has {node_gpu:g}")
    if node_cpu < r.cpus_per_worker:
        raise ValueError(f"a training worker needs {r.cpus_per_worker:g} CPUs; this node type has {node_cpu:g}")
    fits = [int(node_cpu // r.cpus_per_worker)]
    if r.use_gpu:
        fits.append(int(node_gpu // gpus_per_worker))
    workers_per_node = min(fits)
    n_workers = r.workers_per_expert
    jobs = cfg.partition.n_experts + (1 if with_dense else 0)
    by_resources = (workers_per_node * max_nodes) // n_workers
    if by_resources < 1:
        raise ValueError(f"one expert needs {n_workers} workers; {max_nodes} node(s) of this type hold "
                         f"{workers_per_node * max_nodes}")
    parallel = min(jobs, by_resources)
    if r.max_concurrent_experts:
        parallel = min(parallel, r.max_concurrent_experts)
    batch = cfg.train.batch_size * cfg.train.grad_accum * n_workers
    return {
        "use_gpu": r.use_gpu,
        "deepspeed": deepspeed_enabled(cfg),
        "gpus_per_worker": gpus_per_worker,
        "cpus_per_worker": r.cpus_per_worker,
        "workers_per_expert": n_workers,
        "gpus_per_expert": gpus_per_worker * n_workers,
        "cpus_per_expert": r.cpus_per_worker * n_workers,
        "workers_per_node": workers_per_node,
        "nodes_per_expert": math.ceil(n_workers / workers_per_node),
        "jobs": jobs,
        "trials_in_parallel": parallel,
        "waves": math.ceil(jobs / parallel),
        "total_gpus": gpus_per_worker * n_workers * parallel,
        "total_cpus": r.cpus_per_worker * n_workers * parallel,
        "nodes": math.ceil(n_workers * parallel / workers_per_node),
        "global_batch_sequences": batch,
        "global_batch_tokens": batch * cfg.train.max_length,
    }


# =================================================================================================== DeepSpeed engine
class DeepSpeedRunner:
    """The DeepSpeed side of :func:`lm_lexicon.sft.train`: it owns the engine and everything that differs from the
    plain PyTorch/DDP loop. Decisions (see docs/GPU.md):

    * **Optimizer from the DeepSpeed config**, built by :func:`resolve_deepspeed_config` from the recipe (AdamW,
      lr, betas, weight decay), so ZeRO partitions its state and DeepSpeed may use its fused kernels; our parameter
      groups (no decay on biases and norm gains) are passed as ``model_parameters``.
    * **Learning-rate schedule from the loop**: no DeepSpeed scheduler; the loop writes each step's LR into the
      optimizer's param groups, so one schedule (and one resume rule: the LR is a function of the step) serves
      CPU, DDP and DeepSpeed.
    * **Loss scaling**: the loop already divides the summed NLL by the target tokens of the whole optimizer step,
      so ``engine.backward(loss, scale_wrt_gas=False)``; ``engine.step()`` after every micro-batch lets DeepSpeed
      reduce gradients, clip (``gradient_clipping``) and update at the accumulation boundary.
    * **Weights are saved as safetensors only**: under ZeRO-3 each rank holds a shard, so :meth:`full_state_dict`
      gathers module by module (``deepspeed.zero.GatheredParameters``) onto rank 0, which writes them with
      ``save_pretrained``. The optimizer and fp32 master state (needed for an exact resume) is DeepSpeed's own
      per-rank checkpoint under ``<checkpoint>/deepspeed/``, written and read only by DeepSpeed.
    """

    def __init__(self, model, ds_config: Mapping, model_parameters, *, rank: int = 0):
        import deepspeed  # GPU workers only (the [gpu] extra)

        self._deepspeed = deepspeed
        self.config = dict(ds_config)
        self.rank = rank
        self.zero_stage = int((self.config.get("zero_optimization") or {}).get("stage", 0))
        self.grad_accum = int(self.config["gradient_accumulation_steps"])
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=model_parameters, config=self.config)
        if scheduler is not None:
            raise ValueError("DeepSpeed built an LR scheduler; the training loop owns the learning rate")
        if optimizer is None:
            raise ValueError("DeepSpeed built no optimizer: the config needs an 'optimizer' section")
        self.engine, self.optimizer = engine, optimizer

    @property
    def module(self):
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_step(self, loss) -> None:
        """Backward of one micro-batch's (already step-normalised) loss, then DeepSpeed's step: it only reduces,
        clips and updates at the accumulation boundary."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if hasattr(norm, "item") else norm)

    def full_state_dict(self) -> Optional[dict]:
        """The whole model's weights as CPU tensors on rank 0 (``None`` elsewhere).

        Under ZeRO-3 this is a collective (every rank must call it): the parameters of one module at a time are
        gathered (``GatheredParameters`` with ``modifier_rank=0``, which also frees the gathered copies on exit),
        copied to CPU on rank 0, and re-partitioned. Parameters shared between modules (tied embeddings) stay shared.
        """
        module = self.engine.module
        if self.zero_stage < 3:
            if self.rank != 0:
                return None
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        state: Optional[dict] = {} if self.rank == 0 else None
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

    def save_state(self, directory: str | Path) -> None:
        """DeepSpeed's resumable state (ZeRO-partitioned optimizer + fp32 master weights; one file set per rank).
        Collective: every rank calls it with its own local directory."""
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)

    def load_state(self, directory: str | Path) -> None:
        """Restore :meth:`save_state`'s output into this (freshly built) engine. Collective."""
        path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed state (tag {DEEPSPEED_TAG!r}) to resume from")
