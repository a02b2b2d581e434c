"""The Ray Train worker scaffold (lm_lexicon.train.ray_worker) run in-process with Ray Train's worker API stubbed:
reports with the job's tags, the final marker, a restart that only re-reports a finished run, a resume from a step
checkpoint, the fault injection, and the driver-side copy of the final model. The real Ray path runs in
tests/test_experts_stage.py and tests/test_merge_stage.py."""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from lm_lexicon.config import load_config
from lm_lexicon.data.records import Record
from lm_lexicon.train import ray_worker
from lm_lexicon.train.ray_worker import FINAL_MARKER, TrainJob, collect_final_model, run_worker

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # micro_seed (conftest) is a tiny random Llama
ROWS = [("bank", "we sat on the bank of the river", "sloping land beside a body of water"),
        ("run", "he can run a mile in five minutes", "move fast by using the legs"),
        ("cat", "the cat slept on the warm mat", "a small domesticated feline animal"),
        ("cold", "the night was cold and clear", "having a low temperature")]


class FakeRayTrain:
    """Ray Train's worker API for one worker: reports kept (checkpoints copied, as Ray uploads them)."""

    def __init__(self, root: Path, checkpoint=None):
        self.root, self.checkpoint, self.reports = root, checkpoint, []

    def install(self, monkeypatch) -> None:
        import ray.train
        import ray.train.torch

        monkeypatch.setattr(ray.train, "get_context", lambda: types.SimpleNamespace(get_world_rank=lambda: 0,
                                                                                   get_world_size=lambda: 1))
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: self.checkpoint)
        monkeypatch.setattr(ray.train, "report", self.report)
        monkeypatch.setattr(ray.train.torch, "prepare_model", lambda *a, **k: pytest.fail("one worker: no DDP"))

    def report(self, metrics, checkpoint=None):
        kept = None
        if checkpoint is not None:
            kept = self.root / f"report-{len(self.reports)}"
            shutil.copytree(checkpoint.path, kept)
        self.reports.append((metrics, kept))


def _loop_cfg(micro_seed, tmp_path, *overrides: str) -> dict:
    cfg = load_config(REPO / "configs/tiny.yaml", [f"output_dir={tmp_path}", f"seed_model.name={micro_seed}",
                                                   "train.max_steps=4", "train.eval_every=2", "train.batch_size=2",
                                                   "train.precision=fp32", "train.max_length=48", *overrides])
    return {"cfg": cfg.model_dump(mode="json")}


def _builder(micro_seed, built: list, templates=None):
    def build(ctx) -> TrainJob:
        from lm_lexicon.seed_models import load_causal_lm

        built.append(ctx)
        model, tok = load_causal_lm(micro_seed)
        rows = [Record(term=t, context=c, definition=d, source="test") for t, c, d in ROWS]
        return TrainJob("job-a", model, tok, rows, rows[:2], ctx.cfg.train, templates=templates,
                        tags={"job": "a", "resumed_from_step": ctx.resumed_step},
                        final_extras=lambda metrics: {"job": "a", "resumed_from_step": ctx.resumed_step,
                                                     "extra": metrics["steps"] * 10})
    return build


def test_a_fresh_worker_reports_each_checkpoint_then_the_marked_final_model(micro_seed, tmp_path, monkeypatch):
    import ray.train

    fake = FakeRayTrain(tmp_path / "reports")
    fake.install(monkeypatch)
    built = []
    try:
        run_worker(_loop_cfg(micro_seed, tmp_path, "resources.cpus_per_worker=2"), _builder(micro_seed, built))
        assert torch.get_num_threads() == 2  # torch agrees with the worker's CPU reservation
    finally:
        torch.set_num_threads(1)
    assert [(c.rank, c.world, c.resumed_step) for c in built] == [(0, 1, 0)]
    assert [m.get("step") for m, _ in fake.reports] == [2, 4, None]
    assert all(m["job"] == "a" and m["resumed_from_step"] == 0 for m, _ in fake.reports)
    final, final_dir = fake.reports[-1]
    assert final["final"] is True and final["extra"] == 40 and final["steps"] == 4
    assert "model_dir" not in final and json.loads((final_dir / FINAL_MARKER).read_text()) == final

    # the driver copies the final model out: a plain model, no marker, no training state
    collected = collect_final_model(ray.train.Checkpoint.from_directory(str(final_dir)), tmp_path / "model")
    assert collected == final
    names = {p.name for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in names and not names & {FINAL_MARKER, "trainer_state.json", "optimizer.pt",
                                                         "rng_state.pt"}

    # Ray restarts the worker after the run finished: it reports the final model again and trains nothing
    again = FakeRayTrain(tmp_path / "again", checkpoint=ray.train.Checkpoint.from_directory(str(final_dir)))
    again.install(monkeypatch)
    run_worker(_loop_cfg(micro_seed, tmp_path), _builder(micro_seed, built))
    assert len(built) == 1 and [m for m, _ in again.reports] == [final]


def test_a_restarted_worker_resumes_from_the_latest_step_checkpoint(micro_seed, tmp_path, monkeypatch):
    import ray.train

    marker = tmp_path / "failed-once"
    loop_cfg = {**_loop_cfg(micro_seed, tmp_path), "fail_once": f"2:{marker}"}
    fake = FakeRayTrain(tmp_path / "first")
    fake.install(monkeypatch)
    built = []
    with pytest.raises(RuntimeError, match=ray_worker.FAIL_ONCE_ENV):
        run_worker(loop_cfg, _builder(micro_seed, built))
    assert marker.read_text() == "job-a" and [m["step"] for m, _ in fake.reports] == [2]

    resumed = FakeRayTrain(tmp_path / "second", checkpoint=ray.train.Checkpoint.from_directory(str(fake.reports[0][1])))
    resumed.install(monkeypatch)
    run_worker(loop_cfg, _builder(micro_seed, built))  # the marker exists: no second failure
    assert [c.resumed_step for c in built] == [0, 2]
    assert [m.get("step") for m, _ in resumed.reports] == [4, None]
    assert all(m["resumed_from_step"] == 2 for m, _ in resumed.reports) and resumed.reports[-1][0]["steps"] == 4


def test_the_jobs_templates_build_its_prompts_and_are_saved_with_every_checkpoint_and_the_model(
        micro_seed, tmp_path, monkeypatch):
    import ray.train

    import lm_lexicon.train
    from lm_lexicon.data.prompts import TEMPLATES_FILE, PromptTemplates, parse_templates

    custom = parse_templates({"en": {"context": 'Context: {context}. Define "{term}".'}})
    given, real_train = [], lm_lexicon.train.train

    def spy(*args, prompt_templates=None, **kwargs):
        given.append(prompt_templates)
        return real_train(*args, prompt_templates=prompt_templates, **kwargs)

    monkeypatch.setattr(lm_lexicon.train, "train", spy)
    fake = FakeRayTrain(tmp_path / "reports")
    fake.install(monkeypatch)
    run_worker(_loop_cfg(micro_seed, tmp_path), _builder(micro_seed, [], templates=custom))
    assert given == [custom]
    assert len(fake.reports) == 3 and all(PromptTemplates.load(kept) == custom for _, kept in fake.reports)
    collect_final_model(ray.train.Checkpoint.from_directory(str(fake.reports[-1][1])), tmp_path / "model")
    assert PromptTemplates.load(tmp_path / "model") == custom != PromptTemplates()

    # a job without templates trains with the defaults and says so beside its model
    default = FakeRayTrain(tmp_path / "default")
    default.install(monkeypatch)
    run_worker(_loop_cfg(micro_seed, tmp_path), _builder(micro_seed, []))
    assert given[-1] == PromptTemplates()
    assert all((kept / TEMPLATES_FILE).exists() and PromptTemplates.load(kept) == PromptTemplates()
               for _, kept in default.reports)
