import json

from typer.testing import CliRunner

from lm_lexicon.cli import app

runner = CliRunner()


def test_data_stats_json_on_the_packaged_corpus():
    res = runner.invoke(app, ["data", "stats", "--json", "data.max_train_rows=null"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    from lm_lexicon.data.wordnet import packaged_counts

    counts = packaged_counts()
    for split in ("train", "valid", "test"):
        assert out["stats"]["splits"][split]["rows"] == counts["splits"][split]["triples"]
    assert all(o["shared_terms"] == 0 for o in out["stats"]["overlap"].values())
    assert out["reports"][0]["rejected"] == {}


def test_data_build_writes_splits_and_manifest(tmp_path):
    res = runner.invoke(app, ["data", "build", "--out", str(tmp_path), "data.max_train_rows=50",
                              "data.max_valid_rows=5", "data.max_test_rows=5"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "data.json").read_text())
    assert manifest["subsampled"]["train"]["kept"] == 50
    assert sum(1 for _ in open(tmp_path / "train.jsonl")) == 50
    assert "seeded sample of 50" in res.output


def test_data_show_filters_by_term():
    res = runner.invoke(app, ["data", "show", "--split", "train", "--term", "dog", "--n", "3", "--prompts",
                              "data.max_train_rows=null"])
    assert res.exit_code == 0, res.output
    assert "What is the definition of" in res.output and "dog" in res.output


def test_bad_split_and_bad_override_exit_2():
    assert runner.invoke(app, ["data", "show", "--split", "dev"]).exit_code == 2
    res = runner.invoke(app, ["data", "stats", "partition.method=none"])
    assert res.exit_code == 2 and "means one domain" in res.output


def test_config_validate(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 5\n")
    res = runner.invoke(app, ["config", "validate", "configs/tiny.yaml", str(bad)])
    assert res.exit_code == 2
    assert "ok configs/tiny.yaml" in res.output and "train.lr" in res.output
