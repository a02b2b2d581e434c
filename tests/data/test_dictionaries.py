"""The dictd reader and the four dictionary parsers, on hand-written entries (tests/fixtures/dictd): exact rows,
exact accounting by reason, and the index line of the first offence of each reason."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from dictd_fixtures import build_dictd, index_line

from lm_lexicon.data.dictd import (
    DictdNotFound,
    decode_number,
    dictionary_files,
    encode_number,
    read_articles,
    write_dictd,
)
from lm_lexicon.data.dictionaries import DICTIONARIES, load_dictd
from lm_lexicon.data.dictionaries.text import (
    TermMatcher,
    cap_words,
    finish_definition,
    first_sentence,
    lowercase_initials,
    plain_term,
    quoted_spans,
)
from lm_lexicon.data.loaders import load_any
from lm_lexicon.data.records import LoadError, LoadReport, Record


@pytest.fixture(scope="module")
def dictd_dir(tmp_path_factory) -> Path:
    return build_dictd(tmp_path_factory.mktemp("dictd"))


def rows_of(records: list[Record]) -> list[tuple]:
    return [(r.sense_id.split(":", 2)[2], r.term, r.definition, r.context, r.pos) for r in records]


def assert_report(report: LoadReport, kept: int, rejected: dict) -> None:
    assert report.kept == kept
    assert dict(report.rejected) == rejected
    assert report.read == kept + sum(rejected.values())
    report.check()


# ----------------------------------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("value", [0, 1, 63, 64, 4095, 4096, 13_527_370])
def test_base64_numbers_round_trip(value):
    assert decode_number(encode_number(value)) == value


def test_base64_numbers_as_dictfmt_writes_them():
    assert decode_number("A") == 0 and decode_number("/") == 63 and decode_number("BA") == 64
    for bad in ("", "A-B", "é"):
        with pytest.raises(ValueError):
            decode_number(bad)


def test_every_index_line_is_an_article_or_a_counted_rejection(tmp_path):
    index, data = write_dictd(tmp_path, "toy", [(["alpha", "Alpha", "first"], "alpha\n\n   text one\n"),
                                                (["beta"], "beta\n\n   text two\n")])
    with open(index, "a", encoding="utf-8") as f:
        f.write("00-database-short\tA\tB\n"    # dictfmt's description of the database
                "no tabs at all\n"             # not three fields
                "gamma\tA!\tB\n"              # not base64
                "delta\tA\t////\n"            # past the end of the data
                "\n")                          # a blank line is not an entry
    with open(index, "ab") as f:
        f.write(b"caf\xe9\tA\tB\n")            # not UTF-8
    report = LoadReport("toy")
    articles = list(read_articles(index, data, report))
    assert [(a.headword, a.line) for a in articles] == [("alpha", 1), ("beta", 3)]
    assert articles[0].text == "alpha\n\n   text one\n" and articles[0].where == f"{index}:1"
    assert dict(report.rejected) == {"alias of an article already read": 2, "database info": 1,
                                     "malformed index line": 3, "index points past the end of the data": 1}
    assert report.examples["alias of an article already read"] == f"{index}:2"
    assert report.examples["malformed index line"] == f"{index}:6"
    assert report.examples["index points past the end of the data"] == f"{index}:8"


def test_plain_dict_file_and_corrupt_dictzip(tmp_path):
    index, data = write_dictd(tmp_path, "plain", [(["x"], "x\n\n   y\n")], compress=False)
    assert data.name == "plain.dict"
    assert [a.text for a in read_articles(index, data, LoadReport("plain"))] == ["x\n\n   y\n"]
    index, data = write_dictd(tmp_path, "bad", [(["x"], "x\n\n   y\n" * 50)])
    data.write_bytes(gzip.compress(b"x" * 1000)[:20])  # truncated stream
    with pytest.raises(LoadError, match="cannot read"):
        list(read_articles(index, data, LoadReport("bad")))


def test_missing_dictionary_names_the_debian_package(tmp_path):
    with pytest.raises(DictdNotFound) as e:
        dictionary_files(tmp_path, "gcide", "dict-gcide")
    message = str(e.value)
    assert "apt-get install dict-gcide" in message and "gcide.index" in message and "gcide.dict.dz" in message
    with pytest.raises(DictdNotFound, match="apt-get install dict-foldoc"):
        load_dictd("foldoc", tmp_path)
    with pytest.raises(ValueError, match="unknown dictionary 'webster'"):
        load_dictd("webster", tmp_path)


# ------------------------------------------------------------------------------------------------- the parsers


def test_gcide(dictd_dir):
    records, report = load_dictd("gcide", dictd_dir)
    assert rows_of(records) == [
        ("0", "café", "a small restaurant where coffee and light meals are served", "", "n"),
        ("1", "lantern", "a case, often of metal and glass, that shelters a light from wind and rain",
         "she carried a lantern to the barn", "n"),
        ("2", "lantern", "a small turret on a roof, open or glazed at the sides, that lets in light or air",
         "The old lantern over the hall was glazed anew.", "n"),
        ("3a", "lantern", "a light shown at the masthead of a vessel", "", "n"),
        ("3b", "lantern", "the glazed room at the top of a lighthouse", "", "n"),
        ("c1", "dark lantern", "a lantern whose light can be hidden by a sliding shutter", "", None),
        ("0", "wander", "to move about without a fixed course or goal; to roam", "the goats wandered over the hills",
         "v"),
    ]
    assert {r.source for r in records} == {"gcide"} and {r.genre for r in records} == {"general"}
    index = dictd_dir / "gcide.index"
    assert_report(report, kept=7, rejected={"cross-reference only": 2, "alias of an article already read": 2,
                                            "malformed head": 1, "WordNet gloss": 1, "definition too long": 1})
    lantern = index_line(dictd_dir, "gcide", "Lantern")
    assert report.examples == {
        "cross-reference only": f"{index}:{lantern} (sense c2)",              # {Magic lantern}. See under ...
        "alias of an article already read": f"{index}:{index_line(dictd_dir, 'gcide', 'Wandered')}",
        "malformed head": f"{index}:{index_line(dictd_dir, 'gcide', 'Lorem')}",
        "WordNet gloss": f"{index}:{index_line(dictd_dir, 'gcide', 'Snowboard')}",
        "definition too long": f"{index}:{index_line(dictd_dir, 'gcide', 'Tediousness')}",
    }
    assert report.details["articles"] == 7 and report.details["with_context"] == 3


def test_foldoc(dictd_dir):
    records, report = load_dictd("foldoc", dictd_dir)
    assert rows_of(records) == [
        ("1", "FOO", "Functional Object Oracle", "", None),
        ("2", "FOO", "a protocol that sends every packet twice, in case the first one was lonely", "", None),
        ("0", "sprocket cache", "a small fast memory that keeps recently used sprockets close to the processor",
         "The sprocket cache was cold after the reboot.", None),  # the quoted title is not a usage example
    ]
    index = dictd_dir / "foldoc.index"
    assert_report(report, kept=3, rejected={"cross-reference only": 1, "no sense found": 1,
                                            "alias of an article already read": 1, "from the Jargon File": 1})
    assert report.examples["from the Jargon File"] == f"{index}:{index_line(dictd_dir, 'foldoc', 'zork mode')}"
    assert report.examples["no sense found"] == f"{index}:{index_line(dictd_dir, 'foldoc', 'lonely')}"
    assert {r.genre for r in records} == {"technical"}


def test_jargon(dictd_dir):
    records, report = load_dictd("jargon", dictd_dir)
    assert rows_of(records) == [
        ("1", "frobulate", "to adjust something without knowing why it helps",
         "I frobulated the config file and now the build works.", "v"),
        ("3", "frobulate", "to wander the corridors looking busy", "", "v"),
        ("0", "glorp", "a bug that shows up only on Fridays", "", "n"),
        ("0", "glorpage", "a bug that shows up only on Fridays", "", "n"),
    ]
    index = dictd_dir / "jargon.index"
    assert_report(report, kept=4, rejected={"cross-reference only": 1, "duplicate": 1, "no sense found": 1})
    frobulate = index_line(dictd_dir, "jargon", "frobulate")
    assert report.examples["cross-reference only"] == f"{index}:{frobulate} (sense 2)"
    assert report.examples["no sense found"] == f"{index}:{index_line(dictd_dir, 'jargon', 'orphan line')}"


def test_devil(dictd_dir):
    records, report = load_dictd("devil", dictd_dir)
    assert rows_of(records) == [
        ("0", "rumour", 'to spread "what everybody knows" about nobody in particular',
         "They rumoured that the bishop could dance.", "v"),
        ("0", "umbrella", "a portable roof that is always at home when it rains",
         "My umbrella is a loyal friend Who stays indoors until the end.", "n"),  # the verse, without its author
    ]
    index = dictd_dir / "devil.index"
    assert_report(report, kept=2, rejected={"malformed head": 1, "alias of an article already read": 1,
                                            "verse only": 1})
    assert report.examples["verse only"] == f"{index}:{index_line(dictd_dir, 'devil', 'silence')}"
    assert report.examples["malformed head"] == f"{index}:{index_line(dictd_dir, 'devil', 'q')}"


def test_load_any_and_overrides(dictd_dir):
    records, report = load_any({"format": "dictd", "dictionary": "devil", "dictd_dir": str(dictd_dir),
                                "source": "bierce", "genre": "humour", "split": "test"})
    assert {(r.source, r.genre, r.split) for r in records} == {("bierce", "humour", "test")}
    assert report.source == "dictd:devil"
    with pytest.raises(ValueError, match="not 'path'"):
        load_any({"format": "dictd", "dictionary": "devil", "path": str(dictd_dir)})


def test_only_public_domain_dictionaries_may_ship():
    assert {name for name, d in DICTIONARIES.items() if d.shippable} == {"jargon", "devil"}
    assert DICTIONARIES["gcide"].licence.startswith("GPL") and DICTIONARIES["foldoc"].licence.startswith("GFDL")


# ------------------------------------------------------------------------------------------------- text helpers


def test_first_sentence_skips_abbreviations():
    assert first_sentence("Used e.g. in the U. S. Army. Then more.") == "Used e.g. in the U. S. Army."
    assert first_sentence("A tool, etc. and more. Next one.") == "A tool, etc. and more."
    assert first_sentence("No end here") == "No end here"
    assert first_sentence('He said "Stop." Then left.') == 'He said "Stop."'


def test_finish_definition_reasons():
    assert finish_definition("(Bot.) A {plant} of the bean family. [Obs.] Grows wild.") == (
        "A plant of the bean family", None)
    assert finish_definition("See {Lamp}.") == (None, "cross-reference only")
    assert finish_definition("imp. & p. p. of {Wander}.") == (None, "cross-reference only")
    assert finish_definition("[Obs.] (Bot.) .") == (None, "empty definition")
    long = " ".join(["word"] * 45)
    assert finish_definition(long) == (None, "definition too long")
    assert cap_words("one two; three four; " + long, 40) == "one two; three four"


def test_lowercase_initials_keeps_names():
    records = [Record(term=t, context="", definition=d, source="x") for t, d in [
        ("a", "A thing that runs"), ("b", "Unix clone for the Unix faithful"), ("c", "Computer Definition Language"),
        ("d", "Pertaining to boats"), ("e", "Runs the Unix kernel")]]
    assert lowercase_initials(records) == 3
    # "Unix" is written capitalised mid-sentence (a name); "Computer Definition Language" is a title
    assert [r.definition for r in records] == ["a thing that runs", "Unix clone for the Unix faithful",
                                               "Computer Definition Language", "pertaining to boats",
                                               "runs the Unix kernel"]


def test_term_matching_and_quotes():
    match = TermMatcher()
    assert match("retreat", "v", "The army retreated at dawn.")
    assert match("ice cream", None, "an ice-cream cone") and match("C++", None, "written in C++, mostly")
    assert not match("hack", "v", "a hacker")
    assert quoted_spans('a "cache line" or "It works now."') == ["It works now."]
    assert plain_term("Cascara buckthorn") == "cascara buckthorn" and plain_term("Kuro-Siwo") == "Kuro-Siwo"
