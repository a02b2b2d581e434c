"""Partition stage (paper §3.1): embed every prompt on Ray Data, split the training data into N balanced domains.

Reads the data stage (``{split}.jsonl``) and writes::

    partition/
      domain_{i}.parquet        training rows of domain i (with a ``domain`` column)
      valid.parquet test.parquet  held-out rows with the domain the router gives them
      router/                   centroids + biases (+ lexical featurizer) and the embedder spec: the domain router
      embeddings.npy            [n_train, d] prompt embeddings (float32, unit rows), row order of train.jsonl
      partition.json            manifest: method, N, sizes, embedder, seed, timings, config
      cluster_report.{md,json}, clusters.png   cohesion / separation tables (paper Tables 7/8) and the 2-D plot

By default (``partition.features: prompt``) the features are the embeddings of ``prompt(context, term)``: the router
computes the same features at test time, when there is no definition, and reproduces the training labels exactly.
With ``definition`` (or ``prompt+definition``) the clusters are made of the gold definitions' embeddings (or both),
which a prompt cannot reproduce; the router is then a prompt -> domain classifier, and ``partition.json`` reports
its accuracy on the validation rows (whose domain the clustering rule gives from their definitions).
``partition.json`` and the cluster report also give the domains' purity and NMI against each row's ``source`` and
``genre``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lm_lexicon.artifacts import StageResult, fingerprint, run_stage


class RayEmbedder:
    """The :class:`~lm_lexicon.partition.embed.Embedder` as a Ray Data actor, with the torch thread count set per actor.

    Ray sets ``OMP_NUM_THREADS`` to the actor's CPU reservation; an actor that reserves one CPU of two on a laptop
    still wants both cores for the matrix multiplies while Ray Data's reads are idle.
    """

    def __init__(self, torch_threads: int | None = None, **embedder_kwargs):
        import torch

        from lm_lexicon.partition.embed import Embedder


        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.embedder = Embedder(**embedder_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"row": batch["row"], "embedding": self.embedder.encode(batch["prompt"])}


def embed_on_ray(prompts: list[str], embed_cfg, torch_threads: int | None = None,
                 cpus_per_actor: float = 1.0, label: str = "embedding prompts") -> np.ndarray:
    """Embed ``prompts`` with an actor pool on Ray Data; returns ``[n, d]`` in input order.

    Rows carry their index through the map because Ray Data does not promise output order.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    if not prompts:
        raise ValueError("no prompts to embed")
    # Sorting by length once here makes every batch a run of similar lengths (less padding), across actors too.
    order = np.argsort([len(p) for p in prompts], kind="stable")
    items = [{"row": int(i), "prompt": prompts[i]} for i in order]
    block_rows = max(embed_cfg.batch_size * 4, 256)
    blocks = max(embed_cfg.num_actors, min(64, len(items) // block_rows))  # at least one block per actor
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(blocks, len(items))))
    ds = ds.map_batches(
        RayEmbedder,
        fn_constructor_kwargs=dict(torch_threads=torch_threads, model=embed_cfg.model,
                                   batch_size=embed_cfg.batch_size, max_length=embed_cfg.max_length,
                                   device="cuda" if embed_cfg.num_gpus_per_actor > 0 else "cpu"),
        batch_size=embed_cfg.batch_size * 4,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=embed_cfg.num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=embed_cfg.num_gpus_per_actor or None,
    )
    from lm_lexicon.console import bar

    out: np.ndarray | None = None
    seen = 0
    with bar(label, total=len(prompts), unit="rows") as progress:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            emb = batch["embedding"]
            if out is None:
                out = np.empty((len(prompts), emb.shape[1]), dtype=np.float32)
            out[batch["row"]] = emb
            seen += len(batch["row"])
            progress.advance(len(batch["row"]))
    if seen != len(prompts):
        raise RuntimeError(f"Ray Data returned {seen} embeddings for {len(prompts)} prompts")
    return out


def split_files(partition_dir: Path, split: str) -> list[Path]:
    """Where a split's rows are (:func:`~lm_lexicon.data.records.records_from_parquet` reads them): train's in one
    file per domain, valid's and test's in one file."""
    return sorted(partition_dir.glob("domain_*.parquet")) if split == "train" else [partition_dir / f"{split}.parquet"]


def _actor_threads(resources, num_actors: int) -> tuple[int | None, float]:
    """(torch threads, CPUs reserved) for one embedding actor.

    Locally the cores are shared out among the actors, one thread per reserved CPU: measured on 2 cores, two
    single-thread actors run at 0.87x a plain 2-thread loop, one 2-thread actor at 0.74x (bench/embed.py).
    On a cluster each actor reserves one CPU and keeps Ray's thread setting.
    """
    import os

    import ray

    if resources.ray_address or os.environ.get("RAY_ADDRESS"):
        return None, 1.0
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(total, os.cpu_count() or 1) // max(1, num_actors)), 1.0


def partition_stage_fn(cfg, data_dir: Path, log=print):
    """The stage body: ``fn(work_dir) -> summary`` for :func:`run_stage`."""

    def build(work: Path) -> dict:
        from lm_lexicon.partition import cluster_report
        from lm_lexicon.data.corpus import read_saved_corpus
        from lm_lexicon.data.prompts import PromptTemplates, record_prompt
        from lm_lexicon.data.records import write_parquet
        from lm_lexicon.partition.clustering import label_agreement, partition
        from lm_lexicon.ray_utils import init_ray, quiet_ray_data

        splits = read_saved_corpus(data_dir)
        train = splits.get("train", [])
        pc = cfg.partition
        if len(train) == 0:
            raise ValueError(f"the training split in {data_dir} is empty: nothing to partition")
        if len(train) == 1:
            raise ValueError(f"the training split in {data_dir} has one row: cannot form domains from one example")
        n_clusters = 1 if pc.method == "none" else pc.n_experts
        if n_clusters > len(train):
            raise ValueError(f"partition.n_experts={n_clusters} is larger than the {len(train)} training rows")

        held_out = {s: rows for s, rows in splits.items() if s != "train" and rows}
        templates = PromptTemplates.from_config(cfg)
        texts = {("prompt", s): [record_prompt(r, templates) for r in rows]
                 for s, rows in [("train", train), *held_out.items()]}
        if pc.features != "prompt":  # the validation definitions give the classifier's held-out answers
            texts.update({("definition", s): [r.definition for r in rows]
                          for s, rows in [("train", train), *held_out.items()] if s in ("train", "valid")})
        prompts = {s: texts[("prompt", s)] for kind, s in texts if kind == "prompt"}
        flat = [t for key in texts for t in texts[key]]

        init_ray(cfg.resources)
        quiet_ray_data()
        threads, cpus = _actor_threads(cfg.resources, cfg.embed.num_actors)
        t0 = time.perf_counter()
        what = "prompts" if pc.features == "prompt" else "prompts and definitions"
        log(f"[partition] embedding {len(flat):,} {what} with {cfg.embed.model} on Ray Data "
            f"({cfg.embed.num_actors} actor(s))")
        emb_all = embed_on_ray(flat, cfg.embed, torch_threads=threads, cpus_per_actor=cpus, label=f"embedding {what}")
        embed_s = time.perf_counter() - t0
        embedded, start = {}, 0
        for key in texts:
            embedded[key] = emb_all[start:start + len(texts[key])]
            start += len(texts[key])
        emb = {s: embedded[("prompt", s)] for s in prompts}  # prompt embeddings: what the router sees

        t1 = time.perf_counter()
        if pc.method == "lexical":
            features = prompts["train"]
        else:
            features = _cluster_features(pc.features, embedded, "train")
        result = partition(features, pc.method, n_clusters, pc.slack, pc.seed)
        cluster_s = time.perf_counter() - t1
        labels = result.labels

        # The router that training, evaluation and serving use; for the lexical method it carries its featurizer,
        # for definition features it is a prompt -> domain classifier.
        if pc.features == "prompt":
            router, classifier_report = result.router(), None
        else:
            router, classifier_report = _classifier_router(pc, result, embedded, log)
        if pc.method != "lexical":
            router.meta["embedder"] = {"model_id": cfg.embed.model, "kind": "Embedder", "pooling": "mean",
                                       "max_length": cfg.embed.max_length}
        router.save(work / "router")
        templates.save(work / "router")  # the router places prompts built with these templates

        def route(split: str) -> np.ndarray:
            if pc.method == "lexical":
                return router.route_embeddings(result.featurizer.encode(prompts[split]))
            return router.route_embeddings(emb[split])

        reproduced = float((route("train") == labels).mean()) if result.routable else None
        np.save(work / "embeddings.npy", emb["train"])
        sizes = np.bincount(labels, minlength=n_clusters)
        for d in range(n_clusters):
            idx = np.flatnonzero(labels == d)
            write_parquet([train[i] for i in idx], labels[idx], work / f"domain_{d}.parquet")
        held_out_sizes = {}
        for s in held_out:
            dom = route(s) if result.routable else np.zeros(len(held_out[s]), dtype=np.int64)
            write_parquet(held_out[s], dom, work / f"{s}.parquet")
            held_out_sizes[s] = np.bincount(dom, minlength=n_clusters).tolist()

        agreement = {"source": label_agreement(labels, [r.source for r in train]),
                     "genre": label_agreement(labels, [r.genre for r in train])}
        report = cluster_report.write_report(
            work, emb["train"], labels, cluster_report_centroids(emb["train"], labels, n_clusters),
            terms=[r.term for r in train], sources=[r.source for r in train], sample=pc.plot_sample, seed=pc.seed,
            summary={"method": pc.method, "n_experts": n_clusters, "embedder": cfg.embed.model,
                     "features": pc.features, "agreement": agreement, "classifier": classifier_report})
        _append_agreement(work / "cluster_report.md", agreement, classifier_report)
        quality = report["quality"]
        feature_space = None
        if pc.features != "prompt":  # the report is in prompt space (comparable across arms); this is their own
            q = cluster_report.cohesion_separation(features, labels, result.centroids)
            feature_space = {"cohesion_mean": q.mean_cohesion, "separation_mean": q.mean_separation}
        manifest = {
            "method": pc.method, "n_experts": n_clusters, "slack": pc.slack, "seed": pc.seed,
            "sizes": sizes.tolist(), "size_bounds": list(result.size_bounds), "held_out_sizes": held_out_sizes,
            "embedder": {"model": cfg.embed.model, "dim": int(emb_all.shape[1]), "max_length": cfg.embed.max_length,
                         "pooling": "mean"},
            "features": "lexical TF-IDF + SVD" if pc.method == "lexical" else FEATURE_NAMES[pc.features],
            "router_reproduces_train_labels": reproduced,
            "classifier": classifier_report,
            "margin": result.summary()["margin"],
            "cohesion_mean": quality.mean_cohesion, "separation_mean": quality.mean_separation,
            "feature_space": feature_space,
            "agreement": {key: {m: a[m] for m in ("purity", "nmi", "majority_share", "n_categories")}
                          for key, a in agreement.items()},
            "timings": {"embed_s": round(embed_s, 2), "cluster_s": round(cluster_s, 2),
                        "prompts_per_s": round(len(flat) / max(embed_s, 1e-9), 1), **result.timings},
            "config": {"partition": pc.model_dump(mode="json"), "embed": cfg.embed.model_dump(mode="json")},
        }
        (work / "partition.json").write_text(json.dumps(_json_safe(manifest), indent=2))
        log(f"[partition] {pc.method}, N={n_clusters}: sizes {sizes.tolist()} "
            f"(bounds {list(result.size_bounds)}); embed {embed_s:.1f}s, cluster {cluster_s:.1f}s; "
            f"router reproduces train labels: {reproduced}")
        return {k: manifest[k] for k in ("method", "n_experts", "sizes", "router_reproduces_train_labels",
                                         "cohesion_mean", "separation_mean", "agreement", "timings")}

    return build


FEATURE_NAMES = {"prompt": "prompt embeddings", "definition": "definition embeddings",
                 "prompt+definition": "prompt and definition embeddings, concatenated"}


def _classifier_router(pc, result, embedded: dict, log):
    """The prompt -> domain classifier router of clusters made of definitions, and its accuracy report."""
    from lm_lexicon.partition.clustering import classifier_router

    valid_gold = None
    if ("definition", "valid") in embedded:  # the clustering's own rule on the validation definitions
        valid_gold = result.router().route_embeddings(_cluster_features(pc.features, embedded, "valid"))
    router, report = classifier_router(
        result.labels, result.n_clusters, embedded[("prompt", "train")], c=pc.classifier_c, seed=pc.seed,
        held_out_X=embedded.get(("prompt", "valid")), held_out_labels=valid_gold, method=pc.method,
        meta={"features": pc.features, "seed": pc.seed, "slack": pc.slack, "size_bounds": list(result.size_bounds),
              "cluster_margin": result.margin})
    log(f"[partition] prompt -> domain classifier: held-out accuracy {report['held_out_accuracy']:.3f} "
        f"({report['held_out']}, {report['n_held_out']} rows; chance {report['chance']:.3f}), train "
        f"{report['train_accuracy']:.3f}")
    return router, report


def _cluster_features(features: str, embedded: dict, split: str) -> np.ndarray:
    """The vectors the clusters are made of, for ``split``'s rows."""
    from lm_lexicon.partition.clustering import combine_views

    if features == "prompt":
        return embedded[("prompt", split)]
    if features == "definition":
        return embedded[("definition", split)]
    return combine_views(embedded[("prompt", split)], embedded[("definition", split)])


def _append_agreement(path: Path, agreement: dict, classifier: dict | None) -> None:
    """Add the purity / NMI table (and the classifier's accuracy) to the cluster report's markdown."""
    lines = ["", "## Agreement with the rows' source and genre", "",
             "Purity: share of rows whose domain's commonest value is theirs (floor: the commonest value's share). "
             "NMI: 0 = independent of the domains, 1 = the same grouping.", "",
             "| field | values | purity | floor | NMI | commonest value per domain (share) |", "|---|---:|---:|---:|---:|---|"]
    for key, a in agreement.items():
        tops = ", ".join(f"{d['domain']}: {d['top']} ({d['share']:.2f})" for d in a["per_domain"] if d["rows"])
        lines.append(f"| {key} | {a['n_categories']} | {a['purity']:.3f} | {a['majority_share']:.3f} | "
                     f"{a['nmi']:.3f} | {tops} |")
    if classifier:
        lines += ["", f"Prompt -> domain classifier (the router): held-out accuracy "
                      f"{classifier['held_out_accuracy']:.3f} on {classifier['n_held_out']} rows "
                      f"({classifier['held_out']}; chance {classifier['chance']:.3f}), train accuracy "
                      f"{classifier['train_accuracy']:.3f}, C = {classifier['c']:g}."]
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")


def cluster_report_centroids(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Cohesion is measured in the embedding space for every method (lexical centroids live in TF-IDF space)."""
    C = np.zeros((k, X.shape[1]), dtype=np.float32)
    for d in range(k):
        m = X[labels == d].mean(0)
        C[d] = m / max(np.linalg.norm(m), 1e-12)
    return C


def _json_safe(o):
    from lm_lexicon.partition.routing import json_safe

    return json_safe(o)


def run_partition_stage(cfg, data_result: StageResult, force: bool = False, log=print) -> StageResult:
    fp = fingerprint(cfg, ("partition", "embed"), (data_result.fingerprint,))
    return run_stage("partition", Path(cfg.output_dir) / "partition", fp,
                     partition_stage_fn(cfg, data_result.path, log), cfg, force, log)
