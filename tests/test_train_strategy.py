"""The training loop's strategy interface, its state and its schedule, on a tiny Llama on CPU.

The DDP and DeepSpeed strategies run whole in tests/test_multinode_experts.py (2 gloo ranks) and
tests/test_distributed.py (a stand-in DeepSpeed); here each method of the interface is checked on its own.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from lm_lexicon.config import TrainConfig
from lm_lexicon.seed_models import load_causal_lm
from lm_lexicon.train import LRSchedule, TrainerState, collate, definition_nll, encode_example, lr_factor
from lm_lexicon.train.checkpoint import read_trainer_state
from lm_lexicon.train.loop import make_strategy
from lm_lexicon.train.strategy import DDPStrategy, PlainStrategy

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # micro_seed (conftest) is a tiny random Llama


def _cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=2, batch_size=2, lr=1e-2, warmup_ratio=0.0, dropout=0.0, precision="fp32", max_length=48,
                seeds=[0], weight_decay=0.01, grad_clip=0.5)
    return TrainConfig(**{**base, **overrides})


def _batch(tok):
    pairs = [("Define bank.", "sloping land beside a river"), ("Define cat.", "a small domesticated feline")]
    return collate([encode_example(tok, p, d, 48) for p, d in pairs], tok.pad_token_id)


def _state(**overrides) -> TrainerState:
    return TrainerState(**{**dict(total_steps=10, warmup_steps=1, seed=0, precision="fp32", world_size=1),
                           **overrides})


def test_plain_backward_is_the_per_token_mean_and_step_clips_updates_and_zeroes(micro_seed):
    model, tok = load_causal_lm(micro_seed)
    strategy = PlainStrategy()
    same, optimizer = strategy.setup(model, _cfg())
    assert same is model and [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    batch = _batch(tok)
    nll, n = definition_nll(model, batch)
    strategy.backward(nll, n, n)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    nll, _ = definition_nll(model, batch)
    (nll / n).backward()  # what the strategy must have done: the summed NLL over the step's target tokens
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=0, atol=0, msg=k)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])))
    assert norm > 0.5  # so that clipping to grad_clip=0.5 acts
    assert float(strategy.step()) == pytest.approx(norm, rel=1e-5)  # the norm BEFORE clipping is reported
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())


def test_plain_checkpoint_round_trip_and_only_rank_0_writes(micro_seed, tmp_path):
    model, tok = load_causal_lm(micro_seed)
    strategy = PlainStrategy()
    _, optimizer = strategy.setup(model, _cfg())
    nll, n = definition_nll(model, _batch(tok))
    strategy.backward(nll, n, n)
    strategy.step()
    state = _state(step=1, history=[{"step": 1, "train_loss": 2.5}])
    ckpt = strategy.save_checkpoint(tmp_path / "step-0000001", tok, state)
    assert read_trainer_state(ckpt) == {**state.to_json(), "format": "lm_lexicon.sft/1"}
    assert not (tmp_path / "step-0000001.tmp").exists()

    other = PlainStrategy(rank=1, world_size=2)
    other.setup(load_causal_lm(micro_seed)[0], _cfg())
    assert other.save_checkpoint(tmp_path / "rank1", tok, state) is None and not (tmp_path / "rank1").exists()

    fresh, _ = load_causal_lm(micro_seed)
    restored = PlainStrategy()
    _, restored_optimizer = restored.setup(fresh, _cfg())
    restored.load_checkpoint(ckpt, read_trainer_state(ckpt))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    saved, loaded = optimizer.state_dict()["state"], restored_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for i in saved:
        torch.testing.assert_close(saved[i]["exp_avg"], loaded[i]["exp_avg"], rtol=0, atol=0)


def test_plain_export_writes_the_model_and_says_which_weights(micro_seed, tmp_path):
    model, tok = load_causal_lm(micro_seed)
    strategy = PlainStrategy()
    strategy.setup(model, _cfg())
    state = _state(step=3, best_step=3, best_checkpoint="step-0000003", best_valid_loss=1.5)
    final = strategy.export(tok, state, tmp_path, restore_best=True, save_dtype="float32", last_checkpoint=None)
    summary = json.loads((final / "sft_summary.json").read_text())
    assert summary == {**state.summary(), "weights": "last", "dtype": "float32"}  # the best is the last step
    assert (final / "model.safetensors").is_file() and not (tmp_path / "model.tmp").exists()
    assert PlainStrategy(rank=1, world_size=2).export(tok, state, tmp_path / "r1", restore_best=True,
                                                      save_dtype="float32", last_checkpoint=None) is None


def test_ddp_backward_scales_by_the_world_over_the_global_target_count(micro_seed, monkeypatch):
    """DDP averages gradients over ranks: a rank's loss x world / (targets on all ranks) makes the average the
    global per-token mean. Checked on one process with the world size stubbed."""
    model, tok = load_causal_lm(micro_seed)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    strategy = DDPStrategy(rank=0, world_size=2)
    strategy.setup(model, _cfg())
    batch = _batch(tok)
    nll, n = definition_nll(model, batch)
    strategy.backward(nll, n, 3 * n)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    nll, _ = definition_nll(model, batch)
    (nll * (2 / (3 * n))).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=0, atol=0, msg=k)
    with strategy.micro_batch(last=False):  # a bare model cannot skip the all-reduce: nothing to do
        pass


def test_make_strategy_picks_deepspeed_ddp_or_plain_without_importing_deepspeed(monkeypatch):
    from lm_lexicon.train import parallel
    from lm_lexicon.train.deepspeed_strategy import DeepSpeedStrategy

    assert type(make_strategy(None, 0, 1)) is PlainStrategy
    monkeypatch.setattr("lm_lexicon.train.loop.is_distributed", lambda: True)
    assert type(make_strategy(None, 1, 2)) is DDPStrategy
    ds = make_strategy({"zero_optimization": {"stage": 3}}, 1, 2)
    assert isinstance(ds, DeepSpeedStrategy) and ds.lockstep_eval and not ds.is_main
    assert ds.state_fields() == {"deepspeed_zero_stage": 3}
    assert "deepspeed" not in sys.modules  # imported by setup(), on a GPU worker, only
    assert parallel.is_distributed() is False


def test_trainer_state_json_keeps_its_historical_keys_and_order():
    state = _state()
    assert list(state.to_json()) == [
        "step", "next_epoch", "next_batch", "total_steps", "warmup_steps", "best_valid_loss", "best_step",
        "best_checkpoint", "evals_without_improvement", "train_loss_first", "history", "seed", "precision",
        "world_size", "stopped_early"]
    assert list(_state(deepspeed_zero_stage=3).to_json())[-1] == "deepspeed_zero_stage"


def test_trainer_state_resumes_progress_but_keeps_its_own_schedule_and_world():
    saved = {**_state(step=4, next_epoch=1, next_batch=2, best_valid_loss=1.25, best_step=4, history=[{"step": 4}],
                      train_loss_first=3.0).to_json(), "total_steps": 99, "world_size": 8, "seed": 7}
    resumed = _state(world_size=2).resumed(saved)
    assert (resumed.step, resumed.next_epoch, resumed.next_batch, resumed.best_step) == (4, 1, 2, 4)
    assert resumed.history == [{"step": 4}] and resumed.train_loss_first == 3.0
    assert (resumed.total_steps, resumed.world_size, resumed.seed) == (10, 2, 0)


def test_trainer_state_early_stopping_bookkeeping():
    state = _state(step=1)
    assert state.record_validation(2.0, patience=2) is False and (state.best_step, state.best_valid_loss) == (1, 2.0)
    state.step = 2
    assert state.record_validation(2.5, patience=2) is False and state.evals_without_improvement == 1
    state.step = 3
    assert state.record_validation(2.0, patience=2) is True  # equal is no improvement
    assert state.best_step == 1 and state.record_validation(1.0, patience=None) is False
    assert state.restores_best(True) is False  # no checkpoint name recorded yet


def test_lr_schedule_writes_every_group_and_matches_lr_factor():
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    schedule = LRSchedule(3e-3, total_steps=10, warmup_steps=2, kind="cosine")
    for step in range(12):
        lr = schedule.apply(optimizer, step)
        assert lr == 3e-3 * lr_factor(step, 10, 2, "cosine")
        assert [g["lr"] for g in optimizer.param_groups] == [lr, lr]
    assert schedule.at(0) == pytest.approx(1.5e-3) and schedule.at(9) > 0 and math.isclose(schedule.at(1), 3e-3)
