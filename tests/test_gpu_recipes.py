"""The GPU recipes (configs/llama3-8b-3dex.yaml and configs/ishiwatari-*.yaml): they load, follow the paper (3D-EX or
an Ishiwatari benchmark, N=4 semantic experts from Llama-3-8B, NV-Embed-v2, Table 12, DeepSpeed ZeRO-3), their data
sources read with the loaders, and every job of their experts stage trains at once on cluster.yaml's GPU worker types.
Loaded and planned only: nothing here runs on a GPU."""
from pathlib import Path

import pytest
import yaml

from lm_lexicon.config import config_from_dict, load_config
from lm_lexicon.distributed import cluster_node_types, resolve_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
ISHIWATARI = {"wordnet": "wordnet", "oxford": "oxford", "wikipedia": "wiki", "urban": "slang"}
GPU_RECIPES = ["llama3-8b-3dex", *(f"ishiwatari-{b}" for b in ISHIWATARI)]
SMALL = {"ishiwatari-wordnet", "ishiwatari-oxford"}  # the appendix's 8,192-token batch (see the recipes)


def _path(name: str) -> Path:
    return REPO / "configs" / f"{name}.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_the_gpu_recipes_exist():
    found = {p.stem for p in (REPO / "configs").glob("*.yaml")} - {"tiny"}
    assert set(GPU_RECIPES) <= found


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_recipe_follows_the_paper(name, monkeypatch):
    cfg = load_config(_path(name))
    assert cfg.name == name
    assert cfg.seed_model.name == "meta-llama/Meta-Llama-3-8B" and cfg.seed_model.dtype == "bfloat16"
    assert cfg.embed.model == "nvidia/NV-Embed-v2" and cfg.embed.num_gpus_per_actor == 1
    assert (cfg.partition.method, cfg.partition.n_experts, cfg.merge.routing) == ("semantic", 4, "domain")
    t = cfg.train
    # Table 12, LM-Lexicon-Dense
    assert (t.epochs, t.max_length, t.lr, t.adam_betas, t.schedule, t.warmup_ratio) == \
        (3, 128, 5e-6, (0.9, 0.95), "cosine", 0.1)
    assert (t.weight_decay, t.grad_clip, t.dropout, t.seeds, t.precision) == (0.01, 1.0, 0.1, [21, 42, 84], "bf16")
    workers = cfg.resources.workers_per_expert
    tokens = t.batch_size * t.grad_accum * workers * t.max_length
    assert tokens == (8_192 if name in SMALL else 524_288)
    # Table 12, LM-Lexicon-MoE: 1 epoch at 1e-6; 131,072 tokens (the small benchmarks: the same 8,192 as above)
    assert (cfg.finetune.epochs, cfg.finetune.lr) == (1, 1e-6)
    ft_tokens = cfg.finetune.batch_size * t.grad_accum * workers * t.max_length
    assert ft_tokens == (8_192 if name in SMALL else 131_072)
    # DeepSpeed ZeRO-3, resolved for the recipe's world size (relative paths resolve from the repository root)
    monkeypatch.chdir(REPO)
    assert cfg.resources.use_gpu and t.deepspeed == "configs/deepspeed/zero3.json"
    ds = resolve_deepspeed_config(t.deepspeed, t, world_size=workers)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] * t.max_length == tokens


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_data_sources(name):
    sources = load_config(_path(name)).data.sources
    assert len(sources) == 1
    if name == "llama3-8b-3dex":
        assert sources[0].format == "3dex" and sources[0].path.endswith("3D-EX.csv")
    else:
        bench = name.split("-", 1)[1]
        assert sources[0].format == "ishiwatari" and sources[0].name == bench
        assert Path(sources[0].path).name == ISHIWATARI[bench]  # the directory names of Ishiwatari et al.'s release


@pytest.mark.parametrize("bench", list(ISHIWATARI))
def test_ishiwatari_recipe_reads_a_benchmark_directory(bench, tmp_path):
    """The recipe's source, pointed at a small directory in the benchmark's format, loads through the data stage's
    own path (config -> loader arguments -> loader), every split, with the recipe's source name."""
    from lm_lexicon.data.corpus import load_corpus

    d = tmp_path / ISHIWATARI[bench]
    d.mkdir()
    for split, n in (("train", 3), ("valid", 1), ("test", 2)):
        words = [f"word{i}_{split}" for i in range(n)]
        (d / f"{split}.txt").write_text("".join(f"{w}%1\tnoun\tsrc\tmeaning of {w}\t[]\t[]\n" for w in words))
        (d / f"{split}.eg").write_text("".join(f"{w}%1\tthe <TRG> was here\n" for w in words))
    raw = yaml.safe_load(_path(f"ishiwatari-{bench}").read_text())
    raw["data"]["sources"][0]["path"] = str(d)
    cfg = config_from_dict(raw, origin=bench)
    corpus = load_corpus(cfg.data)
    assert {s: len(rows) for s, rows in corpus.splits.items()} == {"train": 3, "valid": 1, "test": 2}
    row = corpus.splits["train"][0]
    assert row.source == bench and row.term == "word0 train" and row.context == "the word0 train was here"


@pytest.mark.parametrize("name", GPU_RECIPES)
@pytest.mark.parametrize("node_type", ["gpu-train-h100", "gpu-train-a100"])
def test_every_job_trains_at_once_one_node_each_on_the_cluster_gpu_worker_types(name, node_type, cluster):
    """The 4 experts and the dense baseline at once (the stage's own concurrency rule), each on exactly one 8-GPU
    node, so an expert's ZeRO-3 group stays on NVLink."""
    from lm_lexicon.train.stage import max_concurrent, plan_jobs

    cfg = load_config(_path(name))
    node = cluster_node_types(cluster)[node_type]
    r = cfg.resources
    assert node["resources"]["GPU"] == r.workers_per_expert * r.gpus_per_worker == 8
    assert node["resources"]["CPU"] >= r.workers_per_expert * r.cpus_per_worker == 64
    jobs = plan_jobs(cfg.partition.n_experts, cfg.train.dense_baseline)
    totals = {k: v * node["max_workers"] for k, v in node["resources"].items()}
    assert len(jobs) == 5 and max_concurrent(r, totals) == 5 == node["max_workers"]


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_workers_receive_the_resolved_deepspeed_config(name, tmp_path, monkeypatch):
    from lm_lexicon.train.stage import worker_loop_config

    monkeypatch.chdir(REPO)
    cfg = load_config(_path(name))
    loop_cfg = worker_loop_config(cfg, tmp_path, tmp_path, cfg.resources.storage_path)
    ds = loop_cfg["deepspeed"]
    assert ds["train_batch_size"] == cfg.train.batch_size * cfg.train.grad_accum * cfg.resources.workers_per_expert
    assert ds["zero_optimization"]["stage"] == 3 and loop_cfg["storage_path"].startswith("s3://")
