import pytest

from lm_lexicon.data import LoadError, LoadReport, Record, format_prompt, read_jsonl, write_jsonl


def test_paper_prompt_puts_context_first():
    assert format_prompt("bank", "they sat on the bank") == '"they sat on the bank" What is the definition of "bank"?'


def test_term_only_prompt_when_context_is_empty():
    assert format_prompt("bank", "") == 'What is the definition of "bank"?'


def test_multilingual_prompt_names_the_language():
    assert format_prompt("gato", "", lang="es") == "Define the Spanish word 'gato'. Use only Spanish to reply."
    assert format_prompt("Hund", "", lang="de") == "Define the German word 'Hund'. Use only German to reply."


def test_prompt_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        format_prompt("  ", "x")
    with pytest.raises(ValueError, match="unknown language"):
        format_prompt("x", "", lang="xx")


def test_report_accounts_for_every_row():
    rep = LoadReport("s")
    rep.keep(3)
    rep.reject("malformed line", "f.txt:4")
    rep.reject("malformed line", "f.txt:9")
    rep.reject("missing field")
    rep.check()
    assert (rep.read, rep.kept, rep.n_rejected) == (6, 3, 3)
    assert rep.examples == {"malformed line": "f.txt:4"}
    assert "malformed line: 2 (first at f.txt:4)" in rep.summary()


def test_jsonl_round_trip_plain_and_gzip(tmp_path):
    rows = [Record("a", "an a", "first letter", "t", sense_id="a%1"), Record("b", "", "second", "t", lang="es")]
    for name in ("r.jsonl", "r.jsonl.gz"):
        assert write_jsonl(rows, tmp_path / name) == 2
        assert list(read_jsonl(tmp_path / name)) == rows


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"term": "a", "context": "", "definition": "d", "source": "s"}\nnot json\n')
    with pytest.raises(LoadError, match=r"r.jsonl:2"):
        list(read_jsonl(p))


def test_prompt_templates_argument_and_missing_context():
    assert format_prompt("bank", None) == 'What is the definition of "bank"?'
    assert format_prompt("banco", "", lang="es", templates={"es": "¿Qué es '{term}'?"}) == "¿Qué es 'banco'?"
    assert format_prompt("bank", "x", templates={"es": "¿Qué es '{term}'?"}) == '"x" What is the definition of "bank"?'
    with pytest.raises(ValueError, match="must contain"):
        format_prompt("bank", "", templates={"en": "Define it."})


def test_partition_parquet_round_trip_keeps_records_domains_and_missing_values(tmp_path):
    from lm_lexicon.data.records import records_from_parquet, write_parquet

    rows = [Record("bank", "the river bank", "land beside a river", "wordnet", pos="n", sense_id="bank.n.01"),
            Record("run", "", "move fast", "3dex:Urban", lang="en", split="train"),  # pos and sense_id None
            Record("gato", "", "un felino", "dict:es", lang="es")]
    write_parquet(rows[:2], [1, 0], tmp_path / "domain_a.parquet")
    write_parquet(rows[2:], [1], tmp_path / "domain_b.parquet")
    files = [tmp_path / "domain_a.parquet", tmp_path / "domain_b.parquet"]
    records, domains = records_from_parquet(files)
    assert records == rows and domains == [1, 0, 1]
    assert records[1].pos is None and records[1].sense_id is None  # NaN in pandas, None again here
    assert records_from_parquet(files, domain=1) == ([rows[0], rows[2]], [1, 1])
    assert records_from_parquet(files, domain=2) == ([], [])
