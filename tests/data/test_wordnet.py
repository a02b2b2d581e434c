"""The WordNet corpus builder (on a tiny fake dict directory) and the packaged corpus it produced.

The fake directory keeps these tests independent of /usr/share/wordnet, which CI machines do not have; only the
``slow`` test rebuilds from the real files.
"""
from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import pytest

from lm_lexicon.data import wordnet as wn
from lm_lexicon.data.records import SPLITS, LoadError, read_jsonl

HEADER = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license.  ",
    "  3 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  ",
]

NOUNS = [
    '00001000 05 n 01 goose 0 001 @ 00001100 n 0000 | web-footed long-necked bird; "geese flew overhead"; '
    '"a goose honked at us"  ',
    '00001100 05 n 02 bird 0 goose 1 000 | warm-blooded egg-laying vertebrate; "the bird sang"  ',
    '00001200 05 n 02 ice_cream 0 frozen_dessert 0 000 | a frozen dessert; "she loves ice-cream"; '
    '"two ice creams please"  ',
    "00001300 03 n 01 entity 0 000 | that which is perceived to exist  ",
    '00001400 05 n 01 lonely_lemma 0 000 | a word nobody uses; "nothing matches here"  ',
    "this line is not a synset",
    '00001500 05 n 01 berry 0 000 | a small fruit; "we picked berries"  ',
]
VERBS = [
    '00002000 38 v 01 run 0 001 @ 00002100 v 0000 01 + 02 00 | move fast by using one\'s feet; '
    '"he ran to the store"; "she is running late"; "dogs run"  ',
    '00002100 38 v 01 stop 0 000 01 + 02 00 | come to a halt; "the car stopped"; "stopping is hard"  ',
    '00002200 32 v 02 look_up 0 consult 0 000 02 + 08 00 + 22 02 | seek information from; '
    '"she looked up the word"; "consult the dictionary"  ',
    '00002300 38 v 01 bake 0 000 | cook in an oven; "she is baking bread"  ',
]
ADJS = [
    '00003000 00 a 01 big 0 000 | above average in size; "a bigger house"; "the biggest dog"  ',
    '00003100 00 s 01 ready(p) 0 000 | completely prepared; "ready to go"  ',
    '00003200 00 a 01 good 0 000 | having desirable qualities; "a better plan"  ',
]
ADVS = [
    '00004000 02 r 01 fast 0 000 | quickly; "he ran faster than me"  ',
]


def write_dict(root: Path, nouns=NOUNS, verbs=VERBS, adjs=ADJS, advs=ADVS) -> Path:
    """A minimal WordNet dict directory in the real wndb layout."""
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in (("noun", nouns), ("verb", verbs), ("adj", adjs), ("adv", advs)):
        (root / f"data.{name}").write_text("\n".join(HEADER + list(lines)) + "\n", encoding="utf-8")
    (root / "noun.exc").write_text("geese goose\n", encoding="utf-8")
    (root / "verb.exc").write_text("ran run\nbroken\n", encoding="utf-8")  # second line is malformed
    (root / "adj.exc").write_text("better good\nbest good\n", encoding="utf-8")
    return root


@pytest.fixture()
def fake_dir(tmp_path: Path) -> Path:
    return write_dict(tmp_path / "dict")


def triples(records):
    return {(r.term, r.context) for r in records}


# ---------------------------------------------------------------------------------------------------- parsing

def test_parse_gloss_definition_and_examples():
    d, ex = wn.parse_gloss('move fast; "he ran"; "she runs daily" - Anon  ')
    assert d == "move fast"
    assert ex == ["he ran", "she runs daily"]
    assert wn.parse_gloss("that which exists  ") == ("that which exists", [])
    # unbalanced quote (a real WordNet 3.0 quirk): keep what is paired, never crash
    assert wn.parse_gloss('a branch"') == ("a branch", [])


def test_parse_data_line_fields():
    ss = wn.parse_data_line(VERBS[2], "v")
    assert (ss.offset, ss.pos, ss.key) == ("00002200", "v", "v00002200")
    assert ss.lemmas == ["look up", "consult"]
    assert ss.definition == "seek information from"
    assert ss.examples == ["she looked up the word", "consult the dictionary"]
    sat = wn.parse_data_line(ADJS[1], "a")
    assert sat.ss_type == "s" and sat.pos == "a" and sat.lemmas == ["ready"]  # "(p)" marker stripped
    with pytest.raises(wn.MalformedLine):
        wn.parse_data_line("this line is not a synset", "n")
    with pytest.raises(wn.MalformedLine):
        wn.parse_data_line(NOUNS[0], "v")  # a noun in the verb file


# ---------------------------------------------------------------------------------------------------- matching

@pytest.mark.parametrize("lemma,pos,text,expected", [
    ("goose", "n", "geese flew overhead", True),            # noun.exc
    ("run", "v", "he ran to the store", True),               # verb.exc
    ("run", "v", "she is running late", True),               # consonant doubling
    ("bake", "v", "she is baking bread", True),              # e-dropping
    ("stop", "v", "the car stopped", True),
    ("berry", "n", "we picked berries", True),               # -ies
    ("big", "a", "the biggest dog", True),                   # -est with doubling
    ("good", "a", "a better plan", True),                    # adj.exc
    ("ice cream", "n", "she loves Ice-Cream", True),          # hyphen, case-insensitive
    ("look up", "v", "she looked up the word", True),         # multi-word verb inflects its first word
    ("run", "v", "the runway was wet", False),               # whole words only
    ("goose", "n", "a mongoose", False),
])
def test_lemma_matching(fake_dir, lemma, pos, text, expected):
    matcher = wn.LemmaMatcher(wn.read_exceptions(fake_dir))
    assert matcher(lemma, pos, text) is expected


# ---------------------------------------------------------------------------------------------------- building

def test_build_triples_and_report(fake_dir):
    records, report, stats = wn.build_wordnet_corpus(fake_dir, seed=0, progress=False)
    got = triples(records)
    assert ("goose", "geese flew overhead") in got
    assert ("goose", "the bird sang") not in got  # goose is a lemma of the bird synset, but absent from its example
    assert ("bird", "the bird sang") in got
    assert ("ice cream", "she loves ice-cream") in got and ("ice cream", "two ice creams please") in got
    assert ("look up", "she looked up the word") in got and ("consult", "consult the dictionary") in got
    assert ("ready", "ready to go") in got
    assert ("fast", "he ran faster than me") in got
    r = next(r for r in records if r.term == "run" and r.context == "he ran to the store")
    assert r.definition == "move fast by using one's feet"
    assert (r.source, r.lang, r.pos, r.sense_id) == ("wordnet", "en", "v", "run%v00002000")
    assert len({r.sense_id + r.context for r in records}) == len(records)

    report.check()
    assert report.read == report.kept + report.n_rejected
    assert report.kept == len(records)
    assert report.rejected["malformed data line"] == 1
    assert "data.noun:" in report.examples["malformed data line"]
    assert report.rejected["no examples"] == 1                # entity
    assert report.rejected["lemma not in example"] == 1       # lonely_lemma
    assert report.rejected["malformed exc line"] == 1         # "broken" in verb.exc
    assert stats["wordnet_version"] == "3.0"
    assert stats["header_lines"] == 4 * len(HEADER)
    assert stats["counts"]["total"]["triples"] == len(records)


def test_unreadable_file_raises_load_error_with_line(fake_dir):
    path = fake_dir / "data.verb"
    path.write_bytes(path.read_bytes() + b"00009999 38 v 01 caf\xe9 0 000 | bad bytes\n")
    with pytest.raises(LoadError) as e:
        wn.build_wordnet_corpus(fake_dir, progress=False)
    assert e.value.path.endswith("data.verb") and e.value.line == len(HEADER) + len(VERBS) + 1


def test_missing_data_file_raises(fake_dir):
    (fake_dir / "data.adv").unlink()
    with pytest.raises(LoadError, match="data.adv"):
        wn.build_wordnet_corpus(fake_dir, progress=False)


def test_find_wordnet_dir(fake_dir, tmp_path, monkeypatch):
    assert wn.find_wordnet_dir(fake_dir) == fake_dir
    with pytest.raises(FileNotFoundError):
        wn.find_wordnet_dir(tmp_path / "nowhere")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk"))
    assert tmp_path / "nltk" / "corpora" / "wordnet" in wn._candidate_dirs()
    missing = [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setattr(wn, "_candidate_dirs", lambda: missing)
    with pytest.raises(FileNotFoundError) as e:
        wn.find_wordnet_dir()
    assert str(missing[0]) in str(e.value) and str(missing[1]) in str(e.value)
    monkeypatch.setattr(wn, "_candidate_dirs", lambda: missing + [fake_dir])
    assert wn.find_wordnet_dir() == fake_dir


# ---------------------------------------------------------------------------------------------------- split

def assert_leak_free(records):
    term_splits, synset_splits = defaultdict(set), defaultdict(set)
    for r in records:
        term_splits[r.term.lower()].add(r.split)
        synset_splits[wn.synset_of(r)].add(r.split)
    assert all(len(s) == 1 for s in term_splits.values()), "a term crosses splits"
    assert all(len(s) == 1 for s in synset_splits.values()), "a synset crosses splits"


@pytest.fixture()
def many_dir(tmp_path: Path) -> Path:
    """Enough synsets for a meaningful split: 150 singletons, chains sharing lemmas, and one big component."""
    nouns = list(NOUNS)
    off = 10000
    for i in range(150):
        nouns.append(f'{off:08d} 05 n 01 thing{i} 0 000 | thing number {i}; "a thing{i} here"  ')
        off += 1
    for i in range(20):  # pairs joined by a shared lemma: one component of two synsets each
        for j in range(2):
            nouns.append(f'{off:08d} 05 n 02 pair{i} {j} mate{i}x{j} 0 000 | pair {i} sense {j}; '
                         f'"pair{i} and mate{i}x{j}"  ')
            off += 1
    for i in range(40):  # one polysemous word linking 40 synsets: must land in train whole
        nouns.append(f'{off:08d} 05 n 02 hub {i % 16:x} spoke{i} 0 000 | hub sense {i}; "hub and spoke{i}"  ')
        off += 1
    return write_dict(tmp_path / "many", nouns=nouns)


def test_split_is_leak_free_and_deterministic(many_dir):
    recs0, _, stats0 = wn.build_wordnet_corpus(many_dir, seed=0, progress=False)
    recs0b, _, _ = wn.build_wordnet_corpus(many_dir, seed=0, progress=False)
    recs1, _, _ = wn.build_wordnet_corpus(many_dir, seed=1, progress=False)
    assert_leak_free(recs0)
    assert_leak_free(recs1)
    assert [r.to_dict() for r in recs0] == [r.to_dict() for r in recs0b]
    # the seed, and only the seed, moves components between splits
    assignment = lambda recs: {(r.sense_id, r.context): r.split for r in recs}  # noqa: E731
    assert assignment(recs0) != assignment(recs1)
    assert assignment(recs0).keys() == assignment(recs1).keys()
    counts = stats0["counts"]
    total = counts["total"]["triples"]
    for s in ("valid", "test"):
        assert 0.05 * total <= counts[s]["triples"] <= 0.1 * total
    assert all(r.split == "train" for r in recs0 if r.term == "hub")
    cs = stats0["component_stats"]
    assert cs["largest"][0] == 80 and cs["big_to_train"] >= 1


def test_written_file_is_deterministic_and_readable(many_dir, tmp_path):
    recs, report, stats = wn.build_wordnet_corpus(many_dir, seed=3, progress=False)
    a, b = tmp_path / "a" / wn.CORPUS_FILE, tmp_path / "b" / wn.CORPUS_FILE
    sha_a = wn.write_corpus_gz(recs, a)
    sha_b = wn.write_corpus_gz(wn.build_wordnet_corpus(many_dir, seed=3, progress=False)[0], b)
    assert sha_a == sha_b and a.read_bytes() == b.read_bytes()
    assert [r.to_dict() for r in read_jsonl(a)] == [r.to_dict() for r in recs]
    doc = wn.counts_document(recs, stats, report, sha256=sha_a)
    assert doc["seed"] == 3 and doc["total"]["triples"] == len(recs)
    json.dumps(doc)  # serialisable as is


def test_main_writes_both_files(fake_dir, tmp_path, capsys):
    out = tmp_path / "res"
    assert wn.main(["--wordnet-dir", str(fake_dir), "--out-dir", str(out), "--no-progress"]) == 0
    doc = json.loads((out / wn.COUNTS_FILE).read_text())
    with gzip.open(out / wn.CORPUS_FILE, "rt") as f:
        assert sum(1 for _ in f) == doc["total"]["triples"]
    assert "read" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- packaged corpus

@pytest.fixture(scope="module")
def packaged():
    return wn.load_packaged_corpus()


def test_packaged_corpus_matches_counts(packaged):
    counts = wn.packaged_counts()
    assert counts["wordnet_version"] == "3.0" and isinstance(counts["seed"], int)
    assert len(packaged) == counts["total"]["triples"]
    assert len({r.term for r in packaged}) == counts["total"]["terms"]
    got = wn.split_counts(packaged)
    for s in SPLITS:
        assert got[s] == counts["splits"][s]
    assert len(wn.load_packaged_corpus("test")) == counts["splits"]["test"]["triples"]
    assert all(r.source == "wordnet" and r.term and r.context and r.definition for r in packaged)
    with pytest.raises(ValueError):
        wn.load_packaged_corpus("dev")


def test_packaged_corpus_is_leak_free(packaged):
    assert_leak_free(packaged)
    senses = defaultdict(set)
    for r in packaged:
        senses[r.sense_id].add(r.split)
    assert all(len(s) == 1 for s in senses.values())


@pytest.mark.slow
def test_rebuild_from_system_wordnet_matches_package(tmp_path):
    real = Path("/usr/share/wordnet")
    if not (real / "data.noun").is_file():
        pytest.skip("no WordNet dict at /usr/share/wordnet (apt-get install wordnet-base)")
    counts = wn.packaged_counts()
    records, report, stats = wn.build_wordnet_corpus(real, seed=counts["seed"], progress=False)
    doc = wn.counts_document(records, stats, report)
    assert doc["total"] == counts["total"]
    assert doc["splits"] == counts["splits"]
    assert wn.write_corpus_gz(records, tmp_path / wn.CORPUS_FILE) == counts["sha256"]
