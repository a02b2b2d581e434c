"""The Ray Train worker scaffold shared by the experts stage and the MoE fine-tune: set up the worker, resume from
the run's latest checkpoint, train with :func:`lm_lexicon.train.train`, report every checkpoint, and mark the final
model so that a restarted run reports it again instead of training twice. The job's prompt templates build its
prompts and are saved with every checkpoint and the final model (``prompt_templates.json``: they belong to it).

A stage supplies only what differs: a function that builds its :class:`TrainJob` (model, rows, recipe, templates) on
the worker. On the driver, :func:`torch_trainer` builds the ``TorchTrainer`` and :func:`collect_final_model` copies the
final model out of the result. Nothing here imports torch or Ray at import time: the stages' drivers import it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from lm_lexicon.distributed import DEEPSPEED_STATE_DIR

FINAL_MARKER = "FINAL.json"  # beside the final model: its final metrics (a restarted worker reports them again)
FAIL_ONCE_ENV = "LM_LEXICON_FAIL_ONCE_AT_STEP"  # fault injection for the resume tests: "<step>:<marker file>"


@dataclass
class WorkerContext:
    """What a stage's job builder gets on the worker."""
    cfg: Any                # the PipelineConfig
    loop_cfg: dict          # the TorchTrainer's train_loop_config
    rank: int
    world: int
    resumed_step: int       # the step of the checkpoint this worker resumes from (0: a fresh start)


@dataclass
class TrainJob:
    """What one worker trains, and what its reports say besides the loop's metrics."""
    label: str                      # its progress bar on the driver
    model: Any
    tokenizer: Any
    train_records: list
    valid_records: list
    train_cfg: Any
    templates: Any = None           # the PromptTemplates of its prompts (None: the defaults); saved with the model
    train_kwargs: dict = field(default_factory=dict)  # further keywords of train() (domains)
    ddp_kwargs: Optional[dict] = None                 # prepare_model's parallel_strategy_kwargs
    tags: dict = field(default_factory=dict)          # into every report
    final_extras: Callable[[dict], dict] = lambda metrics: {}  # into the final report (rank 0), from train()'s metrics


def run_worker(loop_cfg: dict, build_job: Callable[[WorkerContext], TrainJob]) -> None:
    """The body of a Ray Train worker: everything but :func:`build_job`, which loads the stage's model and rows."""
    launched_at = time.time()  # before loading anything: when the scheduler ran this job, side by side or not
    import ray.train
    import torch

    from lm_lexicon.config import PipelineConfig
    from lm_lexicon.console import step_reporter
    from lm_lexicon.data.prompts import PromptTemplates
    from lm_lexicon.train import read_trainer_state, train

    cfg = PipelineConfig.model_validate(loop_cfg["cfg"])
    _configure_worker(cfg, loop_cfg.get("torch_threads"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    with tempfile.TemporaryDirectory() as scratch:
        resume_from = _restore(ray.train.get_checkpoint(), Path(scratch) / "resume")
        if resume_from is not None and (resume_from / FINAL_MARKER).exists():  # finished before an interruption
            ray.train.report(json.loads((resume_from / FINAL_MARKER).read_text()),
                             checkpoint=ray.train.Checkpoint.from_directory(str(resume_from)))
            return
        resumed_step = int(read_trainer_state(resume_from)["step"]) if resume_from is not None else 0
        job = build_job(WorkerContext(cfg, loop_cfg, rank, world, resumed_step))
        if job.templates is None:
            job.templates = PromptTemplates()
        ds_config = loop_cfg.get("deepspeed")  # resolved on the driver; only set on GPUs
        model = _place(job.model, cfg, world, ds_config, job.ddp_kwargs)
        metrics = train(model, job.tokenizer, job.train_records, job.valid_records, job.train_cfg,
                        Path(scratch) / "run", resume_from=resume_from,
                        report_fn=_reporter(job, loop_cfg.get("fail_once") or ""), rank=rank, world_size=world,
                        progress=False, deepspeed_config=ds_config, prompt_templates=job.templates,
                        **job.train_kwargs,
                        step_fn=step_reporter(loop_cfg.get("progress"), job.label) if rank == 0 else None)
        _report_final(job, {**metrics, "worker_launched_at": launched_at}, rank)


def _configure_worker(cfg, torch_threads: Optional[int] = None) -> None:
    import torch

    # Ray pins OMP threads to the worker's CPU reservation; torch must agree or workers sharing cores thrash (a
    # stage that runs alone may ask for more: ``torch_threads``)
    torch.set_num_threads(max(1, int(torch_threads or cfg.resources.cpus_per_worker)))


def _restore(checkpoint, directory: Path) -> Optional[Path]:
    """The run's latest checkpoint, downloaded to ``directory``; None on a fresh start."""
    if checkpoint is None:
        return None
    checkpoint.to_directory(str(directory))
    return directory


def _place(model, cfg, world: int, ds_config: Optional[dict], ddp_kwargs: Optional[dict]):
    """The model on this worker's device; DDP-wrapped across workers unless DeepSpeed does the data parallelism."""
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")
    if ds_config is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # DeepSpeed places its engine on the current device
    model.to(device)
    if world > 1 and ds_config is None:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    return model


def _reporter(job: TrainJob, fail_once: str):
    """``report_fn`` of the loop: metrics (+ the job's tags) and the checkpoint to Ray Train; with ``fail_once``
    ("<step>:<marker>") it fails once after that step, for the resume tests."""
    import ray.train

    def report(metrics: dict, ckpt_dir: Optional[Path]) -> None:
        metrics = {**metrics, **job.tags}
        if ckpt_dir is not None:  # the templates belong to the model: a resumed or exported checkpoint has them
            job.templates.save(ckpt_dir)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir))
                         if ckpt_dir is not None else None)
        if fail_once:
            at, marker = fail_once.split(":", 1)
            if metrics["step"] >= int(at) and not Path(marker).exists():
                Path(marker).write_text(job.label)
                raise RuntimeError(f"injected failure after step {metrics['step']} ({FAIL_ONCE_ENV})")

    return report


def _report_final(job: TrainJob, metrics: dict, rank: int) -> None:
    """Rank 0 reports the final model with its metrics (and marks it); the other ranks report that they are done."""
    import ray.train

    if rank != 0:
        ray.train.report({"final": True, **job.tags}, checkpoint=None)
        return
    final = {k: v for k, v in metrics.items() if k not in ("model_dir", "checkpoint_dir")}
    final.update(job.final_extras(metrics))
    final["final"] = True
    model_dir = Path(metrics["model_dir"])
    job.templates.save(model_dir)
    (model_dir / FINAL_MARKER).write_text(json.dumps(final))
    ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(model_dir)))


def torch_trainer(worker_fn, loop_cfg: dict, resources: dict, run_name: str, storage: str, *,
                  cpu_discount: float = 0.0, callbacks: Iterable = ()):
    """A ``TorchTrainer`` of ``resources["workers_per_expert"]`` workers running ``worker_fn(loop_cfg)``, with its
    checkpoints (the two newest) and retries (``max_failures``) under ``storage``/``run_name``. ``cpu_discount``:
    CPUs the caller already holds for this run, taken off the workers' reservation."""
    import ray.train
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources["cpus_per_worker"] - cpu_discount / resources["workers_per_expert"]}
    if resources["use_gpu"]:
        per_worker["GPU"] = resources["gpus_per_worker"]
    per_worker.update(resources.get("worker_resources") or {})  # e.g. {"expert_node": 1}: only nodes that declare it
    return TorchTrainer(
        worker_fn,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=resources["workers_per_expert"],
                                               use_gpu=resources["use_gpu"], resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=resources["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks)),
    )


def collect_final_model(checkpoint, model_dir: Path) -> dict:
    """Copy a finished run's final checkpoint to ``model_dir`` as a plain model (no marker, no training state);
    return its final metrics."""
    from lm_lexicon.train.checkpoint import TRAINING_STATE_FILES

    checkpoint.to_directory(str(model_dir))
    final = json.loads((model_dir / FINAL_MARKER).read_text())
    for leftover in (FINAL_MARKER, *TRAINING_STATE_FILES):
        (model_dir / leftover).unlink(missing_ok=True)
    shutil.rmtree(model_dir / DEEPSPEED_STATE_DIR, ignore_errors=True)
    return final
