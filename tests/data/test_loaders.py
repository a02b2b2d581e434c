"""Loaders: exact accounting (kept / rejected by reason / first location) on small hand-written fixtures."""
from __future__ import annotations

import csv
import gzip
import json
import sys
import types
from pathlib import Path

import pytest

from lm_lexicon.data.loaders import (
    load_3dex,
    load_any,
    load_hf,
    load_ishiwatari,
    load_multilingual,
    load_table,
    normalize_split,
)
from lm_lexicon.data.records import LoadError, LoadReport, Record


def assert_accounted(report: LoadReport, kept: int, rejected: dict) -> None:
    assert report.kept == kept
    assert dict(report.rejected) == rejected
    assert report.read == kept + sum(rejected.values())
    report.check()


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------- 3D-EX

THREEDEX_HEADER = ["WORD", "DEFINITION", "EXAMPLE", "DATASET_NAME", "SPLIT_TYPE"]


@pytest.fixture
def threedex_csv(tmp_path: Path) -> Path:
    rows = [
        THREEDEX_HEADER,  # line 1
        # lines 2-3 (a quoted newline, between list items): 2 WordNet examples + 1 Urban example
        ["bank", "a financial institution", "[['I went to the bank.', 'The bank closed.'],\n ['bank ex3']]",
         "[['WordNet'], ['Urban']]", "train"],
        ["run", "to move fast", "[['She runs.'], ['He ran.']]", "[['MultiRD'], ['Wiktionary']]",
         "validation"],  # 4: one excluded, one kept
        ["cat", "a feline", "[['A cat.']]", "[[\"Webster's Unabridged\"]]", "test"],  # 5: excluded
        ["dog", "a canine", "[]", "[]", "train"],  # 6: no examples at all
        ["", "nothing", "[['x']]", "[['WordNet']]", "train"],  # 7: empty term
        ["evil", "bad", "__import__('pathlib').Path('PWNED').touch()", "[['WordNet']]", "train"],  # 8
        ["bank", "a financial institution", "[['I went to the bank.']]", "[['Wikipedia']]", "test"],  # 9: dup
        ["tree", "a plant", "[['A tree.', '  ']]", "[['WordNet']]", "train"],  # 10: one kept, one blank
        ["  mixed ", " def ", "[['Mixed use.']]", "[['Hei++', 'Oxford']]", "train"],  # 11: credited to Oxford
        ["sky", "above", "[['The sky.']]", "[['WordNet']]", "holdout"],  # 12: unknown split
        ["sea", "water", "[['The sea.'], ['Sea two.']]", "[['WordNet']]", "train"],  # 13: misaligned
        ["flat", "flat lists", "['Flat one.', 'Flat two.']", "['WordNet', 'Urban']", ""],  # 14: 2 kept
        ["nosrc", "def", "[['Ex.']]", "[[]]", "train"],  # 15: empty source
        ["short", "row"],  # 16: wrong field count
    ]
    return write_csv(tmp_path / "3dex.csv", rows)


def test_3dex_preprocessing_counts_and_records(threedex_csv: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records, report = load_3dex(threedex_csv)
    p = str(threedex_csv)
    assert_accounted(report, kept=8, rejected={
        "excluded source": 2, "empty example": 2, "empty term": 1, "malformed list": 1, "duplicate": 1,
        "unknown split": 1, "misaligned lists": 1, "empty source": 1, "malformed line": 1})
    assert report.examples == {
        "excluded source": f"{p}:4", "empty example": f"{p}:6", "empty term": f"{p}:7", "malformed list": f"{p}:8",
        "duplicate": f"{p}:9", "unknown split": f"{p}:12", "misaligned lists": f"{p}:13",
        "empty source": f"{p}:15", "malformed line": f"{p}:16"}
    assert not (tmp_path / "PWNED").exists()  # the EXAMPLE cell was parsed as a literal, never evaluated

    assert [(r.term, r.context, r.source, r.split) for r in records] == [
        ("bank", "I went to the bank.", "3dex:WordNet", "train"),
        ("bank", "The bank closed.", "3dex:WordNet", "train"),
        ("bank", "bank ex3", "3dex:Urban", "train"),
        ("run", "He ran.", "3dex:Wiktionary", "valid"),
        ("tree", "A tree.", "3dex:WordNet", "train"),
        ("mixed", "Mixed use.", "3dex:Oxford", "train"),
        ("flat", "Flat one.", "3dex:WordNet", "train"),
        ("flat", "Flat two.", "3dex:Urban", "train"),
    ]
    assert records[0] == Record(term="bank", context="I went to the bank.", definition="a financial institution",
                                source="3dex:WordNet", lang="en", split="train", pos=None, sense_id=None)
    assert records[5].definition == "def"


def test_3dex_term_header_and_default_split(tmp_path: Path):
    path = write_csv(tmp_path / "t.csv", [
        ["", "TERM", "DEFINITION", "EXAMPLE", "DATASET_NAME"],  # a pandas index column is ignored
        ["0", "moon", "a satellite", "[['The moon rose.']]", "[['CODWOE']]"],
    ])
    records, report = load_3dex(path, split="dev")
    assert_accounted(report, kept=1, rejected={})
    assert records == [Record("moon", "The moon rose.", "a satellite", "3dex:CODWOE", split="valid")]
    with pytest.raises(ValueError, match="unknown split"):
        load_3dex(path, split="heldout")


def test_3dex_unreadable_input_names_file_and_line(tmp_path: Path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(LoadError, match=f"{missing}: file not found"):
        load_3dex(missing)

    bad_header = write_csv(tmp_path / "bad.csv", [["WORD", "EXAMPLE", "DATASET_NAME"], ["a", "[]", "[]"]])
    with pytest.raises(LoadError, match=rf"{bad_header}:1: missing column\(s\) DEFINITION") as err:
        load_3dex(bad_header)
    assert err.value.line == 1

    no_term = write_csv(tmp_path / "noterm.csv", [["DEFINITION", "EXAMPLE", "DATASET_NAME"]])
    with pytest.raises(LoadError, match="missing column\\(s\\) WORD/TERM"):
        load_3dex(no_term)

    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"WORD,DEFINITION,EXAMPLE,DATASET_NAME\n"
                       b"ok,fine,\"[['x']]\",\"[['WordNet']]\"\n"
                       b"caf\xe9,a place,\"[['y']]\",\"[['WordNet']]\"\n")
    with pytest.raises(LoadError, match=f"{latin1}:3: not UTF-8") as err:
        load_3dex(latin1)
    assert err.value.path == str(latin1) and err.value.line == 3

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LoadError, match=f"{empty}:1: empty file"):
        load_3dex(empty)


# -------------------------------------------------------------------------------------------------- Ishiwatari


@pytest.fixture
def ishiwatari_dir(tmp_path: Path) -> Path:
    d = tmp_path / "wordnet"
    d.mkdir()
    write_lines(d / "train.txt", [
        "bank%1:14:00::\tnoun\twordnet\ta financial institution\t[]\t[]",  # 1
        "ice_cream%1:13:00::\tnoun\twordnet\ta frozen dessert",  # 2
        "run%2:38:00::\tverb\twordnet\tmove fast",  # 3: no <TRG>, but the term is in the context
        "fly%2:38:00::\tverb\twordnet\ttravel through the air",  # 4: term absent from context
        "lonely%3:00:00::\tadj\twordnet\t  ",  # 5: empty definition
        "orphan%1:00:00::\tnoun\twordnet\thas no example",  # 6: no context
        "broken line without tabs",  # 7: malformed
        "bank%1:14:00::\tnoun\twordnet\ta financial institution",  # 8: repeated id -> 2nd bank example
        "",  # blank lines are not rows
    ])
    write_lines(d / "train.eg", [
        "bank%1:14:00::\the sat by the <TRG> .",  # 1
        "ice_cream%1:13:00::\tan <TRG> cone",  # 2
        "run%2:38:00::\ti like to run every day",  # 3
        "fly%2:38:00::\tbirds go south",  # 4
        "lonely%3:00:00::\ta <TRG> night",  # 5
        "bank%1:14:00::\tthe <TRG> raised rates",  # 6
        "stray%1:00:00::\tno definition for <TRG>",  # 7: example without definition
        "malformed-no-tab",  # 8
        "bank%1:14:00::\ta third bank example",  # 9: surplus example of a repeated id
    ])
    write_lines(d / "valid.txt", ["tree%1:20:00::\tnoun\twordnet\ta tall plant"])
    write_lines(d / "valid.eg", ["tree%1:20:00::\ta <TRG> fell"])
    return d


def test_ishiwatari_pairing_substitution_and_rejections(ishiwatari_dir: Path):
    records, report = load_ishiwatari(ishiwatari_dir, splits=("train", "valid"))
    txt, eg = ishiwatari_dir / "train.txt", ishiwatari_dir / "train.eg"
    assert_accounted(report, kept=5, rejected={
        "term not in context": 1, "empty definition": 1, "no context": 1, "malformed line": 2,
        "example without definition": 2})
    assert report.examples == {
        "term not in context": f"{txt}:4", "empty definition": f"{txt}:5", "no context": f"{txt}:6",
        "malformed line": f"{txt}:7", "example without definition": f"{eg}:7"}
    assert records == [
        Record("bank", "he sat by the bank .", "a financial institution", "wordnet", "en", "train", "noun",
               "bank%1:14:00::"),
        Record("ice cream", "an ice cream cone", "a frozen dessert", "wordnet", "en", "train", "noun",
               "ice_cream%1:13:00::"),
        Record("run", "i like to run every day", "move fast", "wordnet", "en", "train", "verb", "run%2:38:00::"),
        Record("bank", "the bank raised rates", "a financial institution", "wordnet", "en", "train", "noun",
               "bank%1:14:00::"),
        Record("tree", "a tree fell", "a tall plant", "wordnet", "en", "valid", "noun", "tree%1:20:00::"),
    ]


def test_ishiwatari_name_split_alias_and_missing_files(ishiwatari_dir: Path, tmp_path: Path):
    (ishiwatari_dir / "dev.txt").write_text((ishiwatari_dir / "valid.txt").read_text())
    (ishiwatari_dir / "dev.eg").write_text((ishiwatari_dir / "valid.eg").read_text())
    records, report = load_ishiwatari(ishiwatari_dir, splits=("dev",), name="wn")
    assert_accounted(report, kept=1, rejected={})
    assert (records[0].source, records[0].split) == ("wn", "valid")

    with pytest.raises(LoadError, match=f"{ishiwatari_dir / 'test.txt'}: file not found"):
        load_ishiwatari(ishiwatari_dir)  # default splits include test, which this directory lacks
    (ishiwatari_dir / "test.txt").write_text("x%1\tnoun\tsrc\tdef\n")
    with pytest.raises(LoadError, match=f"{ishiwatari_dir / 'test.eg'}: file not found"):
        load_ishiwatari(ishiwatari_dir)
    with pytest.raises(LoadError, match="not found"):
        load_ishiwatari(tmp_path / "absent")

    (ishiwatari_dir / "test.eg").write_bytes(b"x%1\tbad \xff byte\n")
    with pytest.raises(LoadError, match=f"{ishiwatari_dir / 'test.eg'}:1: not UTF-8"):
        load_ishiwatari(ishiwatari_dir)


# ------------------------------------------------------------------------------------------------ multilingual


def test_multilingual_counts_and_fields(tmp_path: Path):
    path = write_lines(tmp_path / "es.jsonl", [
        json.dumps({"id": "es-1", "translation": {"word": "perro", "definition": "Animal doméstico."}},
                   ensure_ascii=False),  # 1
        "not json {",  # 2
        json.dumps({"id": "es-3", "translation": {"word": "gato"}}),  # 3
        "",  # 4: blank, not a row
        json.dumps({"id": 4, "translation": {"word": "  casa ", "definition": " Edificio. "}}),  # 5
        "[1, 2]",  # 6
        json.dumps({"id": "es-7", "translation": {"word": "", "definition": "x"}}),  # 7
        json.dumps({"id": "es-8"}),  # 8
        json.dumps({"translation": {"word": 5, "definition": "cinco"}}),  # 9
    ])
    records, report = load_multilingual(path, "ES", split="test")
    p = str(path)
    assert_accounted(report, kept=2, rejected={
        "malformed json": 2, "missing field": 2, "empty term": 1, "non-string term": 1})
    assert report.examples == {"malformed json": f"{p}:2", "missing field": f"{p}:3", "empty term": f"{p}:7",
                               "non-string term": f"{p}:9"}
    assert records == [
        Record("perro", "", "Animal doméstico.", "multilingual:es", "es", "test", None, "es-1"),
        Record("casa", "", "Edificio.", "multilingual:es", "es", "test", None, "4"),
    ]
    with pytest.raises(ValueError, match="unsupported language"):
        load_multilingual(path, "it")
    with pytest.raises(LoadError, match="file not found"):
        load_multilingual(tmp_path / "fr.jsonl", "fr")


# ------------------------------------------------------------------------------------------------------ tables

TABLE_COLUMNS = {"term": "word", "definition": "gloss", "context": "sentence", "pos": "part", "split": "fold"}


def test_table_csv_and_tsv(tmp_path: Path):
    rows = [
        ["word", "gloss", "sentence", "part", "fold", "extra"],  # 1
        ["apple", "a fruit", "An apple\na day.", "noun", "train", "x"],  # 2-3
        ["pear", "", "A pear.", "noun", "train", "x"],  # 4: empty definition
        ["plum", "a fruit", "", "noun", "dev", "x"],  # 5: term-only row is fine, dev -> valid
        ["fig", "a fruit", "Figs.", "noun", "bogus", "x"],  # 6: unknown split
        ["kiwi", "a fruit"],  # 7: wrong field count
        ["lime", "a citrus", "Limes.", "", "", "x"],  # 8: no split value -> the argument's
    ]
    for name, delimiter in (("fruit.csv", ","), ("fruit.tsv", "\t")):
        path = write_csv(tmp_path / name, rows, delimiter)
        records, report = load_table(path, TABLE_COLUMNS, split="test")
        assert_accounted(report, kept=3, rejected={"empty definition": 1, "unknown split": 1,
                                                    "malformed line": 1})
        assert report.examples == {"empty definition": f"{path}:4", "unknown split": f"{path}:6",
                                   "malformed line": f"{path}:7"}
        assert records == [
            Record("apple", "An apple\na day.", "a fruit", "fruit", "en", "train", "noun"),
            Record("plum", "", "a fruit", "fruit", "en", "valid", "noun"),
            Record("lime", "Limes.", "a citrus", "fruit", "en", "test", None),
        ]

    with pytest.raises(LoadError, match=r"fruit.csv:1: mapped column\(s\) not found: context->'text'.*"
                                        r"available columns: \['word', 'gloss'"):
        load_table(tmp_path / "fruit.csv", {"term": "word", "definition": "gloss", "context": "text"})


def test_table_jsonl_json_and_gzip(tmp_path: Path):
    lines = [
        json.dumps({"t": "sun", "d": "a star", "c": "The sun.", "src": "astro", "lg": "en"}),  # 1
        "{broken",  # 2
        json.dumps({"t": "sol", "d": "estrella", "lg": "es"}),  # 3: no context / source keys -> defaults
        json.dumps({"t": "moon"}),  # 4: definition key missing -> empty definition
        json.dumps({"t": 3, "d": "three"}),  # 5: non-string term
    ]
    columns = {"term": "t", "definition": "d", "context": "c", "source": "src", "lang": "lg"}
    path = write_lines(tmp_path / "sky.jsonl", lines)
    gz = tmp_path / "sky.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    for p in (path, gz):
        records, report = load_table(p, columns)
        assert_accounted(report, kept=2, rejected={"malformed json": 1, "empty definition": 1,
                                                    "non-string term": 1})
        assert report.examples["malformed json"] == f"{p}:2"
        assert records == [Record("sun", "The sun.", "a star", "astro", "en", "train"),
                           Record("sol", "", "estrella", "sky", "es", "train")]

    array = tmp_path / "arr.json"
    array.write_text(json.dumps([{"t": "a", "d": "b"}, 7, {"t": "", "d": "c"}]))
    records, report = load_table(array, {"term": "t", "definition": "d"}, source="mine", lang="fr")
    assert_accounted(report, kept=1, rejected={"malformed json": 1, "empty term": 1})
    assert report.examples == {"malformed json": f"{array}[1]", "empty term": f"{array}[2]"}
    assert records == [Record("a", "", "b", "mine", "fr", "train")]

    with pytest.raises(LoadError, match=r"sky.jsonl: mapped column\(s\) not found: pos->'p'"):
        load_table(path, {**columns, "pos": "p"})


def test_table_parquet(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "words.parquet"
    pq.write_table(pa.table({"w": ["oak", None, "elm"], "g": ["a tree", "orphan gloss", "another tree"],
                             "n": [1, 2, 3]}), path)
    records, report = load_table(path, {"term": "w", "definition": "g", "sense_id": "n"})
    assert_accounted(report, kept=2, rejected={"empty term": 1})
    assert report.examples == {"empty term": f"{path}:row 2"}
    assert records == [Record("oak", "", "a tree", "words", sense_id="1"),
                       Record("elm", "", "another tree", "words", sense_id="3")]
    with pytest.raises(LoadError, match=r"mapped column\(s\) not found: context->'ctx'; available columns: "
                                        r"\['w', 'g', 'n'\]"):
        load_table(path, {"term": "w", "definition": "g", "context": "ctx"})
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(LoadError, match=f"{garbage}: not a readable Parquet"):
        load_table(garbage, {"term": "w", "definition": "g"})


def test_table_argument_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="must map \\['definition'\\]"):
        load_table(tmp_path / "x.csv", {"term": "w"})
    with pytest.raises(ValueError, match="unknown Record field"):
        load_table(tmp_path / "x.csv", {"term": "w", "definition": "d", "gloss": "g"})
    with pytest.raises(LoadError, match="unsupported table extension '.xlsx'"):
        load_table(tmp_path / "x.xlsx", {"term": "w", "definition": "d"})
    with pytest.raises(LoadError, match=f"{tmp_path / 'x.csv'}: file not found"):
        load_table(tmp_path / "x.csv", {"term": "w", "definition": "d"})


def test_normalize_split():
    assert [normalize_split(s) for s in ("Train", "validation", "DEV", " test ", "val", "holdout", None)] == [
        "train", "valid", "valid", "test", "valid", None, None]


# ---------------------------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_files(tmp_path: Path) -> dict:
    data = tmp_path / "hfdata"
    data.mkdir()
    write_lines(data / "train.jsonl", [json.dumps({"word": "alpha", "gloss": "first letter", "ex": "Alpha one."}),
                                       json.dumps({"word": "beta", "gloss": "", "ex": "Beta two."}),
                                       json.dumps({"word": " gamma ", "gloss": "third letter", "ex": None})])
    write_lines(data / "test.jsonl", [json.dumps({"word": "delta", "gloss": "fourth letter", "ex": "D."})])
    return {"dir": data, "cache": str(tmp_path / "hf_cache")}


HF_COLUMNS = {"term": "word", "definition": "gloss", "context": "ex"}


def test_hf_local_json_builder(hf_files: dict):
    d = hf_files["dir"]
    records, report = load_hf("json", HF_COLUMNS, data_files={"train": str(d / "train.jsonl"),
                                                               "validation": str(d / "test.jsonl")},
                              cache_dir=hf_files["cache"], source="greek")
    assert_accounted(report, kept=3, rejected={"empty definition": 1})
    assert report.examples == {"empty definition": "json[train][1]"}
    assert records == [Record("alpha", "Alpha one.", "first letter", "greek", "en", "train"),
                       Record("gamma", "", "third letter", "greek", "en", "train"),
                       Record("delta", "D.", "fourth letter", "greek", "en", "valid")]

    # split_map selects and renames; unnamed splits are not loaded.
    records, report = load_hf("json", HF_COLUMNS, split_map={"validation": "test"},
                              data_files={"train": str(d / "train.jsonl"), "validation": str(d / "test.jsonl")},
                              cache_dir=hf_files["cache"])
    assert_accounted(report, kept=1, rejected={})
    assert (records[0].term, records[0].split, records[0].source) == ("delta", "test", "json")


def test_hf_local_directory_and_errors(hf_files: dict):
    d = hf_files["dir"]
    records, report = load_hf(str(d), HF_COLUMNS, cache_dir=hf_files["cache"])
    assert_accounted(report, kept=3, rejected={"empty definition": 1})
    assert sorted((r.term, r.split) for r in records) == [("alpha", "train"), ("delta", "test"),
                                                          ("gamma", "train")]
    assert {r.source for r in records} == {"hfdata"}

    with pytest.raises(LoadError, match=r"json\[train\]: mapped column\(s\) not found: context->'text'"):
        load_hf("json", {**HF_COLUMNS, "context": "text"}, data_files={"train": str(d / "train.jsonl")},
                cache_dir=hf_files["cache"])
    with pytest.raises(LoadError, match="^json: dataset not found"):
        load_hf("json", HF_COLUMNS, data_files={"train": str(d / "absent.jsonl")}, cache_dir=hf_files["cache"])
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_hf("json", HF_COLUMNS, trust_remote_code=True)


# -------------------------------------------------------------------------------------------------- dispatch


def test_load_any_dispatch(threedex_csv: Path, ishiwatari_dir: Path, tmp_path: Path, monkeypatch):
    records, report = load_any({"format": "3dex", "path": str(threedex_csv)})
    assert report.kept == 8 and len(records) == 8
    records, report = load_any({"format": "ishiwatari", "path": str(ishiwatari_dir), "splits": ["valid"]})
    assert [r.term for r in records] == ["tree"]
    mono = write_lines(tmp_path / "de.jsonl", [json.dumps({"id": 1, "translation": {"word": "Haus",
                                                                                   "definition": "Gebäude."}})])
    records, _ = load_any({"format": "multilingual", "path": str(mono), "lang": "de"})
    assert records[0].lang == "de"
    table = write_csv(tmp_path / "t.csv", [["w", "d"], ["x", "y"]])
    records, _ = load_any({"format": "table", "path": str(table), "columns": {"term": "w", "definition": "d"}})
    assert records == [Record("x", "", "y", "t")]

    calls = []

    def fake_corpus(split=None):
        calls.append(split)
        return [], LoadReport(source="wordnet")

    monkeypatch.setitem(sys.modules, "lm_lexicon.data.wordnet",
                        types.SimpleNamespace(load_packaged_corpus=fake_corpus))
    assert load_any({"format": "wordnet", "split": "test"})[1].source == "wordnet"
    assert calls == ["test"]

    # The corpus module may return a bare record list; load_any still returns (records, report).
    word = Record("lemma", "a lemma here", "a gloss", "wordnet", split="test")
    monkeypatch.setitem(sys.modules, "lm_lexicon.data.wordnet",
                        types.SimpleNamespace(load_packaged_corpus=lambda split=None: [word]))
    records, report = load_any({"format": "wordnet"})
    assert records == [word]
    assert_accounted(report, kept=1, rejected={})

    with pytest.raises(ValueError, match="unknown dataset format 'xml'"):
        load_any({"format": "xml"})
    with pytest.raises(ValueError, match="format '3dex'.*unexpected keyword argument 'columns'"):
        load_any({"format": "3dex", "path": "x.csv", "columns": {}})
    with pytest.raises(ValueError, match="format 'multilingual'.*lang"):
        load_any({"format": "multilingual", "path": "x.jsonl"})
    with pytest.raises(ValueError, match="format 'wordnet' takes only 'split'"):
        load_any({"format": "wordnet", "path": "x"})
