"""Multilingual definition modeling (docs/MULTILINGUAL.md): per-language prompt templates (configurable, one function
for every caller), term-only records, the per-split multilingual JSONL fixtures, language compliance in the evaluate
stage and as a Best-of-N filter, and a two-language micro run through evaluation."""
import json
from pathlib import Path

import pytest

from lm_lexicon.config import ConfigError, EvalConfig, config_from_dict
from lm_lexicon.data.prompts import (MULTILINGUAL_TEMPLATE, TEMPLATES_FILE, LanguageTemplate, PromptTemplates,
                                     format_prompt, parse_templates, record_prompt)
from lm_lexicon.data.records import LoadError, Record

FIXTURES = Path(__file__).parent / "fixtures" / "multilingual"


# --------------------------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------------------------

def test_default_template_per_language_is_the_papers():
    assert format_prompt("perro", "", "es") == "Define the Spanish word 'perro'. Use only Spanish to reply."
    assert format_prompt("chien", "", "fr") == "Define the French word 'chien'. Use only French to reply."
    assert format_prompt("cão", "", "pt") == "Define the Portuguese word 'cão'. Use only Portuguese to reply."
    assert format_prompt("Hund", "", "de") == "Define the German word 'Hund'. Use only German to reply."
    # English keeps the context-first template, term-only when there is no context
    assert format_prompt("dog", "the dog barked") == '"the dog barked" What is the definition of "dog"?'
    assert format_prompt("dog", "") == 'What is the definition of "dog"?'
    # the multilingual template has no context slot: a context on a Spanish row is not shown
    assert format_prompt("perro", "el perro ladra", "es") == format_prompt("perro", "", "es")


def test_term_only_records_get_the_term_only_prompt_everywhere():
    for r in (Record("dog", "", "a domestic canine", "t"), Record("dog", None, "a domestic canine", "t"),
              Record("perro", "", "mamífero doméstico", "multilingual:es", lang="es")):
        expected = format_prompt(r.term, "", r.lang)
        assert record_prompt(r) == expected
        assert record_prompt(r.to_dict()) == expected


def test_string_template_and_context_fallback():
    t = parse_templates({"es": "Define la palabra '{term}'. Responde solo en español.",
                         "en": 'Context: {context}. Define "{term}" in {language}.'})
    assert t.format("perro", "", "es") == "Define la palabra 'perro'. Responde solo en español."
    assert t.format("dog", "it barked", "en") == 'Context: it barked. Define "dog" in English.'
    # a template with {context} is for rows that have one; a term-only row gets the language's term-only template
    assert t.format("dog", "", "en") == 'What is the definition of "dog"?'
    assert t.format("chien", "", "fr") == MULTILINGUAL_TEMPLATE.format(language="French", term="chien")


def test_mapping_template_sets_both_variants_and_literal_braces():
    t = parse_templates({"en": {"context": '"{context}" {{def}} "{term}"?',
                                "term_only": "Define the {language} word '{term}'. Use only {language} to reply."}})
    assert t.for_lang("en") == LanguageTemplate('"{context}" {{def}} "{term}"?',
                                                "Define the {language} word '{term}'. Use only {language} to reply.")
    assert t.format("dog", "x", "en") == '"x" {def} "dog"?'
    assert t.format("dog", "", "en") == "Define the English word 'dog'. Use only English to reply."
    assert parse_templates(t.to_config()) == t
    assert parse_templates({}) == parse_templates(None) and not parse_templates({}).overrides


@pytest.mark.parametrize("spec,message", [
    ({"es": "Define the word."}, r"must contain \{term\}"),
    ({"xx": "{term}"}, r"unknown language code 'xx'.*known: de, en, es, fr"),
    ({"es": "{term} {lemma}"}, r"unknown field \{lemma\}"),
    ({"es": "{term} {0}"}, r"unknown field \{0\}"),
    ({"es": "{term:>10}"}, r"must be plain"),
    ({"es": "{term"}, r"not a valid template"),
    ({"es": ""}, r"non-empty string"),
    ({"en": {"term_only": "{context} {term}"}}, r"term_only template cannot contain \{context\}"),
    ({"en": {"contexts": "{term}"}}, r"keys 'context' and/or 'term_only'"),
    ({"en": 3}, r"string or a mapping"),
])
def test_invalid_templates_are_rejected_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_templates(spec)


def test_recipe_field_is_validated():
    cfg = config_from_dict({"data": {"prompt_templates": {"es": "Define '{term}' ({language})."}}})
    assert cfg.data.prompt_templates == {"es": "Define '{term}' ({language})."}
    assert config_from_dict({}).data.prompt_templates == {}
    with pytest.raises(ConfigError, match=r"data\.prompt_templates.*unknown language code 'xx'"):
        config_from_dict({"data": {"prompt_templates": {"xx": "{term}"}}})
    with pytest.raises(ConfigError, match=r"data\.prompt_templates.*must contain \{term\}"):
        config_from_dict({}, ["data.prompt_templates={es: 'Define it.'}"])
    # templates are part of the data fingerprint: changing them recomputes every stage
    assert cfg.stage_hash("data") != config_from_dict({}).stage_hash("data")


def test_the_templates_argument_reaches_every_prompt_builder():
    from lm_lexicon import train
    from lm_lexicon.evaluate.baselines import format_few_shot_prompt

    cfg = config_from_dict({"data": {"prompt_templates": {"es": "Define la palabra '{term}'."}}})
    templates = PromptTemplates.from_config(cfg)
    r = Record("perro", "", "mamífero doméstico", "multilingual:es", lang="es")
    # training, generation, the reward model (which imports it from lm_lexicon.train), baselines / ICL / retrieval
    # and the partition embedding all build the text with record_prompt, from the templates they are given
    assert train.record_prompt is record_prompt
    assert record_prompt(r, templates) == format_prompt("perro", "", "es", templates=templates) == \
        "Define la palabra 'perro'."
    assert format_few_shot_prompt(r, [r], templates=templates).endswith("Define la palabra 'perro'.")
    # nothing is process state: without the argument every builder uses the defaults
    default = MULTILINGUAL_TEMPLATE.format(language="Spanish", term="perro")
    assert record_prompt(r) == format_prompt("perro", "", "es") == default


def test_templates_are_saved_with_a_model_and_loaded_from_it(tmp_path):
    templates = parse_templates({"es": "Define la palabra '{term}'.",
                                 "en": {"context": 'Context: {context}. Define "{term}".'}})
    (tmp_path / "model").mkdir()
    path = templates.save(tmp_path / "model")
    assert path == tmp_path / "model" / TEMPLATES_FILE
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["overrides"] == templates.to_config()
    assert doc["templates"]["fr"]["term_only"] == MULTILINGUAL_TEMPLATE  # every language, for other readers
    loaded = PromptTemplates.load(tmp_path / "model")
    assert loaded == templates
    assert loaded.format("bank", "the river bank") == 'Context: the river bank. Define "bank".'
    # a directory without the file (an external checkpoint, an older run) is the defaults
    assert PromptTemplates.load(tmp_path) == PromptTemplates() and not PromptTemplates.load(tmp_path).overrides
    # models that must share their templates
    (tmp_path / "other").mkdir()
    PromptTemplates().save(tmp_path / "other")
    assert PromptTemplates.agreed([tmp_path / "model", tmp_path / "model"]) == templates
    with pytest.raises(ValueError, match="other prompt templates"):
        PromptTemplates.agreed([tmp_path / "model", tmp_path / "other"])
    # a broken file is an error naming it, not silently the defaults
    path.write_text('{"format": "lm-lexicon-prompt-templates", "overrides": {"xx": "{term}"}}', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{TEMPLATES_FILE}.*unknown language code 'xx'"):
        PromptTemplates.load(tmp_path / "model")
    path.write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="invalid prompt templates"):
        PromptTemplates.load(tmp_path / "model")


def test_generation_builds_prompts_with_the_templates_saved_with_the_model(tmp_path, monkeypatch):
    from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings, generate_split
    from lm_lexicon.seed_models import tiny_llama

    model = tiny_llama(tmp_path / "model")
    custom = parse_templates({"es": "Define la palabra '{term}'."})
    custom.save(model)
    records = [Record("perro", "", "x", "t", lang="es"), Record("bank", "the river bank", "x", "t")]
    expected = ["Define la palabra 'perro'.", '"the river bank" What is the definition of "bank"?']
    seen: list[str] = []
    generate = DefinitionGenerator._generate

    def spy(self, prompts, domains):  # what the model is asked
        seen.extend(prompts)
        return generate(self, prompts, domains)

    monkeypatch.setattr(DefinitionGenerator, "_generate", spy)
    settings = GenerationSettings(max_new_tokens=2)
    assert DefinitionGenerator(model, settings=settings).record_prompts(records) == expected
    generate_split(records, model, settings, use_ray=False)
    assert seen == expected
    # given templates win (the untrained seed, which has none, asked in a run's training format)
    seen.clear()
    generate_split(records, model, settings, use_ray=False, templates=PromptTemplates())
    assert seen == [format_prompt("perro", "", "es"), expected[1]]


def test_serving_builds_the_same_prompt():
    schemas = pytest.importorskip("lm_lexicon.serving.schemas")
    templates = parse_templates({"fr": "Définis « {term} »."})
    item = schemas.DefinitionItem(term="chien", lang="fr")
    assert schemas.item_prompt(item, templates) == format_prompt("chien", "", "fr", templates=templates) == \
        "Définis « chien »."
    assert schemas.item_prompt(item) == format_prompt("chien", "", "fr")


# --------------------------------------------------------------------------------------------------------------
# Fixtures and loader
# --------------------------------------------------------------------------------------------------------------

def test_fixture_directories_load_with_their_splits():
    from lm_lexicon.data.loaders import load_any

    for lang in ("es", "fr"):
        rows, report = load_any({"format": "multilingual", "path": str(FIXTURES / lang), "lang": lang})
        assert report.read == report.kept == 46 and report.n_rejected == 0
        counts = {s: sum(r.split == s for r in rows) for s in ("train", "valid", "test")}
        assert counts == {"train": 30, "valid": 8, "test": 8}
        assert all(r.context == "" and r.lang == lang and r.source == f"multilingual:{lang}" for r in rows)
        assert len({r.term for r in rows}) == 46  # monosemic: one definition per term, no term crosses splits
        first = json.loads((FIXTURES / lang / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
        assert set(first) == {"id", "translation"} and set(first["translation"]) == {"word", "definition"}
        assert rows[0].sense_id == first["id"]


def test_gold_definitions_mostly_comply():
    """langid on the fixtures' own definitions: the metric's ceiling on real text (short Spanish definitions are
    sometimes taken for Portuguese)."""
    from lm_lexicon.data.loaders import load_multilingual
    from lm_lexicon.metrics.language import complies

    for lang, floor in (("es", 0.9), ("fr", 0.95)):
        rows, _ = load_multilingual(FIXTURES / lang, lang)
        ok = complies([r.definition for r in rows], [lang] * len(rows))
        assert sum(ok) / len(ok) >= floor


def test_multilingual_directory_layout_and_errors(tmp_path):
    from lm_lexicon.data.loaders import load_multilingual

    d = tmp_path / "de"
    d.mkdir()
    line = json.dumps({"id": "1", "translation": {"word": "Hund", "definition": "ein Haustier"}})
    (d / "train.jsonl").write_text(line + "\n")
    (d / "validation.jsonl").write_text(line.replace("Hund", "Katze") + "\nnot json\n")
    (d / "notes.txt").write_text("ignored")
    rows, report = load_multilingual(d, "de", split="test")  # file names win over the split argument
    assert [(r.term, r.split) for r in rows] == [("Hund", "train"), ("Katze", "valid")]
    assert report.rejected == {"malformed json": 1} and report.examples["malformed json"].endswith("validation.jsonl:2")
    (d / "dev.jsonl").write_text(line + "\n")
    with pytest.raises(LoadError, match="several files for the valid split"):
        load_multilingual(d, "de")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match=r"no \{train,valid,test\}.jsonl"):
        load_multilingual(empty, "de")


# --------------------------------------------------------------------------------------------------------------
# Evaluation: compliance on/off, BERTScore note, report section
# --------------------------------------------------------------------------------------------------------------

def test_compliance_is_added_for_non_english_rows_or_when_configured():
    from lm_lexicon.evaluate.stage import bertscore_note, evaluation_metrics

    en = [Record("dog", "", "d", "t")]
    mixed = en + [Record("perro", "", "d", "t", lang="es")]
    ev = EvalConfig(metrics=["bleu_a"])
    assert evaluation_metrics(ev, en) == ["bleu_a"]
    assert evaluation_metrics(ev, mixed) == ["bleu_a", "language_compliance"]
    assert evaluation_metrics(EvalConfig(metrics=["bleu_a"], language_compliance=True), en) == \
        ["bleu_a", "language_compliance"]
    assert evaluation_metrics(EvalConfig(metrics=["bleu_a"], language_compliance=False), mixed) == ["bleu_a"]
    assert evaluation_metrics(EvalConfig(metrics=["bleu_a", "language"]), mixed) == ["bleu_a", "language_compliance"]
    assert evaluation_metrics(EvalConfig(metrics=["distinct"]), en) == ["distinct_1", "distinct_2"]
    with pytest.raises(ValueError, match="language_compliance is false"):
        EvalConfig(metrics=["language_compliance"], language_compliance=False)
    assert "bert-base-multilingual-cased" in bertscore_note(EvalConfig(), ["bertscore"], mixed)
    assert bertscore_note(EvalConfig(), ["bertscore"], en) is None
    assert bertscore_note(EvalConfig(bertscore_model="/models/mbert"), ["bertscore"], mixed) is None


def test_language_section_of_the_report():
    from lm_lexicon.metrics import breakdown, compute_metrics
    from lm_lexicon.evaluate.stage import _strip, compliance_summary, render_report

    preds = [{"term": "perro", "prediction": "animal doméstico de la familia de los cánidos que ladra",
              "references": ["mamífero doméstico"], "lang": "es", "split": "test", "domain": 0, "source": "s"},
             {"term": "chien", "prediction": "the dog is a domestic animal that barks at strangers",
              "references": ["mammifère domestique"], "lang": "fr", "split": "test", "domain": 0, "source": "s"},
             {"term": "chat", "prediction": "petit animal domestique qui miaule et chasse les souris",
              "references": ["petit félin domestique"], "lang": "fr", "split": "test", "domain": 0, "source": "s"}]
    names = ["bleu_a", "rouge_l", "language_compliance"]
    res = compute_metrics(preds, names)
    by_lang = {"m": breakdown(preds, names, by="lang", results=res)}
    compact = {"m": {k: {kk: vv for kk, vv in v.items() if kk != "per_item"} for k, v in res.items()}}
    compliance = compliance_summary(compact)
    assert compliance == {"m": {"es": {"n": 1, "compliant": 1, "share": 1.0, "detected": {"es": 1}},
                                "fr": {"n": 2, "compliant": 1, "share": 0.5, "detected": {"en": 1, "fr": 1}}}}
    assert by_lang["m"]["fr"]["language_compliance"]["value"] == pytest.approx(50.0)
    meta = {"recipe": "r", "split": "test", "n_rows": 3, "seed": 0, "compliance_languages": ["en", "es", "fr"],
            "notes": ["a note"]}
    report = render_report(compact, {}, {}, meta, _strip(by_lang), compliance)
    assert "## By language" in report and "Note: a note" in report
    assert "| m | fr | 2 |" in report and "| 0.50 | 1 / 2 | en 1, fr 1 |" in report


# --------------------------------------------------------------------------------------------------------------
# Best-of-N language filter
# --------------------------------------------------------------------------------------------------------------

ES_OK = "animal doméstico de la familia de los cánidos que ladra"
EN = "a domestic animal of the dog family that barks at strangers"
FR_OK = "petit animal domestique qui miaule et chasse les souris"


def test_language_keep_mask_modes():
    from lm_lexicon.evaluate.best_of_n.steps import language_keep_mask

    cands = [[EN, ES_OK], [EN, EN], [EN, FR_OK]]
    langs = ["es", "en", "fr"]
    assert language_keep_mask(cands, langs, "non-english") == [[False, True], [True, True], [False, True]]
    assert language_keep_mask(cands, langs, "all") == [[False, True], [True, True], [False, True]]
    assert language_keep_mask(cands, langs, "off") is None
    assert language_keep_mask([[ES_OK]], ["en"], "non-english") is None  # applies to no input
    assert language_keep_mask([[ES_OK, ""]], ["en"], "all") == [[False, False]]
    with pytest.raises(ValueError, match="mode"):
        language_keep_mask(cands, langs, "some")


def test_filter_scores_pick_the_best_compliant_sample_or_fall_back_for_every_n():
    from lm_lexicon.evaluate.best_of_n.steps import filter_scores, language_filter_report
    from lm_lexicon.evaluate.best_of_n.reward import best_of_n

    scores = [[5.0, 1.0, 3.0], [2.0, 9.0, -4.0], [0.5, 0.7, 0.1]]
    keep = [[False, True, True], [False, False, False], [True, True, True]]
    filtered = filter_scores(scores, keep)
    cands = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    assert best_of_n(cands, filtered) == ["c", "e", "h"]  # best kept; fallback: best of all; untouched
    assert best_of_n([c[:1] for c in cands], [s[:1] for s in filtered]) == ["a", "d", "g"]  # N=1 prefix
    rep = language_filter_report(keep, ["es", "fr", "en"], n=3, mode="non-english")
    assert (rep["filtered"], rep["fallback"], rep["inputs"]) == (2, 1, 3)
    assert rep["by_language"]["fr"]["fallback"] == 1 and rep["by_language"]["en"]["filtered"] == 0
    assert rep["compliant_sample_share"] == pytest.approx(2 / 6)
    assert language_filter_report(keep, ["es", "fr", "en"], n=1, mode="non-english")["fallback"] == 2


def test_rerank_with_the_language_filter():
    from lm_lexicon.evaluate.best_of_n.steps import language_keep_mask, rerank

    class PrefersEnglish:  # a reward model that likes the wrong language
        def score_candidates(self, prompts, candidates):
            return [[1.0 if c == EN else 0.0 for c in cs] for cs in candidates]

    cands = [[EN, ES_OK], [EN, EN]]
    refs = [[ES_OK], ["animal doméstico"]]
    keep = language_keep_mask(cands, ["es", "es"], "non-english")
    out = rerank(PrefersEnglish(), ["p", "q"], cands, refs, [1, 2], keep=keep)
    assert out["picks"] == [ES_OK, EN]  # filtered; the second input falls back to all samples
    assert out["curves"]["reward model"][2] == pytest.approx(out["curves"]["oracle (upper bound)"][2])
    assert out["curves"]["language filter (first compliant)"][2] == out["curves"]["reward model"][2]
    plain = rerank(PrefersEnglish(), ["p", "q"], cands, refs, [1, 2])
    assert plain["picks"] == [EN, EN] and "language filter (first compliant)" not in plain["curves"]


def test_bon_report_states_the_filter():
    from lm_lexicon.evaluate.best_of_n.report import _language_filter_lines

    assert _language_filter_lines({}) == []
    assert "off" in _language_filter_lines({"mode": "off", "applied": False})[0]
    assert "no input it applies to" in _language_filter_lines({"mode": "non-english", "applied": False})[0]
    assert "skipped (langid is not installed)" in _language_filter_lines(
        {"mode": "all", "applied": False, "skipped_reason": "langid is not installed"})[0]


# --------------------------------------------------------------------------------------------------------------
# Acceptance: a two-language micro run through evaluation
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.ray
def test_multilingual_micro_run_reports_compliance_per_language(tmp_path, ray_local):
    from lm_lexicon.pipeline import run_pipeline
    from lm_lexicon.seed_models import tiny_llama

    seed = tiny_llama(tmp_path / "seed")
    cfg = config_from_dict({
        "name": "multilingual-micro", "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"format": "multilingual", "path": str(FIXTURES / "es"), "lang": "es"},
                             {"format": "multilingual", "path": str(FIXTURES / "fr"), "lang": "fr"}],
                 "prompt_templates": {"es": "Define la palabra '{term}'. Responde solo en español."}},
        "embed": {"num_actors": 1},
        "partition": {"n_experts": 2, "plot_sample": 40},
        "seed_model": {"name": str(seed)},
        "train": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "precision": "fp32", "dense_baseline": False},
        "resources": {"storage_path": str(tmp_path / "ray")},
        "finetune": {"enabled": False},
        "evaluate": {"max_new_tokens": 6, "metrics": ["bleu_a", "rouge_l", "length"],
                     "baselines": ["constant", "retrieval"], "best_of_n": 2, "bon_ns": [1, 2],
                     "reward": {"train_rows": 6, "valid_rows": 4, "samples": 2, "num_hidden_layers": 1,
                                "max_length": 48}},
    })
    results = run_pipeline(cfg, stages=("data", "partition", "experts", "merge", "evaluate"), log=lambda m: None)
    ev = results["evaluate"].path
    out = json.loads((ev / "metrics.json").read_text())
    # the recipe's templates are saved with every model the run wrote, and the evaluation records them
    run = tmp_path / "run"
    custom = PromptTemplates.from_config(cfg)
    for model_dir in ("partition/router", "experts/expert_0/model", "experts/expert_1/model", "merge/merged",
                      "merge/merged/router", "merge/model", "merge/model/router", "evaluate/reward_model"):
        assert PromptTemplates.load(run / model_dir) == custom != PromptTemplates(), model_dir
    assert out["meta"]["prompt_templates"] == custom.to_config()
    assert out["meta"]["languages"] == {"es": 8, "fr": 8}
    models = ["constant", "retrieval", "moe", "moe:sample", "moe:bon-orm-n2", "moe:oracle-n2"]
    assert list(out["results"]) == models
    for model in models:
        # compliance turned on by the non-English rows, overall and per language
        overall = out["results"][model]["language_compliance"]
        assert overall["n"] == 16 and 0.0 <= overall["value"] <= 100.0
        per = out["language_compliance"][model]
        assert set(per) == {"es", "fr"}
        for lang, c in per.items():
            assert c["n"] == 8 and 0.0 <= c["share"] <= 1.0 and c["compliant"] == round(c["share"] * 8)
            assert sum(c["detected"].values()) == 8
            by = out["by_language"][model][lang]
            assert by["bleu_a"]["n"] == 8 and by["language_compliance"]["value"] == pytest.approx(100 * c["share"])
        assert overall["value"] == pytest.approx(100 * (per["es"]["compliant"] + per["fr"]["compliant"]) / 16)
    # every prediction file row carries its language; the MoE saw term-only prompts
    rows = [json.loads(line) for line in (ev / "predictions" / "moe.jsonl").open()]
    assert sorted({r["lang"] for r in rows}) == ["es", "fr"] and all(r["context"] == "" for r in rows)
    for lang in ("es", "fr"):  # per item: the detected language and whether it complies
        mine = [r for r in rows if r["lang"] == lang]
        assert sum(r["language_compliant"] for r in mine) == out["language_compliance"]["moe"][lang]["compliant"]
        assert all(r["language_compliant"] == (r["detected_lang"] == lang) for r in mine)
    # the constant baseline is one string: it complies in one language at most
    const = out["language_compliance"]["constant"]
    assert min(const["es"]["share"], const["fr"]["share"]) == 0.0

    bon = json.loads((ev / "bon.json").read_text())
    lf = bon["language_filter"]
    assert lf["applied"] and lf["mode"] == "non-english" and lf["filtered"] == 16 and lf["n"] == 2
    assert 0 <= lf["fallback"] <= 16 and set(lf["by_language"]) == {"es", "fr"}
    assert "language filter (first compliant)" in bon["curves"]

    report = (ev / "report.md").read_text()
    assert "## By language" in report and "compliant / n" in report
    for lang in ("es", "fr"):
        assert f"| moe | {lang} | 8 |" in report
    assert f"**{lf['fallback']} of 16** filtered inputs had none" in report

