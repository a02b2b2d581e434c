"""DeepSpeed config resolution, resources, and the DeepSpeed wiring of the SFT loop and the experts stage.

DeepSpeed is not installed here (and there is no GPU): the wiring is tested against a stand-in ``deepspeed`` module
injected into ``sys.modules``. It records every call (``initialize`` arguments, ``backward``/``step`` counts, the
learning rates it was stepped with, checkpoint saves/loads) and behaves like ZeRO-3 where it matters for our code:
between steps every parameter is a placeholder with no data, a forward gathers them (like DeepSpeed's module hooks),
and only ``deepspeed.zero.GatheredParameters`` makes them readable. A real-GPU test (``@pytest.mark.gpu``) runs the
real DeepSpeed where it is installed.
"""
import importlib.machinery
import json
import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_lexicon.config import TrainConfig, load_config
from lm_lexicon.distributed import (DEEPSPEED_STATE_DIR, DEEPSPEED_TAG, check_deepspeed_batching, expert_resources,
                                    resolve_deepspeed_config)

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "configs/deepspeed/zero3.json"


def test_paper_recipe_fills_zero3_autos_from_table_12():
    cfg = load_config(REPO / "configs/llama3-8b-3dex.yaml")
    ds = resolve_deepspeed_config(cfg.train.deepspeed if Path(cfg.train.deepspeed).is_absolute()
                                  else REPO / cfg.train.deepspeed, cfg.train, world_size=8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 32
    assert ds["train_batch_size"] == 4096 and ds["train_batch_size"] * cfg.train.max_length == 524_288  # Table 12
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 5e-6, "betas": [0.9, 0.95], "weight_decay": 0.01}}
    assert "scheduler" not in ds and "auto" not in json.dumps(ds)


def test_explicit_values_must_agree_with_the_recipe(tmp_path):
    cfg = load_config(REPO / "configs/llama3-8b-3dex.yaml")
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="train_batch_size=7 contradicts the recipe"):
        resolve_deepspeed_config(bad, cfg.train, world_size=8)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(ValueError, match="stage must be 0..3"):
        resolve_deepspeed_config(bad, cfg.train, world_size=8)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ValueError, match="remove the 'scheduler' section"):
        resolve_deepspeed_config(bad, cfg.train, world_size=8)
    with pytest.raises(FileNotFoundError):
        resolve_deepspeed_config(tmp_path / "none.json", cfg.train, 1)


def test_the_loop_refuses_a_deepspeed_config_that_counts_micro_batches_differently():
    t = TrainConfig(batch_size=4, grad_accum=2, precision="fp32")
    ds = resolve_deepspeed_config(ZERO3, t, world_size=2)
    check_deepspeed_batching(ds, t, world_size=2)
    with pytest.raises(ValueError, match="train_batch_size=16, expected 8"):
        check_deepspeed_batching(ds, t, world_size=1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2, expected 4"):
        check_deepspeed_batching(ds, t.model_copy(update={"grad_accum": 4}), world_size=2)


def test_gpu_recipe_resources():
    r = expert_resources(load_config(REPO / "configs/llama3-8b-3dex.yaml").resources)
    assert r["workers"] == 8 and r["per_worker"] == {"CPU": 8, "GPU": 1} and r["total"] == {"CPU": 64, "GPU": 8}
    cpu = expert_resources(load_config(REPO / "configs/tiny.yaml").resources)
    assert cpu["total"] == {"CPU": 1}


def test_cpu_path_never_imports_deepspeed():
    import lm_lexicon.distributed  # noqa: F401
    import lm_lexicon.train.stage  # noqa: F401
    import lm_lexicon.moe.stage  # noqa: F401
    import lm_lexicon.train.loop  # noqa: F401
    import lm_lexicon.train.ray_worker  # noqa: F401

    assert "deepspeed" not in sys.modules


# ============================================================================================ the stand-in deepspeed
def _partition(params) -> None:
    for p in params:
        if p.data.numel():
            p._full = p.data
            p.data = torch.empty(0, dtype=p.dtype)


def _gather(params) -> list:
    gathered = []
    for p in params:
        if hasattr(p, "_full") and p.data.numel() == 0:
            p.data = p._full
            gathered.append(p)
    return gathered


def _fake_deepspeed(calls: dict) -> types.ModuleType:
    """A ``deepspeed`` module with the API our code uses; see the module docstring."""

    class Engine(torch.nn.Module):
        def __init__(self, model, model_parameters, config):
            super().__init__()
            self.module = model
            opt = config["optimizer"]
            assert opt["type"] == "AdamW"
            self.optimizer = torch.optim.AdamW(model_parameters, lr=opt["params"]["lr"],
                                               betas=tuple(opt["params"]["betas"]),
                                               weight_decay=opt["params"]["weight_decay"])
            self.gas, self.clip = config["gradient_accumulation_steps"], config["gradient_clipping"]
            self.zero3 = config["zero_optimization"]["stage"] == 3
            self.micro_steps = self.global_steps = 0
            self._norm = None
            if self.zero3:  # ZeRO-3 at rest: placeholders only; forwards gather (DeepSpeed hooks do the same)
                for i, p in enumerate(model.parameters()):
                    p.ds_id = i
                _partition(model.parameters())
                model.register_forward_pre_hook(self._before_forward)
                model.register_forward_hook(self._after_forward)

        @staticmethod
        def _before_forward(module, args):
            _gather(module.parameters())

        @staticmethod
        def _after_forward(module, args, output):
            if not module.training:  # evaluation: release at once; training: keep until the update
                _partition(module.parameters())

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

        def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
            calls["backward"].append(scale_wrt_gas)
            (loss / self.gas if scale_wrt_gas else loss).backward()

        def step(self, lr_kwargs=None):
            calls["step"] += 1
            self.micro_steps += 1
            if self.micro_steps % self.gas:
                return
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params))
            for p in params:
                p.grad.mul_(min(1.0, self.clip / (float(norm) + 1e-6)))
            calls["lrs"].append([g["lr"] for g in self.optimizer.param_groups])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._norm, self.global_steps = norm, self.global_steps + 1
            if self.zero3:
                _partition(self.module.parameters())

        def get_global_grad_norm(self):
            return self._norm

        def _full_params(self):
            return [getattr(p, "_full", p.data) if p.data.numel() == 0 else p.data for p in self.module.parameters()]

        def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True):
            calls["save_checkpoint"].append((Path(save_dir).name, tag, save_latest))
            out = Path(save_dir) / tag
            out.mkdir(parents=True)
            torch.save({"params": [t.clone() for t in self._full_params()], "optimizer": self.optimizer.state_dict(),
                        "global_steps": self.global_steps}, out / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

        def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                            load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
            calls["load_checkpoint"].append((Path(load_dir).name, tag, load_optimizer_states,
                                             load_lr_scheduler_states))
            path = Path(load_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            saved = torch.load(path, weights_only=True)
            for target, value in zip(self._full_params(), saved["params"]):
                target.copy_(value)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.global_steps = saved["global_steps"]
            return str(path.parent), {}

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
            self.params = list(params)
            calls["gathered"].append((len(self.params), modifier_rank))

        def __enter__(self):
            self.gathered = _gather(self.params)

        def __exit__(self, *exc):
            _partition(self.gathered)

    def initialize(args=None, model=None, optimizer=None, model_parameters=None, lr_scheduler=None, config=None,
                   **kwargs):
        calls["initialize"].append({"model": model, "model_parameters": model_parameters, "config": config,
                                    "optimizer": optimizer, "lr_scheduler": lr_scheduler})
        engine = Engine(model, model_parameters, config)
        return engine, engine.optimizer, None, None

    ds = types.ModuleType("deepspeed")
    # a spec, as an imported module has: accelerate (installed with the project) asks importlib whether deepspeed is
    # installed, which raises for a spec-less module; with no package metadata it then answers "not installed"
    ds.__spec__ = importlib.machinery.ModuleSpec("deepspeed", loader=None)
    ds.initialize = initialize
    ds.DeepSpeedEngine = Engine  # what accelerate unwraps when it finds deepspeed installed
    ds.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    return ds


@pytest.fixture
def fake_deepspeed(monkeypatch):
    calls = {"initialize": [], "backward": [], "step": 0, "lrs": [], "gathered": [], "save_checkpoint": [],
             "load_checkpoint": []}
    monkeypatch.setitem(sys.modules, "deepspeed", _fake_deepspeed(calls))
    return calls


# ============================================================================================ SFT loop under DeepSpeed
ROWS = [
    ("bank", "we sat on the bank of the river", "sloping land beside a body of water"),
    ("run", "he can run a mile in five minutes", "move fast by using the legs"),
    ("bright", "a bright light shone through the window", "emitting or reflecting much light"),
    ("cat", "the cat slept on the warm mat", "a small domesticated feline animal"),
    ("river", "the river flooded the valley", "a large natural stream of flowing water"),
    ("teacher", "the teacher graded the exams", "a person whose occupation is teaching"),
    ("apple", "he ate a red apple for lunch", "fruit with red or yellow or green skin and crisp flesh"),
    ("cold", "the night was cold and clear", "having a low temperature"),
]


def _records(split="train"):
    from lm_lexicon.data.records import Record

    return [Record(term=t, context=c, definition=d, source="test", split=split) for t, c, d in ROWS]


def _train_cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=3, batch_size=2, grad_accum=2, lr=3e-3, warmup_ratio=0.34, dropout=0.0, eval_every=2,
                precision="fp32", max_length=48, seeds=[0], weight_decay=0.01)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from lm_lexicon.seed_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("seed") / "tiny-llama")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_deepspeed_path_drives_the_engine_and_saves_gathered_safetensors(llama_dir, tmp_path, fake_deepspeed,
                                                                          monkeypatch):
    from lm_lexicon.seed_models import load_causal_lm
    from lm_lexicon.train import evaluate_loss, lr_factor, read_trainer_state, train

    def no_clipping_here(*a, **k):
        raise AssertionError("under DeepSpeed the engine clips (gradient_clipping), not the loop")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clipping_here)
    cfg = _train_cfg()
    ds = resolve_deepspeed_config(ZERO3, cfg, world_size=1)
    model, tok = load_causal_lm(llama_dir)
    before = evaluate_loss(model, tok, _records(), max_length=48)
    reports = []
    metrics = train(model, tok, _records(), _records("valid"), cfg, tmp_path, progress=False, deepspeed_config=ds,
                    report_fn=lambda m, c: reports.append((m, c)))

    (init,) = fake_deepspeed["initialize"]
    assert init["model"] is model and init["config"] == ds and init["config"]["optimizer"]["type"] == "AdamW"
    assert init["optimizer"] is None and init["lr_scheduler"] is None  # optimizer from the config, LR from the loop
    groups = init["model_parameters"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # 3 optimizer steps x 2 micro-batches: every micro-batch is one backward + one engine.step()
    assert fake_deepspeed["backward"] == [False] * 6 and fake_deepspeed["step"] == 6
    horizon, warmup = metrics["total_steps"], round(0.34 * 3)
    assert fake_deepspeed["lrs"] == [[3e-3 * lr_factor(s, horizon, warmup, "cosine")] * 2 for s in range(3)]
    assert metrics["steps"] == 3 and metrics["train_loss_last"] < metrics["train_loss_first"]
    assert all(math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m, _ in reports)  # the engine's norm

    # checkpoints at steps 2 and 3: gathered safetensors (full shapes) + DeepSpeed's own state in deepspeed/
    assert [m["step"] for m, _ in reports] == [2, 3]
    ckpt = Path(reports[-1][1])
    assert read_trainer_state(ckpt)["step"] == 3 and read_trainer_state(ckpt)["deepspeed_zero_stage"] == 3
    weights = load_file(str(ckpt / "model.safetensors"))
    reference = load_file(str(llama_dir / "model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.items()}
    assert (ckpt / DEEPSPEED_STATE_DIR / DEEPSPEED_TAG).is_dir()
    assert fake_deepspeed["save_checkpoint"] == [(DEEPSPEED_STATE_DIR, DEEPSPEED_TAG, False)] * 2
    n_modules_with_params = sum(1 for m in model.modules() if list(m.parameters(recurse=False)))
    assert len(fake_deepspeed["gathered"]) >= 2 * n_modules_with_params  # module by module, twice
    assert all(rank == 0 for _, rank in fake_deepspeed["gathered"])
    # ZeRO-3 at rest: reading the module directly would have seen placeholders; the export did not
    assert all(p.data.numel() == 0 for p in model.parameters())

    final = Path(metrics["model_dir"])
    assert sorted(p.name for p in final.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")) == []
    assert not (final / DEEPSPEED_STATE_DIR).exists() and not (final / "trainer_state.json").exists()
    summary = json.loads((final / "sft_summary.json").read_text())
    assert summary["step"] == 3 and summary["weights"] in ("best", "last")
    exported, _ = load_causal_lm(final)
    after = evaluate_loss(exported, tok, _records(), max_length=48)
    assert after < before - 0.5, (before, after)


def test_deepspeed_resume_equals_an_uninterrupted_run(llama_dir, tmp_path, fake_deepspeed):
    from lm_lexicon.seed_models import load_causal_lm
    from lm_lexicon.train import train

    cfg = _train_cfg(max_steps=4, eval_every=2, dropout=0.1)  # dropout: the RNG state must resume too
    ds = resolve_deepspeed_config(ZERO3, cfg, world_size=1)
    model, tok = load_causal_lm(llama_dir)
    first = train(model, tok, _records(), None, cfg, tmp_path / "a", max_steps=2, progress=False,
                  deepspeed_config=ds)
    ckpt = Path(first["checkpoint_dir"])
    model, tok = load_causal_lm(llama_dir)
    resumed = train(model, tok, _records(), None, cfg, tmp_path / "b", resume_from=ckpt, progress=False,
                    deepspeed_config=ds, restore_best=False)
    assert fake_deepspeed["load_checkpoint"] == [(DEEPSPEED_STATE_DIR, DEEPSPEED_TAG, True, False)]
    assert resumed["steps"] == 4 and resumed["train_loss_first"] == pytest.approx(first["train_loss_first"])

    model, tok = load_causal_lm(llama_dir)
    straight = train(model, tok, _records(), None, cfg, tmp_path / "c", progress=False, deepspeed_config=ds,
                     restore_best=False)
    a = load_file(str(Path(resumed["model_dir"]) / "model.safetensors"))
    b = load_file(str(Path(straight["model_dir"]) / "model.safetensors"))
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)

    # ZeRO shards are per rank: a different world size cannot load them
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    state = json.loads((moved / "trainer_state.json").read_text())
    (moved / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    model, tok = load_causal_lm(llama_dir)
    with pytest.raises(ValueError, match="written by 2 ranks"):
        train(model, tok, _records(), None, cfg, tmp_path / "d", resume_from=moved, progress=False,
              deepspeed_config=ds)


def test_lockstep_evaluation_runs_as_many_forwards_on_every_rank(llama_dir, monkeypatch):
    """Under ZeRO-3 a forward is a collective: with 5 batches on 2 ranks, rank 1 runs 3 forwards (one a filler
    whose score it drops) and its sums cover exactly its own 2 batches."""
    import lm_lexicon.train as training
    from lm_lexicon.seed_models import load_causal_lm
    from lm_lexicon.train import parallel

    model, tok = load_causal_lm(llama_dir)
    data = training.SFTDataset(tok, _records() + _records()[:2], max_length=48)  # 10 rows, batch 2 -> 5 batches
    batches = training.LengthBucketBatchSampler(data.lengths, 2, shuffle=False).batches(0)
    assert len(batches) == 5
    mine = batches[1::2]
    expected_nll = expected_n = 0.0
    with torch.no_grad():
        for idx in mine:
            nll, n = training.definition_nll(model, training.collate([data[i] for i in idx], tok.pad_token_id))
            expected_nll, expected_n = expected_nll + float(nll), expected_n + n

    forwards = []
    model.register_forward_hook(lambda m, a, o: forwards.append(1))
    monkeypatch.setattr(parallel, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: None)
    loss = training.evaluate_loss(model, tok, data, batch_size=2, lockstep=True)
    assert len(forwards) == 3
    assert loss == pytest.approx(expected_nll / expected_n, rel=1e-6)
    forwards.clear()
    assert training.evaluate_loss(model, tok, data, batch_size=2) == pytest.approx(loss, rel=1e-6)
    assert len(forwards) == 2  # without lockstep (DDP / CPU): only its own batches


# ============================================================================================ the experts stage worker
def _partition_dir(path: Path) -> Path:
    import pandas as pd

    path.mkdir()
    rows = [r.to_dict() for r in _records()]
    train = pd.DataFrame(rows)
    train["domain"] = [0, 1] * 4
    for d in (0, 1):
        train[train["domain"] == d].to_parquet(path / f"domain_{d}.parquet", index=False)
    valid = pd.DataFrame([r.to_dict() for r in _records("valid")])
    valid["domain"] = [0, 1] * 4
    valid.to_parquet(path / "valid.parquet", index=False)
    return path


def test_expert_worker_uses_deepspeed_not_ddp(llama_dir, tmp_path, fake_deepspeed, monkeypatch):
    """``train_worker`` (the per-worker loop of the experts stage) run in-process with Ray Train's worker API
    stubbed: 2 workers (this is rank 0), a GPU recipe with ZeRO-3, CPU tensors. The resolved DeepSpeed config travels
    in the loop config, the model is never DDP-wrapped, and every report carries a checkpoint."""
    import ray.train
    import ray.train.torch

    from lm_lexicon.train import stage as experts

    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"output_dir={tmp_path}", f"seed_model.name={llama_dir}", "resources.use_gpu=true",
        "resources.gpus_per_worker=1", "resources.workers_per_expert=2", f"train.deepspeed={ZERO3}",
        "train.max_steps=2", "train.eval_every=1", "train.batch_size=2", "train.grad_accum=1",
        "train.precision=fp32", "train.lr=1e-3", "train.max_length=48", "partition.n_experts=2"])
    loop_cfg = experts.worker_loop_config(cfg, _partition_dir(tmp_path / "partition"), tmp_path / "experts",
                                          str(tmp_path / "ray"))
    assert loop_cfg["deepspeed"]["train_batch_size"] == 2 * 1 * 2
    assert "deepspeed" not in experts.worker_loop_config(load_config(REPO / "configs/tiny.yaml"), tmp_path,
                                                         tmp_path, "x")

    reports = []

    def report(metrics, checkpoint=None):  # Ray uploads at report time; the worker's scratch dir goes away after
        kept = None
        if checkpoint is not None:
            kept = tmp_path / "reported" / str(len(reports))
            shutil.copytree(checkpoint.path, kept)
        reports.append((metrics, kept))

    def no_ddp(*a, **k):
        raise AssertionError("prepare_model (DDP) must not wrap a DeepSpeed model")

    monkeypatch.setattr(ray.train, "get_context", lambda: types.SimpleNamespace(get_world_rank=lambda: 0,
                                                                               get_world_size=lambda: 2))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", no_ddp)
    experts.train_worker({**loop_cfg, "job": {"name": "expert_0", "domain": 0}})

    (init,) = fake_deepspeed["initialize"]
    assert init["config"] == loop_cfg["deepspeed"]
    assert [m.get("step") for m, _ in reports] == [1, 2, None] and reports[-1][0]["final"] is True
    assert reports[-1][0]["steps"] == 2 and all(c is not None for _, c in reports)
    step_ckpt = reports[1][1]
    assert (step_ckpt / "model.safetensors").is_file() and (step_ckpt / DEEPSPEED_STATE_DIR).is_dir()
    final = reports[-1][1]
    assert (final / "model.safetensors").is_file() and (final / experts.FINAL_MARKER).is_file()
    assert not (final / DEEPSPEED_STATE_DIR).exists()


# ============================================================================================ real DeepSpeed on a GPU
@pytest.mark.gpu
def test_real_deepspeed_zero3_on_one_gpu(llama_dir, tmp_path):
    """Real DeepSpeed, one GPU, ZeRO-3 (run on a GPU machine with the [gpu] extra; skipped elsewhere)."""
    pytest.importorskip("deepspeed")
    import os

    import torch.distributed as dist

    from lm_lexicon.seed_models import load_causal_lm
    from lm_lexicon.train import train

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    cfg = _train_cfg(max_steps=3, precision="bf16")
    ds = resolve_deepspeed_config(ZERO3, cfg, world_size=1)
    model, tok = load_causal_lm(llama_dir)
    model.to("cuda")
    metrics = train(model, tok, _records(), _records("valid"), cfg, tmp_path, progress=False, deepspeed_config=ds)
    assert metrics["steps"] == 3 and math.isfinite(metrics["train_loss_last"])
    exported, _ = load_causal_lm(metrics["model_dir"])
    reference = load_file(str(llama_dir / "model.safetensors"))
    assert {k: v.shape for k, v in exported.state_dict().items() if k in reference} == \
        {k: v.shape for k, v in reference.items()}
