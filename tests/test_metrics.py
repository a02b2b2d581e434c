"""Metrics against hand-computed values (shared/DESIGN.md §4). Each expected number is worked out in the comment."""
import math
import sys

import pytest

from lm_lexicon.metrics import (MetricSettings, ReferenceSet, breakdown, compute_metrics, expand_metric_names,
                                format_results, headword_references, nltk_method2_bleu, sentence_bleu_a,
                                strip_periods)
from lm_lexicon.metrics.bleu import bleu_a_scores


def P(prediction, references, term="t", split="test", lang="en", **kw):
    return {"term": term, "context": "", "prediction": prediction, "references": list(references), "lang": lang,
            "split": split, **kw}


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("a tree.", "a tree"), ("3.5 cm.", "3.5 cm"), ("e.g. 3.5 ft.", "eg 3.5 ft"), ("U.S.A", "USA"),
    ("no periods", "no periods"), (".", ""), ("v.2 .5 x.", "v.2 .5 x"),
])
def test_strip_periods_removes_periods_not_followed_by_a_digit(text, expected):
    assert strip_periods(text) == expected


# --------------------------------------------------------------------------------------------------------------
# Protocol A: Moses sentence-bleu, hand-computed
# --------------------------------------------------------------------------------------------------------------

def test_protocol_a_partial_match():
    # hyp a b c d / ref a b c e: matches/totals 3/4, 2/3, 1/2, 0/1 -> (4/5, 3/4, 2/3, 1/2); c = r = 4, no BP.
    expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25  # = 0.2 ** 0.25 = 0.668740
    assert sentence_bleu_a("a b c d", ["a b c e"]) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.668740305, abs=1e-9)


def test_protocol_a_short_hypothesis_gets_precision_one_on_missing_orders_and_a_brevity_penalty():
    # hyp "a" / ref "a b c": unigram (1+1)/(1+1); orders 2-4 have 0 n-grams -> (0+1)/(0+1) = 1; BP exp(1 - 3/1).
    assert sentence_bleu_a("a", ["a b c"]) == pytest.approx(math.exp(-2), abs=1e-12)
    # hyp "a b" / ref "a b c d": all precisions 1; BP exp(1 - 4/2) = e^-1.
    assert sentence_bleu_a("a b", ["a b c d"]) == pytest.approx(math.exp(-1), abs=1e-12)


def test_protocol_a_zero_matches_still_scores_through_the_plus_one():
    # hyp x y z / ref "x1 x2 x3": (0+1)/(3+1), 1/3, 1/2, 1 -> (1/24)^(1/4) = 0.451801; c = r = 3.
    assert sentence_bleu_a("x y z", ["p q r"]) == pytest.approx((1 / 24) ** 0.25, abs=1e-12)
    # NLTK method2 returns 0 when no unigram matches: one reason its mean is lower than Protocol A's.
    assert nltk_method2_bleu("x y z", ["p q r"]) == 0.0
    # ... and NLTK gives an order without hypothesis n-grams (0+1)/(1+1) = 1/2 where Moses gives (0+1)/(0+1) = 1
    assert nltk_method2_bleu("a b c", ["a b c"]) == pytest.approx(0.5 ** 0.25)
    assert sentence_bleu_a("a b c", ["a b c"]) == pytest.approx(1.0)


def test_protocol_a_multi_reference_clipping_and_closest_length():
    # hyp the cat sat / refs "the cat" (2), "a cat sat on the mat" (6): r = 2 (closest to c = 3), no BP.
    # unigrams 3/3 -> 4/4; bigrams "the cat" (ref 1), "cat sat" (ref 2) 2/2 -> 3/3; trigram 0/1 -> 1/2; 4-gram 1.
    assert sentence_bleu_a("the cat sat", ["the cat", "a cat sat on the mat"]) == pytest.approx(0.5 ** 0.25, abs=1e-12)


def test_protocol_a_clips_repeated_ngrams_by_the_max_reference_count():
    # hyp the the the / ref the cat: unigram min(3, 1) = 1 -> 2/4; bigrams 0/2 -> 1/3; trigram 0/1 -> 1/2; 4-gram 1.
    assert sentence_bleu_a("the the the", ["the cat"]) == pytest.approx((1 / 12) ** 0.25, abs=1e-12)


def test_protocol_a_tie_on_reference_length_takes_the_shorter():
    # c = 3, reference lengths 2 and 4 are equally close: r = 2 -> no BP -> (1/24)^(1/4).
    # (Had r been 4: x exp(1 - 4/3) = 0.3237.)
    refs = ReferenceSet(["p q", "p q r s"])
    assert refs.closest_length(3) == 2
    assert sentence_bleu_a("x y z", refs) == pytest.approx((1 / 24) ** 0.25, abs=1e-12)


def test_protocol_a_is_case_sensitive_and_whitespace_tokenized():
    # hyp "A b" / ref "a b": unigram 1/2 -> 2/3; bigram 0/1 -> 1/2; orders 3-4 -> 1: (1/3)^(1/4).
    assert sentence_bleu_a("A b", ["a b"]) == pytest.approx((1 / 3) ** 0.25, abs=1e-12)
    # "b," is one token, not "b" + ","
    assert sentence_bleu_a("a b,", ["a b"]) == pytest.approx(sentence_bleu_a("a c", ["a b"]), abs=1e-12)


def test_protocol_a_empty_hypothesis_is_zero():
    assert sentence_bleu_a("", ["a b"]) == 0.0
    assert sentence_bleu_a(".", ["a b"]) == 0.0  # empty after period stripping
    assert sentence_bleu_a("   ", ["a"]) == 0.0


def test_protocol_a_strips_periods_on_both_sides():
    assert sentence_bleu_a("a tree.", ["a tree"]) == pytest.approx(1.0)
    assert sentence_bleu_a("a 3.5 cm tree", ["a 3.5 cm tree."]) == pytest.approx(1.0)
    assert sentence_bleu_a("a 35 cm tree", ["a 3.5 cm tree"]) < 1.0


def test_protocol_a_needs_a_reference():
    with pytest.raises(ValueError):
        sentence_bleu_a("a", [])


def test_protocol_a_groups_references_by_headword_within_a_split():
    preds = [P("a financial institution", ["sloping land beside a body of water"], term="bank"),
             P("sloping land", ["a financial institution"], term="bank"),
             P("a financial institution", ["a long ridge"], term="bank", split="valid")]
    groups = headword_references(preds)
    assert groups[("test", "bank")] == ["sloping land beside a body of water", "a financial institution"]
    assert groups[("valid", "bank")] == ["a long ridge"]
    scores = bleu_a_scores(preds)
    assert scores[0] == pytest.approx(100.0)  # the other sense's definition is a reference: exact match
    # "sloping land" vs closest-length reference: the 3-word "a financial institution" (c=2, r=3) -> BP e^(1-3/2);
    # precisions: 2/3 ("sloping", "land") -> 3/3, "sloping land" 1/1 -> 2/2, orders 3-4 -> 1.
    assert scores[1] == pytest.approx(100 * math.exp(1 - 3 / 2), abs=1e-9)
    # the valid split is its own group: only "a" matches "a long ridge": (2/4, 1/3, 1/2, 1), c = r = 3
    assert scores[2] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9)
    # grouping off: the line's own 7-word reference: same precisions, BP exp(1 - 7/3)
    own = bleu_a_scores(preds, grouping="none")
    assert own[0] == pytest.approx(100 * (1 / 12) ** 0.25 * math.exp(1 - 7 / 3), abs=1e-9)


def test_protocol_a_uses_full_split_reference_groups_when_given():
    split = [{"term": "bank", "definition": "a financial institution", "split": "test"},
             {"term": "bank", "definition": "sloping land", "split": "test"}]
    groups = headword_references(split)
    sample = [P("sloping land", ["a financial institution"], term="bank")]  # the other sense is not in the sample
    assert bleu_a_scores(sample, reference_groups=groups)[0] == pytest.approx(100.0)
    assert bleu_a_scores(sample)[0] < 100.0
    r = compute_metrics(sample, ["bleu_a"], reference_groups=groups)["bleu_a"]
    assert r["value"] == pytest.approx(100.0)
    assert "given reference groups" in r["settings"]["references"]


# --------------------------------------------------------------------------------------------------------------
# Protocol B and the other text metrics
# --------------------------------------------------------------------------------------------------------------

def test_sacrebleu_sentence_hand_value_and_differs_from_protocol_a():
    # sacrebleu "exp" smoothing: an order with 0 matches gets 100 / (2^k * total): 4-gram -> 1/2.
    # precisions 3/4, 2/3, 1/2, 1/2 -> (1/8)^(1/4) = 0.594604 -> 59.4604 (Protocol A: 66.8740).
    r = compute_metrics([P("a b c d", ["a b c e"])], ["sacrebleu", "bleu_a"])
    assert r["sacrebleu"]["value"] == pytest.approx(100 * (1 / 8) ** 0.25, abs=1e-6)
    assert r["bleu_a"]["value"] == pytest.approx(100 * 0.2 ** 0.25, abs=1e-6)
    assert "tok:13a" in r["sacrebleu"]["settings"]["signature"]
    assert r["sacrebleu"]["settings"]["protocol"].startswith("B")
    assert r["bleu_a"]["settings"]["protocol"].startswith("A")


def test_protocol_a_and_b_differ_where_they_should():
    preds = [P("a financial institution", ["sloping land beside water"], term="bank"),
             P("sloping land beside water", ["a financial institution"], term="bank"),
             P("x y z", ["p q r"], term="cat")]
    r = compute_metrics(preds, ["bleu_a", "sacrebleu"], {"keep_per_item": True})
    a, b = r["bleu_a"]["per_item"], r["sacrebleu"]["per_item"]
    # (1) headword grouping: A credits the other sense's definition, B scores against the line's own reference only
    assert a[0] == pytest.approx(100.0) and a[1] == pytest.approx(100.0)
    assert b[0] == 0.0 and b[1] == 0.0
    # (2) smoothing: no match at all is (1/24)^(1/4) under A's +1 on every order, 0 under sacrebleu
    assert a[2] == pytest.approx(100 * (1 / 24) ** 0.25, abs=1e-9) and b[2] == 0.0
    # both strip periods: identical up to the final period is a perfect score in both
    r2 = compute_metrics([P("a tree.", ["a tree"])], ["bleu_a", "sacrebleu"])
    assert r2["bleu_a"]["value"] == pytest.approx(100.0) and r2["sacrebleu"]["value"] == pytest.approx(100.0)


def test_rouge_l_hand_value_and_best_reference():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4; P = R = 4/6 -> F = 66.67
    r = compute_metrics([P("the cat sat on the mat", ["the cat lay on a mat"]),
                         P("the cat sat on the mat", ["dogs", "the cat sat on the mat."])], ["rouge_l"],
                        {"keep_per_item": True})["rouge_l"]
    assert r["per_item"][0] == pytest.approx(100 * 4 / 6)
    assert r["per_item"][1] == pytest.approx(100.0)
    assert r["value"] == pytest.approx((100 * 4 / 6 + 100) / 2)
    assert "rouge-score default" in r["settings"]["tokenizer"]
    assert r["settings"]["stemmer"] == "none"


def test_rouge_l_tokenizer_auto_switches_to_unicode_for_other_languages():
    en = compute_metrics([P("The cat!", ["the cat"])], ["rouge_l"])["rouge_l"]
    assert en["value"] == pytest.approx(100.0)  # lowercased, punctuation dropped
    # rouge-score's default tokenizer keeps only [a-z0-9]: Cyrillic vanishes (0), "über" becomes "ber" (a false match)
    ru = [P("собака", ["собака"], lang="ru"), P("über", ["ber"], lang="de")]
    default = compute_metrics(ru, ["rouge_l"], {"rouge_tokenizer": "default", "keep_per_item": True})["rouge_l"]
    assert default["per_item"] == [0.0, 100.0]
    auto = compute_metrics(ru, ["rouge_l"], {"keep_per_item": True})["rouge_l"]
    assert auto["per_item"] == [100.0, 0.0]
    assert auto["settings"]["tokenizer"].startswith("unicode")


def test_meteor_hand_values_and_wordnet_modes():
    # identical 3 tokens: P = R = 1, one chunk, frag = 1/3, penalty 0.5 (1/3)^3 -> (1 - 1/54) = 98.148
    exact = 100 * (1 - 0.5 / 27)
    r = compute_metrics([P("the cat sat.", ["The cat sat"])], ["meteor"], {"meteor_wordnet": "none"})["meteor"]
    assert r["value"] == pytest.approx(exact)
    assert r["settings"]["wordnet"].startswith("none")
    # "a big dog" / "a great dog": without synonyms 2 matches, P = R = 2/3, 2 chunks -> frag 1, penalty 1/2 -> 33.33
    preds = [P("a big dog", ["a great dog"])]
    none = compute_metrics(preds, ["meteor"], {"meteor_wordnet": "none"})["meteor"]
    assert none["value"] == pytest.approx(100 / 3)
    # the packaged corpus has big/great in one synset: 3 matches, one chunk -> 98.148
    emb = compute_metrics(preds, ["meteor"], {"meteor_wordnet": "embedded"})["meteor"]
    assert emb["value"] == pytest.approx(exact)
    assert emb["settings"]["wordnet"].startswith("embedded")
    # "the man ran" / "the man runs": irregular "ran" needs WordNet's verb.exc, absent from the embedded synonyms:
    # 2 matches, 1 chunk, frag 1/2, penalty 1/16 -> (15/16)(2/3) = 62.5
    ran = [P("the man ran", ["the man runs"])]
    assert compute_metrics(ran, ["meteor"], {"meteor_wordnet": "embedded"})["meteor"]["value"] == pytest.approx(62.5)


def test_meteor_reads_a_wordnet_dict_directory_when_there_is_one():
    from lm_lexicon.data.wordnet import find_wordnet_dir

    try:
        d = find_wordnet_dir()
    except FileNotFoundError:
        pytest.skip("no WordNet dict directory on this machine (Debian: wordnet-base)")
    r = compute_metrics([P("the man ran", ["the man runs"])], ["meteor"], {"meteor_wordnet": "dir"})["meteor"]
    assert r["settings"]["wordnet"].startswith("wordnet-dir")
    assert str(d) in r["settings"]["wordnet"]
    assert r["value"] == pytest.approx(100 * (1 - 0.5 / 27))  # ran -> run (verb.exc) matches the stem of "runs"


def test_meteor_dir_mode_without_a_directory_is_skipped_not_zero(tmp_path):
    r = compute_metrics([P("a", ["a"])], ["meteor"], {"meteor_wordnet": "dir", "wordnet_dir": str(tmp_path)})["meteor"]
    assert r["value"] is None and "WordNet" in r["skipped_reason"]


def test_exact_match_distinct_and_length_hand_values():
    preds = [P("a tree.", ["a  tree"]), P("A tree", ["a tree"]), P("", ["x"]), P("a b a", ["q"]), P("a c", ["q"])]
    r = compute_metrics(preds, ["exact_match", "length"], {"keep_per_item": True})
    assert r["exact_match"]["per_item"] == [100.0, 0.0, 0.0, 0.0, 0.0]
    lower = compute_metrics(preds, ["exact_match"], {"exact_match_lowercase": True})["exact_match"]
    assert lower["value"] == pytest.approx(40.0)
    assert r["length"]["per_item"] == [2.0, 2.0, 0.0, 3.0, 2.0]
    assert r["length"]["value"] == pytest.approx(9 / 5)
    assert r["length"]["extra"]["empty_predictions"] == 1
    assert r["length"]["extra"]["reference_mean"] == pytest.approx((2 + 2 + 1 + 1 + 1) / 5)
    # distinct over "a b a" + "a c": unigrams a b a a c -> 3/5; bigrams "a b" "b a" "a c" -> 3/3
    d = compute_metrics(preds[3:], ["distinct"])
    assert d["distinct_1"]["value"] == pytest.approx(60.0)
    assert d["distinct_2"]["value"] == pytest.approx(100.0)
    assert d["distinct_1"]["std"] is None and d["distinct_1"]["per_item"] is None


def test_distinct_without_ngrams_is_skipped_not_zero():
    r = compute_metrics([P("", ["a"]), P("a", ["b"])], ["distinct_2"])["distinct_2"]
    assert r["value"] is None and "no 2-gram" in r["skipped_reason"]


def test_language_compliance():
    preds = [P("the dog is a domestic animal that barks at strangers", ["x"], lang="en"),
             P("el perro es un animal doméstico que ladra a los desconocidos", ["x"], lang="es"),
             P("", ["x"], lang="en"),
             P("the dog is a domestic animal that barks at strangers", ["x"], lang="fr")]
    r = compute_metrics(preds, ["language_compliance"], {"keep_per_item": True})["language_compliance"]
    assert r["per_item"] == [100.0, 100.0, 0.0, 0.0]
    assert r["value"] == pytest.approx(50.0)
    assert "langid" in r["settings"]["identifier"]
    assert {"en", "es", "fr"} <= set(r["settings"]["languages"])
    assert r["settings"]["detected"]["fr"] == {"en": 1}


# --------------------------------------------------------------------------------------------------------------
# compute_metrics plumbing: skipped metrics, settings, aliases, breakdown
# --------------------------------------------------------------------------------------------------------------

def test_moverscore_is_skipped_with_a_reason_never_zero():
    r = compute_metrics([P("a", ["a"])], ["moverscore"])["moverscore"]
    assert r["value"] is None and r["std"] is None
    assert "offline" in r["skipped_reason"]


def test_missing_optional_packages_are_reported_as_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "mauve", None)  # import mauve -> ImportError
    monkeypatch.setitem(sys.modules, "bert_score", None)
    r = compute_metrics([P("a b", ["a b"]), P("c d", ["c d"])], ["mauve", "bertscore", "bleu_a"])
    assert r["mauve"]["value"] is None and "mauve-text" in r["mauve"]["skipped_reason"]
    assert r["bertscore"]["value"] is None and "bert-score" in r["bertscore"]["skipped_reason"]
    assert r["bleu_a"]["value"] == pytest.approx(100.0)


def test_result_shape_settings_and_aliases():
    assert expand_metric_names(["distinct", "language", "distinct_1"]) == ["distinct_1", "distinct_2",
                                                                          "language_compliance"]
    with pytest.raises(ValueError):
        expand_metric_names(["bleu4"])
    r = compute_metrics([P("a b", ["a b"]), P("a", ["a b"])], ["bleu_a"], {"keep_per_item": False})["bleu_a"]
    assert set(r) == {"value", "std", "n", "per_item", "settings", "skipped_reason", "extra"}
    assert r["per_item"] is None and r["n"] == 2 and r["skipped_reason"] is None
    # 100 and 100 e^(1 - 2/1): mean and sample std
    vals = [100.0, 100 * math.exp(-1)]
    assert r["value"] == pytest.approx(sum(vals) / 2)
    assert r["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert "periods" in r["settings"]["preprocessing"]
    with pytest.raises(ValueError):
        compute_metrics([P("a", [])], ["bleu_a"])
    with pytest.raises(ValueError):
        MetricSettings.from_any({"no_such_setting": 1})
    assert compute_metrics([], ["bleu_a"])["bleu_a"]["skipped_reason"] == "no predictions"
    assert "| bleu_a |" in format_results(compute_metrics([P("a", ["a"])], ["bleu_a", "moverscore"]))


def test_settings_from_eval_config():
    from lm_lexicon.config import EvalConfig

    s = MetricSettings.from_any(EvalConfig(bertscore_model="some/model"))
    assert s.bertscore_model == "some/model"


def test_breakdown_by_source_reuses_per_line_values_and_recomputes_corpus_metrics():
    preds = [P("a b", ["a b"], source="x"), P("a", ["a b"], source="x"), P("c d", ["e f"], source="y", term="u")]
    full = compute_metrics(preds, ["bleu_a", "distinct_1"], {"keep_per_item": True})
    by = breakdown(preds, ["bleu_a", "distinct_1"], by="source", results=full)
    assert sorted(by) == ["x", "y"]
    assert by["x"]["bleu_a"]["value"] == pytest.approx((100 + 100 * math.exp(-1)) / 2)
    assert by["x"]["bleu_a"]["n"] == 2
    assert by["y"]["bleu_a"]["value"] == pytest.approx(100 * (1 / 3 * 1 / 2) ** 0.25)  # (1/3, 1/2, 1, 1)
    assert by["x"]["distinct_1"]["value"] == pytest.approx(100 * 2 / 3)  # a b a
    assert by["y"]["distinct_1"]["value"] == pytest.approx(100.0)
    by_fn = breakdown(preds, ["bleu_a"], by=lambda p: len(p["prediction"]) > 1)
    assert by_fn[True]["bleu_a"]["n"] == 2


# --------------------------------------------------------------------------------------------------------------
# Model-based metrics with the bundled MiniLM (loaded once)
# --------------------------------------------------------------------------------------------------------------

def test_bertscore_bundled_minilm(one_torch_thread):
    preds = [P("a small domesticated carnivore", ["a small domesticated carnivore."]),
             P("a large body of water", ["a financial institution", "a large body of water"]),
             P("", ["anything"]),
             P("a tree", ["a financial institution"])]
    r = compute_metrics(preds, ["bertscore"], {"keep_per_item": True})["bertscore"]
    assert r["skipped_reason"] is None
    f = r["per_item"]
    assert f[0] == pytest.approx(100.0, abs=1e-3)  # identical after period stripping
    assert f[1] == pytest.approx(100.0, abs=1e-3)  # best of the references
    assert f[2] == 0.0  # empty candidate: bert-score's rule
    assert 0.0 < f[3] < 95.0
    assert r["settings"]["model"] == "bundled-minilm"
    assert r["settings"]["layer"] == "6 of 6"
    assert r["settings"]["baseline_rescaling"] == "off"
    assert r["extra"]["precision"] is not None and r["extra"]["recall"] is not None
    layer3 = compute_metrics(preds, ["bertscore"], {"bertscore_layer": 3, "bertscore_rescale": True,
                                                    "keep_per_item": True})["bertscore"]
    assert layer3["settings"]["layer"] == "3 of 6"
    assert layer3["settings"]["baseline_rescaling"].startswith("off (asked for")
    assert layer3["per_item"][3] != pytest.approx(f[3], abs=1e-3)


def test_bertscore_model_not_available_offline_is_skipped(monkeypatch):
    monkeypatch.delenv("LM_LEXICON_ALLOW_DOWNLOADS", raising=False)
    r = compute_metrics([P("a", ["a"])], ["bertscore"], {"bertscore_model": "no-such-org/no-such-model-xyz"})
    assert r["bertscore"]["value"] is None
    assert "not in the local Hugging Face cache" in r["bertscore"]["skipped_reason"]


def test_mauve_identical_sets_score_100(one_torch_thread):
    pytest.importorskip("mauve")
    defs = ["a small domesticated carnivore", "a large body of water", "a financial institution", "a tall plant",
            "the act of running", "a person who teaches", "of or relating to the sea", "a loud noise"] * 3
    preds = [P(d, [d]) for d in defs]
    r = compute_metrics(preds, ["mauve"])["mauve"]
    assert r["value"] == pytest.approx(100.0, abs=1e-6)
    assert r["settings"]["encoder"] == "bundled-minilm" and r["std"] is None
    shifted = compute_metrics([P("zzz qqq", [d]) for d in defs], ["mauve"])["mauve"]
    assert shifted["value"] < 90.0


# --------------------------------------------------------------------------------------------------------------
# Multilingual: compliance per language, the rule Best-of-N filters with, the BERTScore encoder option
# --------------------------------------------------------------------------------------------------------------

def test_language_compliance_per_language_counts_and_share():
    preds = [P("el perro es un animal doméstico que ladra a los desconocidos", ["x"], lang="es"),
             P("the dog is a domestic animal that barks at strangers", ["x"], lang="es"),
             P("le chien est un animal domestique qui aboie", ["x"], lang="fr")]
    full = compute_metrics(preds, ["language_compliance"])
    r = full["language_compliance"]
    per = r["settings"]["per_language"]
    assert per["es"] == {"n": 2, "compliant": 1, "share": 0.5, "compliance": 50.0}
    assert per["fr"] == {"n": 1, "compliant": 1, "share": 1.0, "compliance": 100.0}
    assert r["settings"]["detected"]["es"] == {"es": 1, "en": 1}
    by = breakdown(preds, ["language_compliance"], by="lang", results=full)
    assert by["es"]["language_compliance"]["value"] == pytest.approx(50.0) and by["fr"]["language_compliance"]["n"] == 1


def test_complies_is_the_metric_rule():
    from lm_lexicon.metrics.language import complies

    texts = ["el perro es un animal doméstico que ladra", "", "the dog is a domestic animal that barks"]
    assert complies(texts, ["es", "es", "es"]) == [True, False, False]
    assert complies([], []) == []
    with pytest.raises(ValueError):
        complies(["a"], [])


def test_settings_from_eval_config_carry_the_bertscore_layer():
    from lm_lexicon.config import EvalConfig

    s = MetricSettings.from_any(EvalConfig(bertscore_model="/models/bert-base-multilingual-cased", bertscore_layer=9))
    assert (s.bertscore_model, s.bertscore_layer) == ("/models/bert-base-multilingual-cased", 9)
    assert MetricSettings.from_any(EvalConfig()).bertscore_layer is None


def test_bertscore_encoder_from_a_local_directory_is_stated(tmp_path, one_torch_thread):
    """The multilingual option is a local encoder directory (here a link to the bundled MiniLM standing in for a
    local copy of bert-base-multilingual-cased): the settings name the model and the path used."""
    from pathlib import Path

    from lm_lexicon.partition.embed import resolve_encoder

    local = tmp_path / "encoder"
    local.symlink_to(resolve_encoder("bundled-minilm"), target_is_directory=True)
    preds = [P("animal doméstico que ladra", ["mamífero doméstico que ladra"], lang="es"),
             P("animal doméstico que ladra", ["animal doméstico que ladra"], lang="es")]
    r = compute_metrics(preds, ["bertscore"], {"bertscore_model": str(local), "bertscore_layer": 2})["bertscore"]
    assert r["skipped_reason"] is None and r["settings"]["model"] == str(local)
    assert r["settings"]["layer"] == "2 of 6" and Path(r["settings"]["model_path"]).is_dir()
    assert r["per_item"][1] == pytest.approx(100.0, abs=1e-3) and r["per_item"][0] < 100.0
