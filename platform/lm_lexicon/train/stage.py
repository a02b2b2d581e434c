"""Expert stage (paper §3.1, "branch training"): one expert per domain, plus the dense baseline, on Ray Train.

Every model is one Ray Train V2 ``TorchTrainer`` launched from a Ray Tune function trainable that grids over the jobs
(``expert_0`` ... ``expert_{N-1}``, ``dense``). Tune runs as many at once as the cluster's resources allow (or
``resources.max_concurrent_experts``): all N in parallel on a GPU cluster, one or two at a time on a laptop, never a
deadlock, because a trial reserves almost nothing itself and its trainer asks for the workers.

Run names are deterministic (``<recipe>-<job>-<fingerprint>``): re-running the stage after a crash or a kill resumes
each job from its last checkpoint under ``resources.storage_path``; a changed config gets new names and starts fresh.

On GPUs a recipe with ``train.deepspeed`` trains each job through a DeepSpeed ZeRO engine instead of DDP: the driver
resolves the DeepSpeed JSON against the recipe once (world size = ``workers_per_expert``) and ships the dict to the
workers, which hand the bare model to :func:`lm_lexicon.train.train` (see
:class:`lm_lexicon.train.deepspeed_strategy.DeepSpeedStrategy`). Every worker then reports its own checkpoint
directory (its ZeRO shard; rank 0 adds the safetensors weights), and Ray Train stores the shards of one report side
by side. The worker itself is the shared scaffold :func:`lm_lexicon.train.ray_worker.run_worker`.

Writes::

    experts/
      expert_{i}/model/  dense/model/    safetensors + config + tokenizer (the final, best-by-validation model)
      expert_{i}/metrics.json ...        training metrics and history
      manifest.json                      jobs, domains, sizes, metrics, own-domain validation table, config
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import ray.tune

from lm_lexicon.distributed import deepspeed_enabled, resolve_deepspeed_config
from lm_lexicon.artifacts import StageResult, fingerprint, release_checkpoints, run_stage
from lm_lexicon.train.ray_worker import FINAL_MARKER  # noqa: F401  (the final model's marker, named from here too)
from lm_lexicon.train.ray_worker import (FAIL_ONCE_ENV, TrainJob, WorkerContext, collect_final_model, run_worker,
                                         torch_trainer)

TRIAL_CPUS = 0.01  # what a job's Tune trial (which only waits on its TorchTrainer) reserves; Tune needs some


def _job_records(partition_dir: Path, job: dict, split: str):
    """Training rows of a job (its domain, or every domain for the dense model) and its validation rows."""
    from lm_lexicon.data.records import records_from_parquet
    from lm_lexicon.partition.stage import split_files

    if split == "train":
        files = (split_files(partition_dir, split) if job["domain"] is None
                 else [partition_dir / f"domain_{job['domain']}.parquet"])
        return records_from_parquet(files)[0]
    path = partition_dir / f"{split}.parquet"
    if not path.exists():
        return []
    return records_from_parquet([path], domain=job["domain"])[0]


def train_worker(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker of one job: the seed, trained on the job's rows (scaffold: run_worker)."""
    run_worker(loop_cfg, _expert_job)


def _expert_job(ctx: WorkerContext) -> TrainJob:
    """The job's rows and the seed model; a domain expert's epochs scaled to the dense model's steps if asked."""
    from lm_lexicon.data.prompts import PromptTemplates
    from lm_lexicon.seed_models import load_seed_model
    from lm_lexicon.train import read_trainer_state

    cfg, job = ctx.cfg, ctx.loop_cfg["job"]
    partition_dir = Path(ctx.loop_cfg["partition_dir"])
    train_rows = _job_records(partition_dir, job, "train")
    valid_rows = _job_records(partition_dir, job, "valid")
    train_cfg = cfg.train
    if job["domain"] is not None and cfg.train.expert_budget == "steps" and not cfg.train.max_steps:
        all_rows = len(_job_records(partition_dir, {"domain": None}, "train"))
        train_cfg = cfg.train.model_copy(update={"epochs": cfg.train.epochs * all_rows / len(train_rows)})
    model, tokenizer = load_seed_model(cfg.seed_model, dropout=cfg.train.dropout)

    def final_extras(metrics: dict) -> dict:
        history = read_trainer_state(metrics["checkpoint_dir"])["history"] if metrics["checkpoint_dir"] else []
        return {"job": job["name"], "domain": job["domain"], "resumed_from_step": ctx.resumed_step,
                "history": history}

    return TrainJob(job["name"], model, tokenizer, train_rows, valid_rows, train_cfg,
                    templates=PromptTemplates.from_config(cfg),  # the seed has none: the recipe's
                    tags={"job": job["name"], "resumed_from_step": ctx.resumed_step}, final_extras=final_extras)


def _trainer_for(job: dict, loop_cfg: dict, run_name: str):
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    callbacks = []
    if _in_tune_session():
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    # the job's Tune trial holds TRIAL_CPUS: the workers take that much less, so a job costs exactly
    # workers_per_expert x cpus_per_worker and max_concurrent() jobs really fit (2 CPUs: 2 jobs, not 1)
    return torch_trainer(train_worker, {**loop_cfg, "job": job}, loop_cfg["resources"], run_name,
                         loop_cfg["storage_path"], cpu_discount=TRIAL_CPUS, callbacks=callbacks)


def expert_trial(config: dict) -> dict:
    """Ray Tune function trainable: trains one job with its own TorchTrainer and copies the final model out."""
    job = config["job"]
    loop_cfg = config["loop_cfg"]
    run_name = f"{config['recipe']}-{job['name']}-{config['run_tag']}"
    result = _trainer_for(job, loop_cfg, run_name).fit()
    if result.error:  # reported, not raised: Tune retries only trials whose node died, not a failed training
        return {"job_error": f"{type(result.error).__name__}: {result.error}"}
    target = Path(loop_cfg["stage_dir"]) / job["name"]
    if target.exists():
        shutil.rmtree(target)
    final = collect_final_model(result.checkpoint, target / "model")
    (target / "metrics.json").write_text(json.dumps(final, indent=2, default=str))
    return {k: v for k, v in final.items() if isinstance(v, (int, float, str, bool)) or v is None}


def expert_trial_dirname(trial) -> str:
    """``expert_2-<trial id>`` (Tune's default spells out the whole job dict)."""
    return f"{trial.config['job']['name']}-{trial.trial_id}"


def plan_jobs(n_experts: int, with_dense: bool = True) -> list[dict]:
    """The stage's jobs, the dense baseline first: it trains on all N domains, as long as the N experts together,
    so with two jobs at a time it runs beside the experts in turn instead of after them (1.5x shorter at N=4)."""
    jobs = [{"name": "dense", "domain": None}] if with_dense else []
    return jobs + [{"name": f"expert_{i}", "domain": i} for i in range(n_experts)]


def max_concurrent(resources_cfg, cluster: dict) -> int:
    """Jobs trained at once: ``resources.max_concurrent_experts`` when set, else the cluster's CPUs (GPUs, custom
    worker resources) now divided by one job's reservation, at least 1.

    The explicit value is not capped by the resources present: on an autoscaling cluster the training nodes do not
    exist yet when the stage starts (cluster.yaml's worker types start at 0), and the trainers' pending resource
    requests are what makes the autoscaler start them. A trial reserves almost nothing (``TRIAL_CPUS``) and a
    trainer's workers are placed all at once (one placement group), so jobs beyond what fits wait, never deadlock."""
    if resources_cfg.max_concurrent_experts:
        return resources_cfg.max_concurrent_experts
    per_job_cpu = resources_cfg.workers_per_expert * resources_cfg.cpus_per_worker
    fits = int(cluster.get("CPU", 1) // per_job_cpu)
    if resources_cfg.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0) // (resources_cfg.workers_per_expert * resources_cfg.gpus_per_worker)))
    for name, amount in resources_cfg.worker_resources.items():
        fits = min(fits, int(cluster.get(name, 0) // (resources_cfg.workers_per_expert * amount)))
    return max(1, fits)


_LOG_SINKS: dict[str, object] = {}  # the driver's log functions, by id: Tune pickles callbacks, not their sinks


class ExpertProgress(ray.tune.Callback):
    """One line per reported evaluation of each job, so a user sees every expert move (workers' logs stay quiet)."""

    def __init__(self, log, n_jobs: int):
        self.sink_id, self.n_jobs = f"experts-{id(log)}", n_jobs
        _LOG_SINKS[self.sink_id] = log

    def _log(self, message: str) -> None:
        _LOG_SINKS.get(self.sink_id, print)(message)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "step" not in result:
            return
        parts = [f"step {int(result['step'])}"]
        if result.get("total_steps"):
            parts[0] += f"/{int(result['total_steps'])}"
        for key in ("train_loss", "valid_loss"):
            if isinstance(result.get(key), (int, float)):
                parts.append(f"{key} {result[key]:.3f}")
        if isinstance(result.get("tokens_per_s"), (int, float)):
            parts.append(f"{result['tokens_per_s']:.0f} tok/s")
        self._log(f"[experts] {trial.config['job']['name']}: " + ", ".join(parts)
                  + (" (final)" if result.get("final") else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = sum(t.status == "TERMINATED" for t in trials) + 1
        self._log(f"[experts] {trial.config['job']['name']} finished ({min(done, self.n_jobs)}/{self.n_jobs})")


def worker_loop_config(cfg, partition_dir: Path, stage_dir: Path, storage: str) -> dict:
    """What every Ray Train worker of the stage receives (plus its job). With DeepSpeed on GPUs it carries the
    DeepSpeed config, resolved here on the driver (relative paths resolve against the job's working directory) for
    ``workers_per_expert`` ranks, so a bad config fails before any GPU node starts."""
    loop_cfg = {"cfg": cfg.model_dump(mode="json"), "partition_dir": str(partition_dir.resolve()),
                "stage_dir": str(stage_dir.resolve()), "storage_path": storage,
                "resources": cfg.resources.model_dump(mode="json"),
                # read on the driver: workers do not see env vars set after Ray started
                "fail_once": os.environ.get(FAIL_ONCE_ENV)}
    if deepspeed_enabled(cfg):
        loop_cfg["deepspeed"] = resolve_deepspeed_config(cfg.train.deepspeed, cfg.train,
                                                         world_size=cfg.resources.workers_per_expert)
    return loop_cfg


def run_jobs(cfg, jobs: list[dict], partition_dir: Path, stage_dir: Path, run_tag: str, log=print) -> dict:
    """Train ``jobs`` through Ray Tune (one TorchTrainer each); returns final metrics by job name."""
    import ray.tune

    from lm_lexicon.ray_utils import init_ray
    from lm_lexicon.seed_models import resolve_seed_model

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    cluster = init_ray(cfg.resources)
    resolve_seed_model(cfg.seed_model.name)  # build/cache the seed once here, not in N racing workers
    storage = cfg.resources.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    loop_cfg = worker_loop_config(cfg, partition_dir, stage_dir, storage)
    from lm_lexicon.console import RemoteBars

    bars = RemoteBars([j["name"] for j in jobs], unit="steps")  # per-step bars fed by the workers
    loop_cfg["progress"] = bars.address
    concurrency = max_concurrent(cfg.resources, cluster)
    log(f"[experts] {len(jobs)} jobs ({', '.join(j['name'] for j in jobs)}); {concurrency} at a time; "
        f"checkpoints under {storage}")
    if not cfg.resources.use_gpu and len(ray.nodes()) == 1:  # the workers share this machine's CPU
        log(f"[experts] {cpu_precision_note(cfg.train.precision)}")
    param_space = {"job": ray.tune.grid_search(jobs), "loop_cfg": loop_cfg, "recipe": cfg.name, "run_tag": run_tag}
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(expert_trial, {"cpu": TRIAL_CPUS}),  # the trainer's workers hold the rest
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency,
                                        trial_dirname_creator=expert_trial_dirname),
        run_config=ray.tune.RunConfig(name=f"{cfg.name}-experts-{run_tag}", storage_path=storage, verbose=0,
                                      callbacks=[ExpertProgress(log, len(jobs))],
                                      # the trial's own node may die too (its trainer's workers are retried by
                                      # Ray Train): the trial then starts again and its trainer resumes from the
                                      # job's last checkpoint (same run name, same storage)
                                      failure_config=ray.tune.FailureConfig(max_failures=cfg.resources.max_failures)),
    )
    try:
        grid = tuner.fit()
    finally:
        bars.close()
    return finished_jobs(grid, jobs, stage_dir)


def cpu_precision_note(precision: str) -> str:
    """What the training precision resolves to on this CPU, and why when bf16 is not used."""
    import torch

    from lm_lexicon.train import resolve_precision
    from lm_lexicon.train.precision import cpu_supports_bf16

    chosen = resolve_precision(precision, torch.device("cpu"))
    if chosen == "bf16":
        return "precision bf16 autocast" + (" (native bf16 on this CPU)" if cpu_supports_bf16() else "")
    if precision == "auto":
        return ("precision fp32: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast would be "
                "slower, not faster; expect about 3x the training time of a CPU that has it (docs/BENCHMARKS.md)")
    return "precision fp32"


def finished_jobs(grid, jobs: list[dict], stage_dir: Path) -> dict:
    """Final metrics by job name from Tune's results; raises when a job failed or ended without its model.

    The second case is an interrupted Tune run (a stop signal it handled itself): it returns normally, and the
    stage must not go on to read models that were never written."""
    def name(result) -> str:  # a trial that failed before it started has no config
        return ((result.config or {}).get("job") or {}).get("name", "a trial that did not start")

    failed = [(name(r), r.error or r.metrics.get("job_error")) for r in grid
              if r.error or (r.metrics or {}).get("job_error")]
    if failed:
        raise RuntimeError("expert training failed: " + "; ".join(f"{n}: {e}" for n, e in failed))
    unfinished = [j["name"] for j in jobs if not (Path(stage_dir) / j["name"] / "model").is_dir()]
    if unfinished:
        raise RuntimeError(f"expert training stopped before {', '.join(unfinished)} finished; running the same "
                           "command again resumes them from their last checkpoints")
    return {name(r): r.metrics for r in grid}


def token_budget(final: dict) -> dict:
    """What one job trained on: rows, steps, passes, and tokens seen (all / definition targets)."""
    epochs = float(final.get("epochs_done") or 0.0)
    return {"rows": int(final.get("n_train") or 0), "steps": int(final.get("steps") or 0), "epochs": epochs,
            "tokens": int(round(epochs * (final.get("dataset_tokens") or 0))),
            "target_tokens": int(round(epochs * (final.get("dataset_target_tokens") or 0)))}


def own_domain_losses(cfg, stage_dir: Path, partition_dir: Path, jobs: list[dict], device: str = "cpu") -> list[dict]:
    """Validation loss of each expert on its own domain's rows beside the dense model's loss on the same rows.

    ``device="cuda"``: the models load in ``seed_model.dtype`` on the GPU (the stage runs this in a one-GPU Ray task
    when ``resources.use_gpu``: 8B models cannot be scored on the driver's CPU)."""
    import torch

    from lm_lexicon.data.prompts import PromptTemplates
    from lm_lexicon.seed_models import load_causal_lm
    from lm_lexicon.train import evaluate_loss, resolve_precision

    on_gpu = device != "cpu"
    if not on_gpu:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    precision = resolve_precision(cfg.train.precision, torch.device(device))

    def load(path: Path):
        if not on_gpu:
            return load_causal_lm(path)
        model, tok = load_causal_lm(path, dtype=cfg.seed_model.dtype)
        return model.to(device), tok

    # one model in memory at a time (two 8B models do not fit a 24 GB GPU): the experts first, then the dense model
    rows, valid_rows = [], []
    for job in jobs:
        if job["domain"] is None:
            continue
        valid = _job_records(partition_dir, job, "valid")
        if not valid:
            continue
        model, tok = load(stage_dir / job["name"] / "model")
        rows.append({"domain": job["domain"], "n_valid": len(valid),
                     "expert_loss": evaluate_loss(model, tok, valid, max_length=cfg.train.max_length,
                                                  batch_size=cfg.train.batch_size, precision=precision,
                                                  templates=PromptTemplates.load(stage_dir / job["name"] / "model"))})
        valid_rows.append(valid)
        del model
    if (stage_dir / "dense" / "model").exists():
        dense, tok = load(stage_dir / "dense" / "model")
        for row, valid in zip(rows, valid_rows):
            row["dense_loss"] = evaluate_loss(dense, tok, valid, max_length=cfg.train.max_length,
                                              batch_size=cfg.train.batch_size, precision=precision,
                                              templates=PromptTemplates.load(stage_dir / "dense" / "model"))
            row["expert_better"] = row["expert_loss"] < row["dense_loss"]
        del dense
    return rows


def experts_stage_fn(cfg, partition_dir: Path, run_tag: str, with_dense: bool = True, log=print):
    def build(work: Path) -> dict:
        from lm_lexicon.tracking import tracked_run

        partition = json.loads((partition_dir / "partition.json").read_text())
        jobs = plan_jobs(partition["n_experts"], with_dense)
        t0 = time.perf_counter()
        finals = run_jobs(cfg, jobs, partition_dir, work, run_tag, log)
        seconds = time.perf_counter() - t0
        if cfg.resources.use_gpu:
            import ray

            task = ray.remote(num_gpus=1, num_cpus=1)(own_domain_losses)
            comparison = ray.get(task.remote(cfg, work, partition_dir, jobs, "cuda"))
        else:
            comparison = own_domain_losses(cfg, work, partition_dir, jobs)
        for job in jobs:
            metrics = json.loads((work / job["name"] / "metrics.json").read_text())
            with tracked_run(cfg.tracking, cfg.output_dir, f"{cfg.name}-{job['name']}",
                             tags={"stage": "experts", "job": job["name"]}) as run:
                run.log_params({"job": job, "seed_model": cfg.seed_model.model_dump(mode="json"),
                                "train": cfg.train.model_dump(mode="json")})
                for h in metrics.get("history") or []:
                    run.log_metrics({k: v for k, v in h.items() if k != "step"}, step=int(h["step"]))
                run.log_metrics({k: v for k, v in metrics.items() if k != "history"})
                run.log_artifact(work / job["name"] / "metrics.json")
        budgets = {name: token_budget(final) for name, final in finals.items()}
        for name, budget in budgets.items():
            log(f"[experts] {name}: {budget['rows']} rows, {budget['steps']} steps, {budget['epochs']:.2f} epochs, "
                f"{budget['tokens']:,} tokens ({budget['target_tokens']:,} definition tokens)")
        manifest = {"jobs": jobs, "sizes": partition["sizes"], "seed_model": cfg.seed_model.name,
                    "token_budget": budgets,
                    "wall_seconds": round(seconds, 1), "final": finals, "own_domain_validation": comparison,
                    "config": {"train": cfg.train.model_dump(mode="json"),
                               "resources": cfg.resources.model_dump(mode="json")}}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        for row in comparison:
            log(f"[experts] domain {row['domain']}: expert valid loss {row['expert_loss']:.3f}"
                + (f" vs dense {row['dense_loss']:.3f}" if "dense_loss" in row else ""))
        return {"jobs": [j["name"] for j in jobs], "wall_seconds": round(seconds, 1),
                "own_domain_validation": comparison}

    return build


def run_experts_stage(cfg, partition_result: StageResult, force: bool = False, log=print) -> StageResult:
    upstream = [partition_result.fingerprint]
    if cfg.train.deepspeed and Path(cfg.train.deepspeed).is_file():
        from lm_lexicon._util import sha256_file

        upstream.append(sha256_file(cfg.train.deepspeed))  # the JSON's contents, not only its path, define the run
    fp = fingerprint(cfg, ("seed_model", "train"), tuple(upstream))
    result = run_stage("experts", Path(cfg.output_dir) / "experts", fp,
                       experts_stage_fn(cfg, partition_result.path, fp[:8], with_dense=cfg.train.dense_baseline,
                                        log=log), cfg, force, log)
    release_checkpoints(cfg, result, fp[:8], log)
    return result
