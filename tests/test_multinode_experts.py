"""Experts on several Ray Train workers (``resources.workers_per_expert=2``, CPU, gloo): data-parallel training gives
the model that one worker with the same global batch gives.

* Sharding: in every epoch the two ranks' batches are disjoint, equally many, and together cover the domain but for
  at most one batch's remainder (LengthBucketBatchSampler's ``num_replicas``/``rank``).
* Equivalence (the experts stage's own Tune + TorchTrainer path, on the session's 2-CPU Ray): 2 workers x batch 4
  and 1 worker x batch 8 on the same 8 rows. Each step then sees every row in both runs (1 worker: one batch of 8;
  2 workers: 4 disjoint rows each, the gradients averaged by DDP), so the runs are the same computation up to float
  rounding (other batch shapes, other padding, another summation order). Stated tolerances: the per-step training
  and validation losses agree to 1e-4 relative (measured: 5e-8); the final weights differ by less than 0.1% of how
  far training moved them (``||w2 - w1|| / ||w1 - w0||``; measured: 3e-7), room for other CPUs' kernels while a run
  whose ranks saw the same rows (each step on half the data) or weighted the ranks' tokens unequally would not pass.
  Slow (~3 min: two Ray Train runs through Tune).
* Only rank 0 writes: in a 2-process gloo run of :func:`lm_lexicon.train.train` (no Ray), rank 1's output directory
  stays empty and its reports carry no checkpoint; rank 0 writes checkpoints and the final model.
"""
from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lm_lexicon.config import load_config
from lm_lexicon.data.records import Record
from lm_lexicon.train import LengthBucketBatchSampler

ROWS = [("river", "the river flooded the valley", "a large natural stream of water"),
        ("bank", "she sat on the bank", "sloping land beside a body of water"),
        ("loan", "a loan with high interest", "money lent at interest"),
        ("tree", "an old oak tree", "a tall perennial woody plant"),
        ("engine", "the engine failed", "a motor that converts energy into motion"),
        ("price", "the price of shares fell", "the amount of money for which a thing is sold"),
        ("snow", "snow covered the field", "frozen water falling in white flakes"),
        ("robot", "the robot assembled the parts", "a machine that performs tasks automatically")]
VALID = [("lake", "they swam in the lake", "a body of water surrounded by land"),
         ("debt", "national debt grew", "money that is owed")]
LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-3


def test_each_rank_gets_a_disjoint_equal_shard_in_every_epoch():
    rng = random.Random(1)
    lengths = [rng.randint(5, 60) for _ in range(37)]
    for epoch in range(4):
        shards = []
        for rank in (0, 1):
            sampler = LengthBucketBatchSampler(lengths, 4, seed=42, num_replicas=2, rank=rank)
            shards.append([i for b in sampler.batches(epoch) for i in b])
        assert not set(shards[0]) & set(shards[1]), epoch
        assert len(set(shards[0])) == len(shards[0]) and len(set(shards[1])) == len(shards[1])
        assert abs(len(shards[0]) - len(shards[1])) <= 4
        assert len(set(shards[0]) | set(shards[1])) >= len(lengths) - 2 * 4 + 1  # only a tail batch is left out
    epoch0 = [LengthBucketBatchSampler(lengths, 4, seed=42, num_replicas=2, rank=0).batches(e) for e in (0, 1)]
    assert epoch0[0] != epoch0[1]  # a new shuffle each epoch


def test_worker_resources_are_validated_and_reach_the_trainers_scaling_config(tmp_path):
    from lm_lexicon.config import ConfigError
    from lm_lexicon.train.stage import _trainer_for, max_concurrent

    cfg = load_config("configs/tiny.yaml", ["resources.worker_resources={expert_node: 1}",
                                            "resources.workers_per_expert=2", "resources.cpus_per_worker=0.5"])
    assert cfg.resources.worker_resources == {"expert_node": 1.0}
    assert load_config("configs/tiny.yaml").resources.worker_resources == {}  # recipes unchanged by default
    for bad, needle in (("{CPU: 1}", "'CPU' has its own field"), ("{expert_node: 0}", "must be > 0")):
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/tiny.yaml", [f"resources.worker_resources={bad}"])
    loop_cfg = {"resources": cfg.resources.model_dump(mode="json"), "storage_path": str(tmp_path)}
    trainer = _trainer_for({"name": "expert_0", "domain": 0}, loop_cfg, "run")
    per_worker = trainer.scaling_config.resources_per_worker
    assert per_worker["expert_node"] == 1.0 and trainer.scaling_config.num_workers == 2
    # jobs at once: also bounded by the custom resource present now (a job's 2 workers take 2 expert_node); an
    # explicit max_concurrent_experts wins (an autoscaler adds the nodes on demand)
    assert max_concurrent(cfg.resources, {"CPU": 8, "expert_node": 3}) == 1
    assert max_concurrent(cfg.resources, {"CPU": 8, "expert_node": 4}) == 2
    assert max_concurrent(cfg.resources, {"CPU": 1}) == 1
    explicit = cfg.resources.model_copy(update={"max_concurrent_experts": 5})
    assert max_concurrent(explicit, {"CPU": 1}) == 5


def _records(rows) -> list[dict]:
    return [Record(term=t, context=c, definition=d, source="test").to_dict() for t, c, d in rows]


def _partition_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    pd.DataFrame([{**r, "domain": 0} for r in _records(ROWS)]).to_parquet(root / "domain_0.parquet", index=False)
    pd.DataFrame([{**r, "domain": 0, "split": "valid"} for r in _records(VALID)]).to_parquet(
        root / "valid.parquet", index=False)
    return root


def _train(tmp_path: Path, seed: Path, partition_dir: Path, workers: int, batch: int) -> dict:
    """expert_0 through the experts stage's Tune + TorchTrainer path; its metrics.json and final weights."""
    from lm_lexicon.train.stage import run_jobs

    out = tmp_path / f"w{workers}b{batch}"
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={out}", f"resources.storage_path={out}/ray", f"seed_model.name={seed}",
        f"train.batch_size={batch}", "train.max_steps=4", "train.eval_every=1", "train.precision=fp32",
        "train.dropout=0", "train.lr=1e-3", "train.warmup_ratio=0", "train.trainable=all",
        "train.save_dtype=float32",
        f"resources.workers_per_expert={workers}", "resources.cpus_per_worker=0.5"])
    stage = out / "experts"
    stage.mkdir(parents=True)
    run_jobs(cfg, [{"name": "expert_0", "domain": 0}], partition_dir, stage, f"w{workers}", log=lambda m: None)
    metrics = json.loads((stage / "expert_0" / "metrics.json").read_text())
    return {"metrics": metrics, "weights": load_file(str(stage / "expert_0" / "model" / "model.safetensors"))}


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_train_like_one_worker_with_twice_the_batch(tmp_path, micro_seed, ray_local):
    partition_dir = _partition_dir(tmp_path / "partition")
    one = _train(tmp_path, micro_seed, partition_dir, workers=1, batch=8)
    two = _train(tmp_path, micro_seed, partition_dir, workers=2, batch=4)
    # (had the second run trained on one worker, each of its steps would see 4 of the 8 rows: another curve)
    for run in (one, two):
        assert [h["step"] for h in run["metrics"]["history"]] == [1, 2, 3, 4]
        assert run["metrics"]["n_train"] == len(ROWS)
    curves = {}
    for key in ("train_loss", "valid_loss"):
        a = torch.tensor([h[key] for h in one["metrics"]["history"]], dtype=torch.float64)
        b = torch.tensor([h[key] for h in two["metrics"]["history"]], dtype=torch.float64)
        curves[key] = (a.tolist(), b.tolist())
        assert torch.allclose(a, b, rtol=LOSS_RTOL, atol=0), (key, a, b)
    assert one["metrics"]["history"][-1]["train_loss"] < one["metrics"]["history"][0]["train_loss"]
    assert one["metrics"]["best_step"] == two["metrics"]["best_step"]

    seed_weights = load_file(str(micro_seed / "model.safetensors"))
    moved = diff = 0.0
    for name, w1 in one["weights"].items():
        w0 = seed_weights[name].float()
        moved += float(((w1.float() - w0) ** 2).sum())
        diff += float(((two["weights"][name].float() - w1.float()) ** 2).sum())
    ratio = (diff / moved) ** 0.5
    assert moved > 0 and ratio < WEIGHT_RTOL, ratio
    print(f"\n1 worker x 8 vs 2 workers x 4: train loss {curves['train_loss']}, valid loss {curves['valid_loss']}; "
          f"final weights differ by {ratio:.2e} of the training update")


# =================================================================================================== rank 0 writes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, seed: str, root: str) -> None:
    """One data-parallel rank of lm_lexicon.train.train (gloo on loopback); writes what it saw to
    ``root/rank{rank}.json``."""
    import torch.distributed as dist

    from lm_lexicon.config import TrainConfig
    from lm_lexicon.seed_models import load_causal_lm
    from lm_lexicon.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, tok = load_causal_lm(seed)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        reports = []
        cfg = TrainConfig(batch_size=2, max_steps=2, eval_every=1, precision="fp32", dropout=0.0, lr=1e-3)
        records = [Record.from_dict(r) for r in _records(ROWS)]
        out = Path(root) / f"rank{rank}"
        out.mkdir()
        result = train(ddp, tok, records, [Record.from_dict(r) for r in _records(VALID)], cfg, out,
                       rank=rank, world_size=world, progress=False,
                       report_fn=lambda m, ckpt: reports.append(None if ckpt is None else str(ckpt)))
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(
            {"files": files, "reports": reports, "model_dir": result["model_dir"], "steps": result["steps"]}))
    finally:
        dist.destroy_process_group()


def test_only_rank_0_writes_checkpoints_and_the_model(tmp_path, micro_seed):
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_rank, args=(2, port, str(micro_seed), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 2
    assert rank1["files"] == [] and rank1["reports"] == [None, None] and rank1["model_dir"] is None
    assert all(r is not None for r in rank0["reports"]) and len(rank0["reports"]) == 2
    assert "model/model.safetensors" in rank0["files"]
    assert any(f.startswith("checkpoints/step-") for f in rank0["files"])
