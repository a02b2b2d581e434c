import json

import pytest

from lm_lexicon.config import load_config
from lm_lexicon.artifacts import MARKER, fingerprint, run_stage, stage_done


def test_a_finished_stage_is_reused_and_a_changed_config_recomputes(tmp_path):
    calls = []

    def work(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"n": len(calls)}

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    fp = fingerprint(cfg, ("partition",))
    first = run_stage("s", tmp_path / "s", fp, work, cfg, log=lambda m: None)
    again = run_stage("s", tmp_path / "s", fp, work, cfg, log=lambda m: None)
    assert (first.reused, again.reused, len(calls)) == (False, True, 1)
    assert again.summary == {"n": 1}
    assert (tmp_path / "s" / "config.yaml").exists() and (tmp_path / "s" / "out.txt").exists()

    changed = load_config(None, [f"output_dir={tmp_path}", "partition.n_experts=2"])
    fp2 = fingerprint(changed, ("partition",))
    assert fp2 != fp and fingerprint(changed, ("train",)) == fingerprint(cfg, ("train",))
    third = run_stage("s", tmp_path / "s", fp2, work, changed, log=lambda m: None)
    assert (third.reused, len(calls)) == (False, 2)


def test_upstream_change_invalidates_downstream():
    cfg = load_config(None)
    assert fingerprint(cfg, ("train",), ("a",)) != fingerprint(cfg, ("train",), ("b",))


def test_a_crashed_stage_leaves_nothing_that_looks_finished(tmp_path):
    def boom(d):
        (d / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage("s", tmp_path / "s", "fp", boom, log=lambda m: None)
    assert stage_done(tmp_path / "s", "fp") is None
    assert not (tmp_path / "s").exists()
    # the next run starts clean and finishes
    res = run_stage("s", tmp_path / "s", "fp", lambda d: {"ok": True}, log=lambda m: None)
    assert not res.reused and json.loads((tmp_path / "s" / MARKER).read_text())["summary"] == {"ok": True}


def test_prune_checkpoints_drops_checkpoint_dirs_of_the_stage_runs_only(tmp_path):
    from lm_lexicon.config import load_config
    from lm_lexicon.artifacts import StageResult, prune_checkpoints, release_checkpoints

    def tree():
        for run in ("tiny-expert_0-abcd1234", "tiny-moe-finetune-abcd1234", "tiny-expert_0-ffff0000", "other-x-abcd1234"):
            (tmp_path / run / "checkpoint_2026-01-01_00-00-00.1").mkdir(parents=True, exist_ok=True)
            (tmp_path / run / "checkpoint_2026-01-01_00-00-00.1" / "model.safetensors").write_bytes(b"x" * 1000)
            (tmp_path / run / "checkpoint_manager_snapshot.json").write_text("{}")
            (tmp_path / run / "progress.csv").write_text("step\n1\n")

    tree()
    removed, freed = prune_checkpoints(str(tmp_path), "abcd1234", "tiny")
    assert (removed, freed) == (2, 2000)
    left = sorted(str(p.relative_to(tmp_path)).split("/")[0] for p in tmp_path.glob("*/checkpoint_*.1"))
    assert left == ["other-x-abcd1234", "tiny-expert_0-ffff0000"]  # other recipes and other fingerprints untouched
    assert (tmp_path / "tiny-expert_0-abcd1234" / "progress.csv").is_file()  # the run's logs stay
    assert prune_checkpoints("s3://bucket/ray", "abcd1234", "tiny") == (0, 0)  # remote storage is left alone

    tree()
    cfg = load_config("configs/tiny.yaml", [f"resources.storage_path={tmp_path}"])
    done = StageResult("experts", tmp_path, "abcd1234" * 2, False, 1.0, {})
    release_checkpoints(cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"keep_checkpoints": True})}),
                        done, "abcd1234", log=lambda m: None)
    assert (tmp_path / "tiny-expert_0-abcd1234" / "checkpoint_2026-01-01_00-00-00.1").is_dir()  # kept on request
    release_checkpoints(cfg, StageResult("experts", tmp_path, "x", True, 0.0, {}), "abcd1234", log=lambda m: None)
    assert (tmp_path / "tiny-expert_0-abcd1234" / "checkpoint_2026-01-01_00-00-00.1").is_dir()  # reused: untouched
    lines = []
    release_checkpoints(cfg, done, "abcd1234", log=lines.append)
    assert not (tmp_path / "tiny-expert_0-abcd1234" / "checkpoint_2026-01-01_00-00-00.1").exists()
    assert lines and "removed 2 Ray Train checkpoint(s)" in lines[0]
