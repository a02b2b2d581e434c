"""Merge stage (paper §3.2-3.3): experts -> one sparse MoE, then a light router + expert fine-tune on Ray Train.

Writes::

    merge/
      merged/     the MoE straight from the merge (FFNs -> experts.{i}, everything else averaged) + router/
      model/      the fine-tuned MoE (attention, embeddings and norms frozen; experts and gates trained) + router/
      merge.json  policy, experts, trainable parameters, fine-tune metrics, config

With ``finetune.enabled: false``, ``model/`` is the merged MoE as is.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from lm_lexicon.stages.artifacts import StageResult, fingerprint, release_checkpoints, run_stage


def _rows_with_domains(partition_dir: Path, split: str):
    import pandas as pd

    from lm_lexicon.data.records import Record

    files = sorted(partition_dir.glob("domain_*.parquet")) if split == "train" else [partition_dir / f"{split}.parquet"]
    files = [f for f in files if f.exists()]
    if not files:
        return [], []
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    domains = df["domain"].astype(int).tolist()
    records = [Record.from_dict({k: (None if v != v else v) for k, v in row.items()})
               for row in df.drop(columns=["domain"]).to_dict("records")]
    return records, domains


def finetune_worker(loop_cfg: dict) -> None:
    """Ray Train worker: load the merged MoE, freeze the shared weights, train experts (+ gates) on all domains."""
    import ray.train
    import torch

    from lm_lexicon.config import PipelineConfig
    from lm_lexicon.moe import load
    from lm_lexicon.sft import train

    cfg = PipelineConfig.model_validate(loop_cfg["cfg"])
    from lm_lexicon.data.prompts import PromptTemplates

    templates = PromptTemplates.load(loop_cfg["merged_dir"])  # the experts' (merge_experts checked they agree)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    loaded = load(loop_cfg["merged_dir"], load_router=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    trainable = model.set_trainable(experts=True, gates=None, shared=False)
    if world > 1:
        # experts with no sequence in a batch get no gradient
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    partition_dir = Path(loop_cfg["partition_dir"])
    train_rows, train_domains = _rows_with_domains(partition_dir, "train")
    valid_rows, valid_domains = _rows_with_domains(partition_dir, "valid")
    ft = cfg.finetune
    # trainable="all" keeps set_trainable's choice above (train.trainable selects the dense experts' tensors)
    train_cfg = cfg.train.model_copy(update={"epochs": ft.epochs, "max_steps": ft.max_steps, "lr": ft.lr,
                                             "batch_size": ft.batch_size, "seeds": [cfg.train.seeds[0]],
                                             "eval_every": max(1, ft.max_steps or 10**9), "trainable": "all",
                                             "gradient_checkpointing": False})
    resume_from = None
    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory() as scratch:
        if checkpoint is not None:
            resume_from = Path(scratch) / "resume"
            checkpoint.to_directory(str(resume_from))
            if (resume_from / "FINAL.json").exists():
                ray.train.report(json.loads((resume_from / "FINAL.json").read_text()),
                                 checkpoint=ray.train.Checkpoint.from_directory(str(resume_from)))
                return

        def report(metrics: dict, ckpt_dir: Path | None) -> None:
            if ckpt_dir is not None:
                templates.save(ckpt_dir)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir))
                             if ckpt_dir is not None else None)

        from lm_lexicon.console import step_reporter

        metrics = train(model, tokenizer, train_rows, valid_rows, train_cfg, Path(scratch) / "run",
                        resume_from=resume_from, report_fn=report, rank=rank, world_size=world, progress=False,
                        train_domains=train_domains, valid_domains=valid_domains,
                        step_fn=step_reporter(loop_cfg.get("progress"), "fine-tune") if rank == 0 else None,
                        prompt_templates=templates)
        if rank == 0:
            final = {k: v for k, v in metrics.items() if k not in ("model_dir", "checkpoint_dir")}
            final.update(trainable_parameters=trainable, final=True)
            model_dir = Path(metrics["model_dir"])
            templates.save(model_dir)
            (model_dir / "FINAL.json").write_text(json.dumps(final))
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(model_dir)))
        else:
            ray.train.report({"final": True}, checkpoint=None)


def run_finetune(cfg, merged_dir: Path, partition_dir: Path, out_dir: Path, run_tag: str) -> dict:
    """One Ray Train run (``workers_per_expert`` workers) fine-tuning the merged MoE; the result lands in out_dir."""
    import os

    import ray.train
    from ray.train.torch import TorchTrainer

    from lm_lexicon.ray_utils import init_ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    init_ray(cfg.resources)
    res = cfg.resources
    storage = res.storage_path if "://" in res.storage_path else str(Path(res.storage_path).resolve())
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {}),
                  **res.worker_resources}
    from lm_lexicon.console import RemoteBars

    bars = RemoteBars(["fine-tune"], unit="steps")  # a per-step bar fed by the rank-0 worker
    trainer = TorchTrainer(
        finetune_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "merged_dir": str(merged_dir.resolve()),
                           "partition_dir": str(partition_dir.resolve()), "progress": bars.address},
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers_per_expert, use_gpu=res.use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=f"{cfg.name}-moe-finetune-{run_tag}", storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    finally:
        bars.close()
    if result.error:
        raise result.error
    result.checkpoint.to_directory(str(out_dir))
    final = json.loads((out_dir / "FINAL.json").read_text())
    for leftover in ("FINAL.json", "trainer_state.json", "optimizer.pt", "rng_state.pt"):
        (out_dir / leftover).unlink(missing_ok=True)
    return final


def merge_stage_fn(cfg, partition_dir: Path, experts_dir: Path, run_tag: str, log=print):
    def build(work: Path) -> dict:
        from lm_lexicon.moe import merge_experts

        manifest = json.loads((experts_dir / "manifest.json").read_text())
        expert_dirs = [experts_dir / j["name"] / "model" for j in manifest["jobs"] if j["domain"] is not None]
        if len(expert_dirs) < 1:
            raise ValueError(f"no experts in {experts_dir}")
        t0 = time.perf_counter()
        merged = merge_experts(expert_dirs, work / "merged", router=partition_dir / "router",
                               seed=cfg.partition.seed, **cfg.merge.model_dump(),
                               provenance={"partition": str(partition_dir), "experts": str(experts_dir)})
        merge_s = time.perf_counter() - t0
        log(f"[merge] {len(expert_dirs)} experts -> {Path(cfg.output_dir) / 'merge' / 'merged'} "
            f"({cfg.merge.routing} routing) in {merge_s:.1f}s")
        finetune = None
        if cfg.finetune.enabled:
            log(f"[merge] fine-tuning experts{'' if cfg.merge.routing == 'domain' else ' and gates'} on Ray Train")
            finetune = run_finetune(cfg, merged, partition_dir, work / "model", run_tag)
            shutil.copytree(merged / "router", work / "model" / "router", dirs_exist_ok=True)
            log(f"[merge] fine-tune: {finetune['steps']} steps, train loss {finetune['train_loss_first']:.3f} -> "
                f"{finetune['train_loss_last']:.3f}, valid loss "
                + (f"{finetune['valid_loss']:.3f}" if finetune.get("valid_loss") is not None else "n/a"))
        else:
            shutil.copytree(merged, work / "model")
        summary = {"routing": cfg.merge.routing, "n_experts": len(expert_dirs), "merge_seconds": round(merge_s, 2),
                   "finetune": finetune,
                   "config": {"merge": cfg.merge.model_dump(mode="json"),
                              "finetune": cfg.finetune.model_dump(mode="json")}}
        (work / "merge.json").write_text(json.dumps(summary, indent=2, default=str))
        return {k: summary[k] for k in ("routing", "n_experts", "merge_seconds", "finetune")}

    return build


def run_merge_stage(cfg, partition_result: StageResult, experts_result: StageResult, force: bool = False,
                    log=print) -> StageResult:
    fp = fingerprint(cfg, ("merge", "finetune"), (partition_result.fingerprint, experts_result.fingerprint))
    result = run_stage("merge", Path(cfg.output_dir) / "merge", fp,
                       merge_stage_fn(cfg, partition_result.path, experts_result.path, fp[:8], log), cfg, force, log)
    release_checkpoints(cfg, result, fp[:8], log)
    return result
