"""Mixing sources: per-source caps, the split that is leak-free across sources, the recipe fields that drive them
(without changing the fingerprint of recipes that do not use them), and the licences of what ships."""
from __future__ import annotations

import gzip
import json
from collections import defaultdict
from importlib import resources
from pathlib import Path

import pytest
from dictd_fixtures import build_dictd
from typer.testing import CliRunner

from lm_lexicon.cli import app
from lm_lexicon.config import ConfigError, DataConfig, config_from_dict, load_config
from lm_lexicon.data.corpus import load_corpus, save_corpus
from lm_lexicon.data.mix import assign_mixed_splits, cap_rows
from lm_lexicon.data.records import SPLITS, Record, read_jsonl

REPO = Path(__file__).resolve().parents[2]


def rec(term: str, definition: str, split: str = "train", source: str = "x") -> Record:
    return Record(term=term, context="", definition=definition, source=source, split=split)


def splits_of_terms(rows: list[Record]) -> dict[str, set]:
    out: dict[str, set] = defaultdict(set)
    for r in rows:
        out[r.term.casefold()].add(r.split)
    return out


# -------------------------------------------------------------------------------------------------------- caps


def test_cap_rows_is_seeded_ordered_and_reported():
    rows = [rec(f"t{i}", f"d{i}") for i in range(100)]
    kept, info = cap_rows(rows, 30, seed=0, source="a")
    assert len(kept) == 30 and info == {"available": 100, "kept": 30, "seed": 0}
    assert [rows.index(r) for r in kept] == sorted(rows.index(r) for r in kept)  # order kept
    assert kept == cap_rows(rows, 30, seed=0, source="a")[0]
    assert kept != cap_rows(rows, 30, seed=0, source="b")[0]  # sources are sampled independently
    assert cap_rows(rows, 100, seed=0, source="a") == (rows, None) and cap_rows(rows, None, 0, "a") == (rows, None)


# ------------------------------------------------------------------------------------------------------- split


def test_pinned_terms_pull_free_rows_into_their_split():
    pinned = [rec("Bank", "a financial institution", "test"), rec("river", "a stream", "valid")]
    free = [rec("bank", "a mound of earth"), rec("BANK", "a row of keys"), rec("river", "a flow of water"),
            rec("rive", "a flow of water")]  # shares a definition with river: same component
    stats = assign_mixed_splits(pinned, free, seed=0)
    assert [r.split for r in free] == ["test", "test", "valid", "valid"]
    assert stats["pinned_components"] == 2 and stats["conflict_components"] == 0  # {bank, BANK}, {river, rive}
    assert stats["rows_in_pinned_components"] == {"train": 0, "valid": 2, "test": 2}


def test_free_components_are_dealt_like_wordnet_and_never_split():
    free = []
    for i in range(300):
        free.append(rec(f"term{i}", f"meaning {i}"))
        if i % 3 == 0:
            free.append(rec(f"term{i}", f"second meaning {i}"))   # a polysemous term
        if i % 5 == 0:
            free.append(rec(f"other{i}", f"meaning {i}"))         # a shared definition
    stats = assign_mixed_splits([], free, seed=3)
    assert all(len(s) == 1 for s in splits_of_terms(free).values())
    by_definition: dict[str, set] = defaultdict(set)
    for r in free:
        by_definition[r.definition].add(r.split)
    assert all(len(s) == 1 for s in by_definition.values())
    n = len(free)
    for split in ("valid", "test"):
        assert 0.07 * n <= stats["rows_dealt"][split] <= 0.1 * n
    again = [rec(r.term, r.definition) for r in free]
    assign_mixed_splits([], again, seed=3)
    assert [r.split for r in again] == [r.split for r in free]


def test_conflicting_pins_keep_every_term_in_its_own_split():
    pinned = [rec("alpha", "x", "train"), rec("beta", "y", "test")]
    free = [rec("alpha", "shared"), rec("beta", "shared"), rec("gamma", "shared")]
    stats = assign_mixed_splits(pinned, free, seed=0)
    assert [r.split for r in free] == ["train", "test", "train"]
    assert stats["conflict_components"] == 1 and stats["conflict_rows"] == 3


# ------------------------------------------------------------------------------------------------------ corpus


@pytest.fixture(scope="module")
def dictd_dir(tmp_path_factory) -> Path:
    return build_dictd(tmp_path_factory.mktemp("dictd"))


def mix_config(dictd_dir: Path, **data) -> DataConfig:
    sources = [{"format": "wordnet", "genre": "general", "max_rows": 3000}] + [
        {"format": "dictd", "dictionary": name, "dictd_dir": str(dictd_dir)}
        for name in ("gcide", "foldoc", "jargon", "devil")]
    return DataConfig.model_validate({"sources": sources, **data})


def test_mixed_corpus_is_leak_free_with_genres_and_counts(dictd_dir, tmp_path):
    cfg = mix_config(dictd_dir)
    corpus = load_corpus(cfg)
    rows = [r for split in SPLITS for r in corpus[split]]
    assert all(len(s) == 1 for s in splits_of_terms(rows).values())
    wordnet = [r for r in rows if r.source == "wordnet"]
    assert len(wordnet) == 3000 and corpus.capped == {"wordnet": {"available": 48483, "kept": 3000, "seed": 0}}
    assert {r.genre for r in wordnet} == {"general"}
    assert {r.source: r.genre for r in rows if r.source != "wordnet"} == {
        "gcide": "general", "foldoc": "technical", "jargon": "slang", "devil": "satire"}
    assert sum(1 for r in rows if r.source != "wordnet") == 7 + 3 + 4 + 2
    # wordnet rows keep their packaged split
    from lm_lexicon.data.wordnet import load_packaged_corpus

    packaged = {(r.sense_id, r.context): r.split for r in load_packaged_corpus()}
    assert all(packaged[(r.sense_id, r.context)] == r.split for r in wordnet)
    # one component per term (lantern has four senses), except glorp and glorpage, which share a definition
    assert corpus.mix["components"] == 10
    out = save_corpus(corpus, tmp_path / "data")
    manifest = json.loads((out / "data.json").read_text())
    assert manifest["licences"]["gcide"]["shippable"] is False and manifest["licences"]["foldoc"]["licence"] == \
        "GFDL-1.1-or-later"
    assert manifest["licences"]["wordnet"]["shippable"] is True
    by_source = manifest["stats"]["by_source"]
    assert sum(by_source["jargon"]["rows"].values()) == 4 and by_source["jargon"]["with_context"] == 1
    assert manifest["stats"]["splits"]["train"]["genres"]["satire"] == sum(
        1 for r in corpus["train"] if r.source == "devil")
    written = list(read_jsonl(out / "train.jsonl"))
    assert [r.genre for r in written] == [r.genre for r in corpus["train"]] and "general" in {r.genre for r in written}


def test_forced_split_wins_over_the_mixed_split(dictd_dir):
    cfg = DataConfig.model_validate({"sources": [
        {"format": "dictd", "dictionary": "devil", "dictd_dir": str(dictd_dir), "split": "test"}]})
    corpus = load_corpus(cfg)
    assert len(corpus["test"]) == 2 and corpus.mix is None


def test_missing_dictionary_is_a_clear_cli_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  sources:\n    - format: dictd\n      dictionary: foldoc\n"
                      f"      dictd_dir: {tmp_path}\n")
    res = CliRunner().invoke(app, ["data", "stats", "--config", str(recipe)])
    assert res.exit_code == 2
    assert "apt-get install dict-foldoc" in " ".join(res.output.split())


# ------------------------------------------------------------------------------------------------------ config


def test_dictd_source_validation():
    def data(source: dict):
        return config_from_dict({"data": {"sources": [source]}})

    assert data({"format": "dictd", "dictionary": "jargon", "max_rows": 10}).data.sources[0].max_rows == 10
    for bad, message in [({"format": "dictd"}, "needs a 'dictionary'"),
                         ({"format": "dictd", "dictionary": "jargon", "path": "x"}, "not 'path'"),
                         ({"format": "wordnet", "dictionary": "jargon"}, "are for format 'dictd'"),
                         ({"format": "dictd", "dictionary": "webster"}, "dictionary"),
                         ({"format": "wordnet", "max_rows": 0}, "max_rows")]:
        with pytest.raises(ConfigError, match=message):
            data(bad)


def test_recipes_without_mix_fields_keep_their_fingerprints():
    # The data stage of every existing run is reused only if its fingerprint is unchanged by the new fields.
    # (the recipes' data sections as they were when these fields came: tiny had 400 validation rows, since cut to
    # 200; wordnet-small sampled 24,000 training rows, since all of them)
    assert load_config(REPO / "configs" / "tiny.yaml", ["data.max_valid_rows=400"]).stage_hash("data") == \
        "f77fb706ed93ae6d"
    assert load_config(REPO / "configs" / "wordnet-small.yaml", ["data.max_train_rows=24000"]).stage_hash("data") == \
        "4537383f2092b2e3"
    mix = load_config(REPO / "configs" / "lexicon-mix.yaml")
    assert [s.dictionary for s in mix.data.sources] == [None, "gcide", "foldoc", "jargon", "devil"]
    assert mix.stage_hash("data") != load_config(REPO / "configs" / "lexicon-mix-small.yaml").stage_hash("data")


def test_records_without_genre_are_written_as_before():
    plain = Record(term="t", context="", definition="d", source="wordnet")
    assert "genre" not in plain.to_dict()
    tagged = Record(term="t", context="", definition="d", source="jargon", genre="slang")
    assert Record.from_dict(tagged.to_dict()) == tagged


# ----------------------------------------------------------------------------------------------------- licences


def test_package_resources_hold_no_gpl_or_gfdl_dictionary():
    """GCIDE (GPL) and FOLDOC (GFDL) are read from the user's local files and never shipped."""
    markers = ("1913 Webster", "GCIDE", "Collaborative International Dictionary", "FOLDOC",
               "Free On-line Dictionary of Computing", "GNU General Public License", "GNU Free Documentation")
    root = resources.files("lm_lexicon").joinpath("resources")
    checked = 0
    for item in root.iterdir():
        data = item.read_bytes()
        text = (gzip.decompress(data) if item.name.endswith(".gz") else data).decode("utf-8", errors="replace")
        assert not [m for m in markers if m in text], item.name
        sources = {json.loads(line).get("source") for line in text.splitlines()
                   if item.name.endswith(".jsonl.gz") and line.strip()}
        assert not sources & {"gcide", "foldoc"}, item.name
        checked += 1
    assert checked >= 2
    package_data = (REPO / "pyproject.toml").read_text()
    assert "dictd" not in package_data and ".dict" not in package_data


def test_a_definition_of_a_pinned_row_pins_too():
    pinned = [rec("greyed", "deprived of color", "test")]
    free = [rec("decolorate", "Deprived of color"), rec("other", "something else")]
    assign_mixed_splits(pinned, free, seed=0)
    assert free[0].split == "test"
