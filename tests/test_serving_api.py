"""Serving without a Ray cluster (lm_lexicon.serving): request validation, args and pipeline layout, the engines the
deployments wrap, the Serve config file, and the client's batch mode against a fake transport.

The Ray Serve application itself is exercised over HTTP in tests/test_serve_app.py.
"""
from __future__ import annotations

import csv
import inspect
import json
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from lm_lexicon.data.prompts import record_prompt
from lm_lexicon.data.records import Record
from lm_lexicon.serving.client import ApiClientError, LexiconClient, define_file, read_rows
from lm_lexicon.serving.app_config import (DeploymentOptions, PipelineLayout, ServeArgs, generation_settings,
                                           model_card, resolve_args, resolve_token)
from lm_lexicon.serving.engines import FIRST_SAMPLE, REWARD_MODEL, ScorerEngine, select_best
from lm_lexicon.serving.schemas import (ApiError, DefinitionItem, Limits, item_prompt, parse_definitions_request,
                                        parse_json_body, parse_score_request)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # serve_app/ lives at the repository root (not an installed package)
    sys.path.insert(0, str(REPO))
LIMITS = Limits(max_items=4, max_term_chars=20, max_context_chars=50, max_n=4, max_body_bytes=4096)


# =================================================================================================== validation
def _parse(body: bytes, content_type="application/json"):
    return parse_definitions_request(parse_json_body(body, content_type, LIMITS), LIMITS)


BAD = [
    (b'{"items": [{"term": ""}]}', 422, "must not be empty"),
    (b'{"items": [{"term": "   "}]}', 422, "must not be empty"),
    (json.dumps({"items": [{"term": "t" * 21}]}).encode(), 422, "the limit is 20"),
    (json.dumps({"items": [{"term": "bank", "context": "c" * 51}]}).encode(), 422, "the limit is 50"),
    (json.dumps({"items": [{"term": "x"}] * 5}).encode(), 422, "holds 5 items"),
    (b'{"items": []}', 422, "at least one item"),
    (b'{"items": [{"term": 5}]}', 422, "valid string"),
    (b'{"items": [{"term": "bank"}], "n": "3"}', 422, "valid integer"),
    (b'{"items": [{"term": "bank"}], "n": true}', 422, "valid integer"),
    (b'{"items": [{"term": "bank"}], "return_scores": "yes"}', 422, "valid boolean"),
    (b'{"items": {"term": "bank"}}', 422, "valid list"),
    (b'[{"term": "bank"}]', 422, "expected a JSON object"),
    (b'{"terms": ["bank"]}', 422, "items: Field required"),
    (b'{"items": [{"term": "bank", "contxt": "typo"}]}', 422, "Extra inputs"),
    (b'{"items": [{"term": "bank", "lang": "xx"}]}', 422, "unknown language 'xx'"),
    (b'{"items": [{"term": "bank", "lang": "it"}]}', 422, "unknown language 'it'"),  # has a template, not allowed
    (b'{"items": [{"term": "bank"}], "n": 5}', 422, "must lie in [1, 4]"),
    (b'{"items": [{"term": "bank"}], "n": 0}', 422, "must lie in [1, 4]"),
    (b'{"items": [{"term": "\\ud800"}]}', 422, "surrogate"),
    (b'{"items": [{"term": "ba\\u0000nk"}]}', 422, "control character"),
    (b'{"items": [{"term": "caf\xe9"}]}', 400, "not valid UTF-8"),
    (b'\xff\xfe{}', 400, "not valid UTF-8"),
    (b'{"items": [{"term": "bank"}', 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"x" * 5000, 413, "limit is 4,096"),
]


@pytest.mark.parametrize("body,status,needle", BAD)
def test_bad_requests_are_4xx_with_a_message(body, status, needle):
    with pytest.raises(ApiError) as info:
        _parse(body)
    e = info.value
    assert e.status == status and needle in e.message, (e.status, e.message)
    err = e.body()["error"]
    assert err["status"] == status and err["code"] and err["message"] == e.message
    json.dumps(e.body())  # serialisable


def test_wrong_content_type_is_415():
    with pytest.raises(ApiError) as info:
        _parse(b'{"items": [{"term": "bank"}]}', "text/plain")
    assert info.value.status == 415
    assert _parse(b'{"items": [{"term": "bank"}]}', "application/json; charset=utf-8").items[0].term == "bank"
    assert _parse(b'{"items": [{"term": "bank"}]}', None).items[0].term == "bank"


def test_validation_details_locate_every_bad_item():
    body = {"items": [{"term": "ok"}, {"term": ""}, {"term": "fine", "lang": "zz"}]}
    with pytest.raises(ApiError) as info:
        parse_definitions_request(body, LIMITS)
    locs = [d["loc"] for d in info.value.details]
    assert locs == [["items", 1, "term"], ["items", 2, "lang"]]
    assert info.value.message.startswith("items[1].term: must not be empty; items[2].lang")


def test_valid_request_and_prompts_match_the_pipeline():
    req = _parse(json.dumps({"items": [{"term": " bank ", "context": "the bank of the river"},
                                       {"term": "perro", "lang": "es"}, {"term": "run", "context": None}],
                             "n": 2, "return_scores": True}).encode())
    assert req.n == 2 and req.return_scores and req.seed == 0
    for it in req.items:
        record = Record(term=it.term.strip(), context=(it.context or "").strip(), definition="", source="api",
                        lang=it.lang)
        assert item_prompt(it) == record_prompt(record)
    assert item_prompt(req.items[0]) == '"the bank of the river" What is the definition of "bank"?'
    assert item_prompt(req.items[2]) == 'What is the definition of "run"?'


def test_score_request_validation():
    ok = parse_score_request({"items": [{"term": "bank", "definition": "land by a river",
                                         "reference": ["sloping land", "a river side"]}]}, LIMITS)
    assert ok.items[0].reference == ["sloping land", "a river side"]
    for bad, needle in [({"items": [{"term": "bank"}]}, "definition: Field required"),
                        ({"items": [{"term": "bank", "definition": "d", "reference": [""]}]}, "must not be empty"),
                        ({"items": [{"term": "bank", "definition": "d" * 3000}]}, "the limit is 2,000"),
                        ({"items": [{"term": "bank", "definition": "d", "reference": 3}]}, "reference")]:
        with pytest.raises(ApiError) as info:
            parse_score_request(bad, LIMITS)
        assert info.value.status == 422 and needle in info.value.message, info.value.message


def test_limits_reject_languages_without_a_template():
    with pytest.raises(ValueError, match="no prompt template"):
        Limits(languages=["en", "tlh"])


# =================================================================================================== args, layout
def test_deployment_options_and_per_expert_overrides():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        DeploymentOptions(max_batch_size=16, max_ongoing_requests=8)
    args = ServeArgs(output_dir="x", expert={"max_batch_size": 8, "num_gpus": 1},
                     expert_overrides={1: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}})
    e0, e1 = args.expert_for(0), args.expert_for(1)
    o0, o1 = e0.serve_options("Expert0"), e1.serve_options("Expert1")
    assert o0["num_replicas"] == 1 and "autoscaling_config" not in o0
    assert o1["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3} and "num_replicas" not in o1
    assert o0["max_ongoing_requests"] == 16 >= e0.max_batch_size  # default 2 x batch
    assert o1["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    with pytest.raises(ValueError):
        ServeArgs(output_dir="x", expert_overrides={0: {"max_batch_size": 0}})


def test_resolve_args_takes_unset_fields_from_the_pipeline_config():
    cfg = {"serve": {"limits": {"max_items": 7, "max_term_chars": 33},
                     "expert": {"max_batch_size": 4, "batch_wait_timeout_s": 0.5}, "auth_token_env": "MY_TOKEN"},
           "evaluate": {"max_new_tokens": 12, "temperature": 0.7, "batch_size": 99}}
    a = resolve_args({"output_dir": "x", "limits": {"max_items": 3}, "expert": {"num_cpus": 0}}, cfg)
    assert (a.limits.max_items, a.limits.max_term_chars) == (3, 33)  # given wins, the rest from the pipeline
    assert (a.expert.max_batch_size, a.expert.batch_wait_timeout_s, a.expert.num_cpus) == (4, 0.5, 0)
    assert a.auth_token_env == "MY_TOKEN"
    g = generation_settings(a)
    assert g["max_new_tokens"] == 12 and g["temperature"] == 0.7 and g["do_sample"] is False
    assert g["batch_size"] >= a.expert.max_batch_size
    beams = resolve_args({"output_dir": "x"}, {"evaluate": {**cfg["evaluate"], "num_beams": 4, "length_penalty": 0.5}})
    assert generation_settings(beams)["num_beams"] == 4  # served n = 1 decodes as the evaluation table did
    assert generation_settings(beams)["length_penalty"] == 0.5
    b = resolve_args({"output_dir": "x", "auth_token_env": None, "generation": {"max_new_tokens": 5}}, cfg)
    assert b.auth_token_env is None and generation_settings(b)["max_new_tokens"] == 5
    with pytest.raises(ValueError, match="unknown generation settings"):
        generation_settings(resolve_args({"output_dir": "x", "generation": {"beams": 3}}, cfg))
    # without a serve section: the defaults, which are the recipe's defaults (one model, ServeOptions)
    from lm_lexicon.config import config_from_dict

    plain = resolve_args({"output_dir": "x"}, {})
    assert plain.model_dump(exclude={"output_dir", "auth_token"}) == config_from_dict({}).serve.model_dump()
    assert (plain.expert.max_batch_size, plain.expert.batch_wait_timeout_s) == (32, 0.02)


def test_a_recipe_serve_section_is_the_serve_args_and_old_runs_still_serve():
    from lm_lexicon.config import ConfigError, config_from_dict

    cfg = config_from_dict({"serve": {"limits": {"max_items": 5}, "expert": {"max_batch_size": 8},
                                      "expert_overrides": {1: {"num_replicas": 2}}}})
    dumped = json.loads(json.dumps(cfg.model_dump(mode="json")))  # as the stages write config.yaml
    a = resolve_args({"output_dir": "x"}, dumped)
    assert a.limits.max_items == 5 and a.expert.max_batch_size == 8 and a.expert_for(1).num_replicas == 2
    with pytest.raises(ConfigError, match=r"max_items -> limits\.max_items"):
        config_from_dict({"serve": {"max_items": 5}})
    # a run written before: its config.yaml has the old flat keys (host/port were never read)
    old = {"serve": {"host": "127.0.0.1", "port": 8000, "max_items": 9, "max_term_chars": 100,
                     "max_context_chars": 2000, "max_batch_size": 16, "batch_wait_timeout_s": 0.05,
                     "auth_token_env": None}}
    b = resolve_args({"output_dir": "x"}, old)
    assert (b.limits.max_items, b.expert.max_batch_size, b.expert.batch_wait_timeout_s) == (9, 16, 0.05)
    assert b.auth_token_env == "LM_LEXICON_API_TOKEN"  # unset then meant the default


def test_resolve_token():
    assert resolve_token(None, "LM_LEXICON_API_TOKEN", {}) is None
    assert resolve_token(None, "LM_LEXICON_API_TOKEN", {"LM_LEXICON_API_TOKEN": "t1"}) == "t1"
    assert resolve_token("t2", "LM_LEXICON_API_TOKEN", {"LM_LEXICON_API_TOKEN": "t1"}) == "t2"
    assert resolve_token(None, None, {"LM_LEXICON_API_TOKEN": "t1"}) is None
    assert resolve_token(None, "LM_LEXICON_API_TOKEN", {"LM_LEXICON_API_TOKEN": ""}) is None


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _fake_pipeline(root: Path, n: int = 2, collapsed: bool = True, moe: bool = True) -> Path:
    """Only the JSON files layout discovery and the model card read (no weights)."""
    router = {"format": "lm-lexicon-domain-router", "method": "semantic", "n_clusters": n, "dim": 4, "biased": True,
              "embedder": {"model_id": "bundled-minilm"}, "meta": {"seed": 0}}
    if moe:
        _write_json(root / "merge/model/config.json", {"model_type": "lm_lexicon_moe",
                                                       "lm_lexicon_moe": {"n_experts": n, "routing": "domain"}})
        _write_json(root / "merge/model/router/router.json", router)
    if collapsed:
        for d in range(n):
            _write_json(root / f"export/collapsed/domain-{d}/config.json", {"architectures": ["LlamaForCausalLM"]})
        _write_json(root / "export/collapsed/router/router.json", router)
        _write_json(root / "export/collapsed/collapsed.json",
                    {"format": "lm-lexicon-collapsed", "domains": [{"domain": d, "path": f"domain-{d}"}
                                                                   for d in range(n)], "router_dir": "router"})
    return root


def test_layout_prefers_collapsed_then_falls_back_to_the_pinned_moe(tmp_path):
    both = PipelineLayout.discover(_fake_pipeline(tmp_path / "a"))
    assert both.source == "collapsed" and [e.kind for e in both.experts] == ["dense", "dense"]
    assert both.router_dir == (tmp_path / "a/export/collapsed/router").resolve()
    assert both.reward_model_dir is None and "no reward model" in both.reward_reason
    assert both.metrics_path is None
    moe = PipelineLayout.discover(_fake_pipeline(tmp_path / "b", collapsed=False))
    assert moe.source == "moe" and all(e.kind == "moe" and e.pinned for e in moe.experts)
    assert [e.deployment_name for e in moe.experts] == ["Expert0", "Expert1"]
    assert moe.router_dir.name == "router" and moe.router_dir.parent.name == "model"
    forced = PipelineLayout.discover(tmp_path / "a", source="moe")
    assert forced.source == "moe"
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to serve"):
        PipelineLayout.discover(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no such"):
        PipelineLayout.discover(tmp_path / "missing")


def test_layout_checks_router_against_experts_and_finds_reward_model_and_metrics(tmp_path):
    root = _fake_pipeline(tmp_path / "p")
    _write_json(root / "export/collapsed/router/router.json", {"n_clusters": 3})
    with pytest.raises(ValueError, match="3 domains but there are 2 experts"):
        PipelineLayout.discover(root)
    root = _fake_pipeline(tmp_path / "q")
    _write_json(root / "evaluate/reward_model/reward_config.json", {"format": "lm_lexicon.evaluate.best_of_n.reward/1"})
    _write_json(root / "evaluate/metrics.json", {"meta": {"split": "test"},
                                                 "results": {"moe": {"bleu_a": {"value": 21.5}}}})
    (root / "evaluate/config.yaml").write_text(yaml.safe_dump({"name": "tiny", "serve": {"limits": {"max_items": 9}}}))
    layout = PipelineLayout.discover(root)
    assert layout.reward_model_dir is not None and layout.reward_reason is None
    args = resolve_args({"output_dir": str(root)}, layout.pipeline_config)
    card = model_card(layout, args, generation_settings(args))
    assert card["recipe"] == "tiny" and card["limits"]["max_items"] == 9
    assert card["metrics"]["results"] == {"moe": {"bleu_a": 21.5}}
    assert [e["architecture"] for e in card["experts"]] == ["LlamaForCausalLM"] * 2
    assert card["routing"]["n_domains"] == 2 and card["reward_model"]["available"]


def test_layout_serves_the_templates_saved_with_the_experts(tmp_path):
    from lm_lexicon.data.prompts import PromptTemplates, parse_templates

    custom = parse_templates({"en": 'Define "{term}" ({context}).'})
    old = PipelineLayout.discover(_fake_pipeline(tmp_path / "old"))  # a run from before templates were saved
    assert old.prompt_templates == PromptTemplates() and model_card(old, ServeArgs(output_dir="x"), {})[
        "prompt_templates"] == {}
    root = _fake_pipeline(tmp_path / "p")
    for d in ("export/collapsed/domain-0", "export/collapsed/domain-1", "export/collapsed/router"):
        custom.save(root / d)
    _write_json(root / "evaluate/reward_model/reward_config.json", {"format": "lm_lexicon.evaluate.best_of_n.reward/1"})
    custom.save(root / "evaluate/reward_model")
    layout = PipelineLayout.discover(root)
    assert layout.prompt_templates == custom and layout.reward_model_dir is not None
    card = model_card(layout, ServeArgs(output_dir=str(root)), {})
    assert card["prompt_templates"] == custom.to_config()
    item = DefinitionItem(term="bank", context="by the river")
    assert item_prompt(item, parse_templates(card["prompt_templates"])) == 'Define "bank" (by the river).'
    # a reward model trained on other prompts would score prompts it never saw: it is not served
    PromptTemplates().save(root / "evaluate/reward_model")
    layout = PipelineLayout.discover(root)
    assert layout.reward_model_dir is None and "other templates" in layout.reward_reason
    # experts that disagree cannot be served behind one ingress
    PromptTemplates().save(root / "export/collapsed/domain-1")
    with pytest.raises(ValueError, match="other prompt templates"):
        PipelineLayout.discover(root)


# =================================================================================================== Serve config
def test_serve_config_parses_and_its_import_path_resolves(tmp_path):
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((REPO / "serve_app/serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app" and app.route_prefix == "/"
    builder = import_attr(app.import_path)
    assert callable(builder) and len(inspect.signature(builder).parameters) == 1
    args = ServeArgs.model_validate(app.args)  # the YAML's args are valid ServeArgs
    assert args.expert.max_ongoing_requests >= args.expert.max_batch_size
    assert args.expert_for(0).autoscaling_config["max_replicas"] == 4  # independent per-expert scaling
    assert args.expert_for(1).autoscaling_config["max_replicas"] == 2
    # the builder turns the same args into an application (no Ray needed: nothing is deployed)
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    built = call_user_app_builder_with_args_if_necessary(builder, {**app.args, "output_dir": str(
        _fake_pipeline(tmp_path / "p"))})
    assert isinstance(built, Application)


# =================================================================================================== engines
def test_select_best_uses_scores_or_falls_back_to_the_first_sample():
    cands = [["a", "b", "c"], ["d", "e"]]
    assert select_best(cands, [[0.1, 0.9, 0.5], [1.0, 1.0]]) == (["b", "d"], REWARD_MODEL)
    assert select_best(cands, None) == (["a", "d"], FIRST_SAMPLE)


def test_scorer_without_reward_model_reports_null_with_a_reason(tmp_path):
    s = ScorerEngine(None, "no reward model here")
    assert not s.available and s.reward(["p"], ["d"]) is None and s.info()["reason"] == "no reward model here"
    broken = tmp_path / "rm"
    _write_json(broken / "reward_config.json", {"format": "something-else"})
    s2 = ScorerEngine(broken, None)  # a broken reward model does not raise: the scorer keeps serving metrics
    assert not s2.available and "failed to load" in s2.reason
    m = s2.reference_metrics([{"term": "bank", "prediction": "sloping land beside water.",
                               "references": ["sloping land beside water"]},
                              {"term": "bank", "prediction": "a money place", "references": ["a river side"]}])
    assert m[0]["exact_match"] == 100.0 and m[0]["bleu_a"] == pytest.approx(100.0)
    assert m[1]["exact_match"] == 0.0 and m[1]["bleu_a"] < m[0]["bleu_a"]


@pytest.mark.usefixtures("one_torch_thread")
def test_scorer_serves_a_reward_model_on_the_seed(tmp_path):
    from lm_lexicon.evaluate.best_of_n.reward import RewardModel
    from lm_lexicon.seed_models import tiny_llama

    saved = RewardModel.from_seed(str(tiny_llama(tmp_path / "seed")), max_length=32, seed=3).save(tmp_path / "rm")
    s = ScorerEngine(saved, None)
    assert s.available and s.model.backbone == "seed" and s.info()["reason"] is None
    prompts, defs = ['What is the definition of "bank"?'] * 2, ["land beside a river", "a place for money"]
    expected = RewardModel.load(saved).score(prompts, defs)
    assert s.reward(prompts, defs) == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-7)


@pytest.mark.usefixtures("one_torch_thread")
def test_pinned_moe_expert_equals_the_collapsed_checkpoint(tmp_path, perturb_weights):
    """The fallback (MoE pinned to domain i) generates what the exported domain-i checkpoint generates: the same
    weights through the same kernels (one label for the whole batch runs expert i on all of it), hence exactly."""
    from lm_lexicon.moe import export_collapsed, merge_experts
    from lm_lexicon.seed_models import causal_bert_tokenizer, tiny_llama
    from lm_lexicon.serving.engines import ExpertEngine

    tok = causal_bert_tokenizer()
    experts = [perturb_weights(tiny_llama(tmp_path / f"e{i}", tokenizer=tok, seed=i), 100 + i, 0.05) for i in range(2)]
    moe = merge_experts(experts, tmp_path / "moe", seed=0)
    collapsed = export_collapsed(moe, tmp_path / "collapsed")
    settings = {"max_new_tokens": 6, "batch_size": 8}
    requests = [('"a dog barks" What is the definition of "bark"?', 1, 0), ('What is the definition of "tree"?', 1, 0),
                ('What is the definition of "tree"?', 3, 5)]
    outputs = {}
    for d in range(2):
        pinned = ExpertEngine(d, moe, "moe", pinned=True, settings=settings)
        dense = ExpertEngine(d, collapsed / f"domain-{d}", "dense", settings=settings)
        outputs[d] = pinned.generate(requests)
        assert outputs[d] == dense.generate(requests)
        assert [len(o) for o in outputs[d]] == [1, 1, 3]
        # requests are grouped by (n, seed): the third runs in a batch of its own either way, the same computation
        assert outputs[d][2] == pinned.generate([requests[2]])[0]
    assert outputs[0] != outputs[1]  # the domains' experts differ
    with pytest.raises(ValueError, match="pinned"):
        ExpertEngine(0, moe, "moe", pinned=False, settings=settings)


def test_expert_engine_beam_searches_single_definitions_and_samples_best_of_n(tmp_path):
    from lm_lexicon.seed_models import tiny_llama
    from lm_lexicon.serving.engines import ExpertEngine

    engine = ExpertEngine(0, tiny_llama(tmp_path / "m"), "dense",
                          settings={"max_new_tokens": 6, "batch_size": 8, "num_beams": 3})
    assert engine.settings_for(1, seed=0, rows=2).num_beams == 3
    sampled = engine.settings_for(4, seed=7, rows=2)  # beam search cannot sample: n > 1 draws with one beam
    assert (sampled.num_beams, sampled.do_sample, sampled.num_return_sequences) == (1, True, 4)
    prompt = 'What is the definition of "tree"?'
    assert [len(o) for o in engine.generate([(prompt, 1, 0), (prompt, 3, 5)])] == [1, 3]


# =================================================================================================== client
def _fake_server(calls: list):
    """A transport that defines 'term' as 'def of <term>' and rejects terms starting with 'bad' (422, per item)."""
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(body)
        if request.headers.get("authorization") != "Bearer tok":
            return httpx.Response(401, json={"error": {"status": 401, "code": "unauthorized", "message": "no"}})
        bad = [{"loc": ["items", i, "term"], "msg": "is bad"} for i, it in enumerate(body["items"])
               if it["term"].startswith("bad")]
        if bad:
            return httpx.Response(422, json={"error": {"status": 422, "code": "validation_error",
                                                       "message": "bad", "details": bad}})
        return httpx.Response(200, json={"definitions": [
            {"index": i, "definition": f"def of {it['term']}", "domain": len(it["term"]) % 2, "score": None,
             "selection": "greedy"} for i, it in enumerate(body["items"])]})
    return httpx.MockTransport(handler)


def test_define_file_keeps_order_and_reports_rejected_rows(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"term": f"t{i}", "context": "c", "id": i}) for i in range(7)]
    lines[2] = "{not json"
    lines[4] = json.dumps({"term": "bad4", "id": 4})
    lines.insert(5, json.dumps({"context": "no term"}))
    lines.insert(6, "")
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"term": "caf\xe9"}\n')
    calls: list = []
    client = LexiconClient("http://test", token="tok", transport=_fake_server(calls))
    summary = define_file(client, src, tmp_path / "out.jsonl", batch_size=3, concurrency=2, progress=False)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [0, 1, 3, 5, 6]
    assert all(r["definition"] == f"def of {r['term']}" and "domain" in r for r in out)
    assert summary.defined == 5 and summary.rows == 9
    reasons = {r.line: r.reason for r in summary.rejected}
    assert sorted(reasons) == [3, 5, 6, 10]
    assert "not valid JSON" in reasons[3] and "is bad" in reasons[5] and "missing" in reasons[6]
    assert "UTF-8" in reasons[10]
    rejected = [json.loads(x) for x in Path(summary.rejected_path).read_text().splitlines()]
    assert [r["line"] for r in rejected] == [3, 5, 6, 10]
    assert summary.reasons()
    # only term/context/lang are sent
    assert all(set(it) <= {"term", "context", "lang"} for c in calls for it in c["items"])
    with pytest.raises(ApiClientError) as info:
        LexiconClient("http://test", token="wrong", transport=_fake_server([])).define([{"term": "x"}])
    assert info.value.status == 401 and info.value.code == "unauthorized"


def test_client_retries_503_then_gives_up_with_the_servers_message():
    attempts = []

    def handler(request):
        attempts.append(1)
        if len(attempts) < 3:
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"code": "unavailable", "message": "restarting"}})
        return httpx.Response(200, json={"definitions": [{"definition": "ok"}]})

    c = LexiconClient("http://test", transport=httpx.MockTransport(handler), retries=3)
    assert c.define([{"term": "x"}])[0]["definition"] == "ok" and len(attempts) == 3
    always = LexiconClient("http://test", retries=1, transport=httpx.MockTransport(
        lambda r: httpx.Response(503, headers={"Retry-After": "0"},
                                 json={"error": {"code": "unavailable", "message": "restarting"}})))
    with pytest.raises(ApiClientError, match="restarting") as info:
        always.define([{"term": "x"}])
    assert info.value.status == 503


def test_read_rows_type_checks(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"term": "a", "lang": 3}\n[1, 2]\n{"term": "b", "context": null}\n')
    rows, rejected = read_rows(p)
    assert [no for no, _ in rows] == [3] and [r.line for r in rejected] == [1, 2]


def test_define_file_reads_and_writes_csv(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text('term,context,lang,id\nbank,"the bank, of the river",,1\n,no term,en,2\nbad3,,en,3\n\n'
                   'tree,,en,4,extra cell\nloan,"a ""good"" loan",en,5\n', encoding="utf-8")
    client = LexiconClient("http://test", token="tok", transport=_fake_server(calls := []))
    summary = define_file(client, src, tmp_path / "out.csv", batch_size=2, progress=False, output_format="csv")
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        out = list(csv.DictReader(f))
    assert [r["id"] for r in out] == ["1", "5"] and out[0]["context"] == "the bank, of the river"
    assert out[1]["definition"] == "def of loan" and out[1]["context"] == 'a "good" loan'
    assert list(out[0])[:4] == ["term", "context", "id", "definition"]  # an empty lang cell counts as absent
    reasons = {r.line: r.reason for r in summary.rejected}
    assert sorted(reasons) == [3, 4, 6] and "missing" in reasons[3] and "is bad" in reasons[4]
    assert "more cells" in reasons[6] and summary.rows == 5  # the blank line is no row
    assert all("lang" not in it for c in calls for it in c["items"] if it["term"] == "bank")
    (tmp_path / "no_term.csv").write_text("word,context\nbank,x\n")
    with pytest.raises(ValueError, match="'term' column"):
        define_file(client, tmp_path / "no_term.csv", tmp_path / "x.csv", progress=False)


def test_definition_item_schema_documents_fields():
    schema = DefinitionItem.model_json_schema()
    assert schema["required"] == ["term"] and "context" in schema["properties"]


# =================================================================================================== batching
def test_merging_batcher_merges_what_queued_while_the_model_was_busy():
    import asyncio
    import time

    from lm_lexicon.serving.batching import MergingBatcher

    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        if -1 in items:
            raise ValueError("bad item")
        time.sleep(0.3 if len(sizes) == 1 else 0.01)
        return [x * 2 for x in items]

    async def main():
        b = MergingBatcher(fn, max_batch_size=8, wait_s=0.02)
        first = asyncio.create_task(b.submit([0]))
        await asyncio.sleep(0.1)  # the first batch is running
        rest = [asyncio.create_task(b.submit([i])) for i in range(1, 11)]  # ten single calls while it runs
        out = await asyncio.gather(first, *rest)
        failing = await asyncio.gather(b.submit([-1, 5]), return_exceptions=True)
        after = await b.submit([3, 4])
        assert b.alive()  # the worker survived the failing batch
        return out, failing, after, b

    out, failing, after, b = asyncio.run(main())
    assert [o[0] for o in out] == [2 * i for i in range(11)]
    assert sizes[:3] == [1, 8, 2]  # not ten batches of one
    assert isinstance(failing[0], ValueError) and after == [6, 8]  # an error fails its batch only
    assert b.batches[:3] == [1, 8, 2]
