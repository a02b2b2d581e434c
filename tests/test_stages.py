import json

import pytest

from lm_lexicon.config import load_config
from lm_lexicon.stages.artifacts import MARKER, fingerprint, run_stage, stage_done


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
