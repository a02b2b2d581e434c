"""The MoE's two stages.

**Merge** (paper §3.2-3.3): experts -> one sparse MoE, then a light router + expert fine-tune on Ray Train.

Writes::

    merge/
      merged/     the MoE straight from the merge (FFNs -> experts.{i}, everything else averaged) + router/
      model/      the fine-tuned MoE (attention, embeddings and norms frozen; experts and gates trained) + router/
      merge.json  policy, experts, trainable parameters, fine-tune metrics, config

With ``finetune.enabled: false``, ``model/`` is the merged MoE as is.

**Export**: what the ecosystem loads without this project's code.

* ``collapsed/`` (domain routing): one plain dense checkpoint per domain (shared weights + that domain's expert FFN)
  plus ``router/`` and ``collapsed.json`` — the serving layout (one deployment per domain), loadable by transformers
  or vLLM as is.
* ``mixtral/`` (token routing, Llama/Mistral family): a ``MixtralForCausalLM`` checkpoint.
* ``gguf/`` on request (``lm-lexicon export --format gguf``): :func:`export_gguf_files`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lm_lexicon.artifacts import StageResult, fingerprint, release_checkpoints, run_stage
from lm_lexicon.train.ray_worker import TrainJob, WorkerContext, collect_final_model, run_worker, torch_trainer


def _rows_with_domains(partition_dir: Path, split: str):
    from lm_lexicon.data.records import records_from_parquet
    from lm_lexicon.partition.stage import split_files

    files = [f for f in split_files(partition_dir, split) if f.exists()]
    return records_from_parquet(files) if files else ([], [])


def finetune_worker(loop_cfg: dict) -> None:
    """Ray Train worker: the merged MoE, shared weights frozen, experts (+ gates) trained on all domains."""
    run_worker(loop_cfg, _finetune_job)


def _finetune_job(ctx: WorkerContext) -> TrainJob:
    import torch

    from lm_lexicon.data.prompts import PromptTemplates
    from lm_lexicon.moe import load

    cfg = ctx.cfg
    loaded = load(ctx.loop_cfg["merged_dir"], load_router=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    trainable = model.set_trainable(experts=True, gates=None, shared=False)
    partition_dir = Path(ctx.loop_cfg["partition_dir"])
    train_rows, train_domains = _rows_with_domains(partition_dir, "train")
    valid_rows, valid_domains = _rows_with_domains(partition_dir, "valid")
    ft = cfg.finetune
    # trainable="all" keeps set_trainable's choice above (train.trainable selects the dense experts' tensors)
    train_cfg = cfg.train.model_copy(update={"epochs": ft.epochs, "max_steps": ft.max_steps, "lr": ft.lr,
                                             "batch_size": ft.batch_size, "seeds": [cfg.train.seeds[0]],
                                             "eval_every": max(1, ft.max_steps or 10**9), "trainable": "all",
                                             "gradient_checkpointing": False})
    return TrainJob("fine-tune", model, tokenizer, train_rows, valid_rows, train_cfg,
                    # the experts' templates (merge_experts checked that they agree), saved with the merged model
                    templates=PromptTemplates.load(ctx.loop_cfg["merged_dir"]),
                    train_kwargs={"train_domains": train_domains, "valid_domains": valid_domains},
                    ddp_kwargs={"find_unused_parameters": True},  # experts with no sequence in a batch get no grad
                    final_extras=lambda metrics: {"trainable_parameters": trainable,
                                                  "torch_threads": torch.get_num_threads()})


def run_finetune(cfg, merged_dir: Path, partition_dir: Path, out_dir: Path, run_tag: str) -> dict:
    """One Ray Train run (``workers_per_expert`` workers) fine-tuning the merged MoE; the result lands in out_dir."""
    import os

    from lm_lexicon.console import RemoteBars
    from lm_lexicon.ray_utils import init_ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    init_ray(cfg.resources)
    res = cfg.resources
    storage = res.storage_path if "://" in res.storage_path else str(Path(res.storage_path).resolve())
    bars = RemoteBars(["fine-tune"], unit="steps")  # a per-step bar fed by the rank-0 worker
    loop_cfg = {"cfg": cfg.model_dump(mode="json"), "merged_dir": str(merged_dir.resolve()),
                "partition_dir": str(partition_dir.resolve()), "progress": bars.address,
                "torch_threads": finetune_torch_threads(res)}
    trainer = torch_trainer(finetune_worker, loop_cfg, res.model_dump(mode="json"),
                            f"{cfg.name}-moe-finetune-{run_tag}", storage)
    try:
        result = trainer.fit()
    finally:
        bars.close()
    if result.error:
        raise result.error
    return collect_final_model(result.checkpoint, out_dir)


def finetune_torch_threads(resources_cfg, node_cpus: float | None = None, nodes: int | None = None) -> int:
    """Torch threads of each fine-tune worker. The fine-tune runs alone, unlike the expert jobs that share the
    machine: on one CPU-only node its workers split all of the node's CPUs (with ``cpus_per_worker: 1`` a 2-core
    laptop would leave a core idle). The count comes from the node's size, not from what is free at the moment, so
    a resumed run computes exactly what an uninterrupted one does; the Ray reservation stays ``cpus_per_worker``.
    On a multi-node cluster or with GPUs the recipe's ``cpus_per_worker`` stands."""
    recipe = max(1, int(resources_cfg.cpus_per_worker))
    if resources_cfg.use_gpu:
        return recipe
    if nodes is None or node_cpus is None:
        import ray

        alive = [node for node in ray.nodes() if node.get("Alive")]
        nodes, node_cpus = len(alive), (alive[0].get("Resources", {}).get("CPU", 0.0) if alive else 0.0)
    return recipe if nodes != 1 else max(recipe, int(node_cpus // resources_cfg.workers_per_expert))


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


# =================================================================================================== export
def export_model(moe_dir: Path, out_dir: Path, routing: str, log=print, final_dir: Path | None = None) -> dict:
    from lm_lexicon.moe import export_collapsed, export_mixtral

    written = {}
    if routing == "domain":
        export_collapsed(moe_dir, out_dir / "collapsed")
        written["collapsed"] = str(out_dir / "collapsed")
    elif routing == "token":
        try:
            export_mixtral(moe_dir, out_dir / "mixtral")
            written["mixtral"] = str(out_dir / "mixtral")
        except ValueError as e:  # e.g. a BERT-family seed: no Mixtral equivalent
            written["mixtral_skipped"] = str(e)
    else:
        written["skipped"] = f"no standard export for {routing!r} routing; load the MoE with lm_lexicon.moe.load"
    final = str(final_dir or out_dir)  # record and log where it will be once the stage is finished, not the work dir
    written = {k: v.replace(str(out_dir), final) if k in ("collapsed", "mixtral") else v for k, v in written.items()}
    for kind, path in written.items():
        log(f"[export] {kind}: {path}")
    (out_dir / "export.json").write_text(json.dumps({"routing": routing, **written}, indent=2))
    return written


def run_export_stage(cfg, merge_result: StageResult, force: bool = False, log=print) -> StageResult:
    fp = fingerprint(cfg, (), (merge_result.fingerprint,))
    return run_stage("export", Path(cfg.output_dir) / "export", fp,
                     lambda work: export_model(merge_result.path / "model", work, cfg.merge.routing, log,
                                               final_dir=Path(cfg.output_dir) / "export"),
                     cfg, force, log)


def gguf_metadata_source(cfg, metadata_from: Path | None = None) -> Path:
    """The GGUF whose tokenizer the run's GGUF files reuse: ``metadata_from`` if given, else the seed's own GGUF
    (``bundled-smollm2``); a seed that did not come from a GGUF needs ``metadata_from``."""
    from lm_lexicon.seed_models import SEED_SMOLLM2, smollm2_gguf_path

    if metadata_from is not None:
        if not Path(metadata_from).is_file():
            raise FileNotFoundError(f"--gguf-metadata {metadata_from}: no such file")
        return Path(metadata_from)
    if cfg.seed_model.name == SEED_SMOLLM2:
        return smollm2_gguf_path()
    raise ValueError(f"the seed {cfg.seed_model.name!r} did not come from a GGUF file, so there is no tokenizer "
                     "metadata to reuse: pass --gguf-metadata FILE.gguf (any GGUF of the same base model, any "
                     "quantisation; its vocabulary is checked against the experts' tokenizer)")


def export_gguf_files(cfg, export_dir: Path, *, dtype: str = "bf16", metadata_from: Path | None = None,
                      overwrite: bool = True, log=print) -> dict:
    """Write ``<export_dir>/gguf`` from the finished export stage's ``collapsed/`` (domain routing only), with the
    experts' prompt templates (saved with them) and the evaluate section's decoding settings, greedy (GGUF runtimes
    have no beam search; the bundle records ``evaluate.num_beams``)."""
    from lm_lexicon.moe.gguf_bundle import export_gguf

    if cfg.merge.routing != "domain":
        raise ValueError(f"GGUF files are made per domain, from the collapsed export of a domain-routed run; this run "
                         f"routes by {cfg.merge.routing!r}")
    ev = cfg.evaluate
    generation = {"max_new_tokens": ev.max_new_tokens, "repetition_penalty": ev.repetition_penalty,
                  "no_repeat_ngram_size": ev.no_repeat_ngram_size}
    return export_gguf(Path(export_dir) / "collapsed", Path(export_dir) / "gguf",
                       metadata_source=gguf_metadata_source(cfg, metadata_from), dtype=dtype,
                       generation=generation, evaluated_num_beams=ev.num_beams, overwrite=overwrite, log=log)
