"""The Ray Serve application (serve_app/app.py) over real HTTP on loopback: serve.run + httpx.

A tiny pipeline-output-like directory is built once for the module, as a recipe with custom prompt templates
(``TEMPLATES``) leaves it: two perturbed tiny Llama experts (saved with those templates) merged into a domain-routed
MoE whose router comes from a 2-way semantic partition of bundled-MiniLM embeddings of the custom prompts, exported
to export/collapsed/domain-{0,1}; a reward model on a tiny Llama seed (reward.backbone=seed: the Scorer serves
whichever kind the pipeline saved) in evaluate/reward_model; a metrics.json. Every test that compares with offline
routing, generation or scoring therefore also checks that the app builds the prompts the experts were trained on. Every
deployment reserves 0 CPUs (the session's Ray has 2) and decodes at most 8 new tokens.

Serve is shut down at module teardown; the session's Ray (tests/conftest.py) stays up.
"""
from __future__ import annotations

import csv
import io
import json
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # serve_app/ lives at the repository root; Ray workers get the cwd (run from REPO)
    sys.path.insert(0, str(REPO))

APP = "lexicon-test"
TRAIN = [  # (term, context): the partition's training prompts; two loose themes (nature / money and machines)
    ("river", "the river flooded the valley"), ("tree", "an old oak tree in the park"),
    ("leaf", "a leaf fell from the branch"), ("rain", "heavy rain all night"), ("hill", "we climbed the hill"),
    ("lake", "they swam in the lake"), ("flower", "a red flower in the garden"), ("bird", "a bird sang at dawn"),
    ("forest", "lost in the dark forest"), ("stone", "a smooth stone from the beach"),
    ("snow", "snow covered the field"), ("wind", "the wind shook the trees"), ("grass", "wet grass in the morning"),
    ("sea", "waves of the sea"), ("cloud", "a grey cloud over the town"), ("moss", "moss on the north side"),
    ("bank", "she deposited money at the bank"), ("loan", "a loan with high interest"),
    ("tax", "the income tax rate rose"), ("price", "the price of shares fell"),
    ("market", "the stock market crashed"), ("budget", "the annual budget of the firm"),
    ("engine", "the engine of the car failed"), ("computer", "the computer crashed again"),
    ("software", "install the new software"), ("server", "the server is down"),
    ("invoice", "pay the invoice by friday"), ("salary", "a raise in salary"), ("debt", "national debt grew"),
    ("profit", "quarterly profit doubled"), ("circuit", "a short circuit in the board"),
    ("robot", "the robot assembled the parts"),
]
HOST = "127.0.0.1"
MAX_NEW_TOKENS = 8
#: The recipe's data.prompt_templates: both English templates and the Spanish one differ from the defaults.
TEMPLATES = {"en": {"context": 'Context: {context}. Define the word "{term}".', "term_only": 'Define "{term}".'},
             "es": "Define la palabra '{term}'."}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _prompt(term: str, context: str = "", lang: str = "en", templates=TEMPLATES) -> str:
    """The prompt of the served model (``templates=None``: the default templates)."""
    from lm_lexicon.data.prompts import parse_templates, record_prompt
    from lm_lexicon.data.records import Record

    return record_prompt(Record(term=term, context=context, definition="", source="api", lang=lang),
                         parse_templates(templates))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, perturb_weights):
    import torch

    from lm_lexicon.data.prompts import parse_templates
    from lm_lexicon.partition.embed import Embedder
    from lm_lexicon.moe import export_collapsed, merge_experts
    from lm_lexicon.partition.clustering import partition
    from lm_lexicon.evaluate.best_of_n.reward import RewardModel
    from lm_lexicon.seed_models import causal_bert_tokenizer, tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("serve_pipeline")
        tok = causal_bert_tokenizer()
        experts = [perturb_weights(tiny_llama(root / "experts" / f"expert_{i}" / "model", tokenizer=tok, seed=i),
                                   100 + i, 0.05) for i in range(2)]
        for e in experts:  # what the experts stage saves with a model trained under the recipe's templates
            parse_templates(TEMPLATES).save(e)
        embedder = Embedder()
        prompts = [_prompt(t, c) for t, c in TRAIN]
        part = partition(embedder.encode(prompts), "semantic", 2, 0.1, seed=0)
        merge_experts(experts, root / "merge" / "model", router=part.router(embedder), seed=0)
        export_collapsed(root / "merge" / "model", root / "export" / "collapsed")
        reward_seed = tiny_llama(root / "reward_seed", tokenizer=tok, seed=7)
        RewardModel.from_seed(str(reward_seed), max_length=64, seed=0).save(root / "evaluate" / "reward_model")
        parse_templates(TEMPLATES).save(root / "evaluate" / "reward_model")
        (root / "evaluate" / "metrics.json").write_text(json.dumps(
            {"meta": {"split": "test", "n_rows": 2}, "results": {"moe": {"bleu_a": {"value": 12.5}},
                                                                  "dense": {"bleu_a": {"value": 11.0}}}}))
        (root / "train_labels.json").write_text(json.dumps([int(x) for x in part.labels]))
    finally:
        torch.set_num_threads(threads)
    return root


def _args(pipeline_dir: Path, **extra) -> dict:
    zero = {"num_cpus": 0}
    return {"output_dir": str(pipeline_dir), "app_name": APP,
            "ingress": {**zero, "max_ongoing_requests": 64, "max_batch_size": 1},
            "router": {**zero, "max_batch_size": 32, "max_ongoing_requests": 64},
            "scorer": {**zero, "max_batch_size": 32, "max_ongoing_requests": 64},
            "expert": {**zero, "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 16,
                       "health_check_period_s": 2.0, "health_check_timeout_s": 30.0},
            "generation": {"max_new_tokens": MAX_NEW_TOKENS},
            "limits": {"max_items": 8, "max_term_chars": 40, "max_context_chars": 200, "max_n": 4,
                       "max_body_bytes": 65536},
            "auth_token_env": None, "retry_window_s": 60.0, "request_timeout_s": 120.0, **extra}


@pytest.fixture(scope="module")
def server(ray_local, pipeline_dir):
    from ray import serve

    from serve_app.app import build_app

    port = _free_port()
    serve.start(http_options={"host": HOST, "port": port})
    try:
        serve.run(build_app(_args(pipeline_dir)), name=APP, route_prefix="/")
        url = f"http://{HOST}:{port}"
        with httpx.Client(base_url=url, timeout=120.0) as client:
            yield client
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def offline_router(pipeline_dir):
    from lm_lexicon.partition.routing import DomainRouter

    return DomainRouter.load(pipeline_dir / "export" / "collapsed" / "router", load_embedder=True)


def _define(client, items, **kw):
    r = client.post("/v1/definitions", json={"items": items, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _replicas(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


# =================================================================================================== happy path
def test_batched_request_returns_one_definition_per_item_in_order(server):
    items = [{"term": t, "context": c} for t, c in TRAIN[:3]] + [{"term": "perro", "lang": "es"},
                                                                  {"term": "bank"}, {"term": "engine"}]
    body = _define(server, items)
    defs = body["definitions"]
    assert [d["index"] for d in defs] == list(range(len(items)))
    assert [d["term"] for d in defs] == [it["term"] for it in items]
    assert [d["prompt"] for d in defs] == [_prompt(it["term"], it.get("context", ""), it.get("lang", "en"))
                                           for it in items]
    assert all(isinstance(d["definition"], str) and d["domain"] in (0, 1) for d in defs)
    assert all(d["selection"] == "greedy" and d["score"] is None and d["batch_size"] >= 1 for d in defs)
    assert all(d["timing_ms"]["total"] >= d["timing_ms"]["generate"] > 0 for d in defs)
    assert body["n"] == 1 and body["model"] == APP


def test_routing_matches_the_offline_router(server, offline_router, pipeline_dir):
    labels = json.loads((pipeline_dir / "train_labels.json").read_text())
    picks = [i for d in (0, 1) for i in [j for j, lab in enumerate(labels) if lab == d][:3]]  # 3 per domain
    items = [{"term": TRAIN[i][0], "context": TRAIN[i][1]} for i in picks] + \
            [{"term": "mortgage"}, {"term": "fleur", "lang": "fr"}]
    served = [d["domain"] for d in _define(server, items)["definitions"]]
    offline = offline_router.route_prompts([_prompt(it["term"], it.get("context", ""), it.get("lang", "en"))
                                            for it in items]).tolist()
    assert served == offline
    assert served[:6] == [labels[i] for i in picks]  # = the partition's labels of its training prompts
    assert set(served[:6]) == {0, 1}


def _offline(pipeline_dir: Path, definition_traces, domain: int, prompts: list[str], n: int = 1, seed: int = 0):
    """What the served expert of ``domain`` generates for ``prompts``, computed here, with the scores it picked each
    token from: ``(outputs, trace, trace rows)`` (tests/score_trace.py)."""
    from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings
    from score_trace import definition_rows

    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    if n > 1:  # what the expert engine runs for n > 1 (lm_lexicon.serving.engines.ExpertEngine.settings_for)
        settings = settings.replace(do_sample=True, num_return_sequences=n, seed=seed)
    gen = DefinitionGenerator(pipeline_dir / "export" / "collapsed" / f"domain-{domain}", settings=settings)
    outputs, trace = definition_traces.run(gen.generate, prompts)
    return outputs, trace, definition_rows(gen, prompts, settings)


@pytest.mark.usefixtures("one_torch_thread")
def test_served_definitions_equal_offline_generation(server, pipeline_dir, definition_traces):
    """The server batches requests as they arrive, in another process: the same scores to float rounding, so its
    texts are compared with offline ones wherever no decision was a near tie (tests/score_trace.py)."""
    from score_trace import assert_equal_where_decisive

    items = [{"term": t, "context": c} for t, c in TRAIN[10:18]]
    defs = _define(server, items)["definitions"]
    compared = 0
    for d in (0, 1):
        mine = [x for x in defs if x["domain"] == d]
        if not mine:
            continue
        offline, trace, rows = _offline(pipeline_dir, definition_traces, d, [x["prompt"] for x in mine])
        compared += assert_equal_where_decisive([[x["definition"]] for x in mine], offline, trace, rows)
    assert compared >= len(items) // 2


@pytest.mark.usefixtures("one_torch_thread")
def test_the_expert_receives_the_prompt_of_the_recipes_custom_templates(server, pipeline_dir, definition_traces):
    """A recipe with custom templates is served with them, not with the defaults: the model card states them, the
    ingress renders them, and the expert generates from that prompt -- its served definition is its offline greedy
    output for the custom prompt, on prompts where the default prompt would have given another definition."""
    from lm_lexicon.data.prompts import parse_templates
    from lm_lexicon.evaluate.generate import DefinitionGenerator, GenerationSettings
    from score_trace import DECISIVE_MARGIN

    assert server.get("/v1/model").json()["prompt_templates"] == parse_templates(TEMPLATES).to_config()
    items = [{"term": t, "context": c} for t, c in TRAIN[18:23]] + [{"term": "loan"}, {"term": "hill"},
                                                                    {"term": "perro", "lang": "es"}]  # 8: the limit
    defs = _define(server, items)["definitions"]
    for it, d in zip(items, defs):
        args = (it["term"], it.get("context", ""), it.get("lang", "en"))
        assert d["prompt"] == _prompt(*args) != _prompt(*args, templates=None)
    assert defs[0]["prompt"] == f'Context: {TRAIN[18][1]}. Define the word "{TRAIN[18][0]}".'
    assert defs[-1]["prompt"] == "Define la palabra 'perro'."
    checked = telling = 0
    for domain in (0, 1):
        mine = [(it, d) for it, d in zip(items, defs) if d["domain"] == domain]
        if not mine:
            continue
        custom, trace, rows = _offline(pipeline_dir, definition_traces, domain, [d["prompt"] for _, d in mine])
        default_gen = DefinitionGenerator(pipeline_dir / "export" / "collapsed" / f"domain-{domain}",
                                          settings=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
        default = default_gen.generate([_prompt(it["term"], it.get("context", ""), it.get("lang", "en"),
                                                templates=None) for it, _ in mine])
        for (_, d), mine_custom, mine_default, row in zip(mine, custom, default, rows):
            if trace.min_margin(row[0]) > DECISIVE_MARGIN:  # no near tie: batching cannot change the text
                assert d["definition"] == mine_custom[0]
                checked += 1
                telling += mine_custom[0] != mine_default[0]
    assert checked >= len(items) // 2 and telling >= 1, (checked, telling)


@pytest.mark.usefixtures("one_torch_thread")
def test_best_of_n_with_the_reward_model(server, pipeline_dir, definition_traces):
    from lm_lexicon.evaluate.best_of_n.reward import RewardModel
    from score_trace import assert_equal_where_decisive

    items = [{"term": "tree", "context": "an old oak tree"}, {"term": "loan"}]
    body = _define(server, items, n=3, return_scores=True, seed=7)
    rm = RewardModel.load(pipeline_dir / "evaluate" / "reward_model")
    for it, d in zip(items, body["definitions"]):
        cands = d["candidates"]
        assert len(cands) == 3 and d["selection"] == "reward_model"
        scores = [c["score"] for c in cands]
        assert d["definition"] == cands[int(np.argmax(scores))]["definition"] and d["score"] == max(scores)
        offline = rm.score([d["prompt"]] * 3, [c["definition"] for c in cands])
        np.testing.assert_allclose(scores, offline, rtol=1e-4, atol=1e-5)
    assert body["reward_model"]["used"]
    # seeded sampling is reproducible: the same candidates again, and as offline — where no sampled token was a near
    # tie, as the server may batch the second request otherwise (the same scores to float rounding)
    again = _define(server, items, n=3, return_scores=True, seed=7)
    compared = 0
    for first, second in zip(body["definitions"], again["definitions"]):
        offline, trace, rows = _offline(pipeline_dir, definition_traces, first["domain"], [first["prompt"]], 3, 7)
        for served in (first, second):
            compared += assert_equal_where_decisive([[c["definition"] for c in served["candidates"]]], offline,
                                                    trace, rows)
        for a, b in zip(first["candidates"], second["candidates"]):
            if a["definition"] == b["definition"]:
                assert b["score"] == pytest.approx(a["score"], rel=1e-4, abs=1e-5)
    assert compared >= 8
    greedy_scored = _define(server, items[:1], return_scores=True)["definitions"][0]
    assert isinstance(greedy_scored["score"], float) and greedy_scored["selection"] == "greedy"


def test_score_endpoint(server, pipeline_dir):
    from lm_lexicon.evaluate.best_of_n.reward import RewardModel

    r = server.post("/v1/score", json={"items": [
        {"term": "bank", "context": "the bank of the river", "definition": "sloping land beside water",
         "reference": ["sloping land beside water", "a financial institution"]},
        {"term": "loan", "definition": "money lent"}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert all(isinstance(x["score"], float) for x in res)
    rm = RewardModel.load(pipeline_dir / "evaluate" / "reward_model")  # the seed-backbone model the pipeline saved
    offline = rm.score([_prompt("bank", "the bank of the river"), _prompt("loan")],
                       ["sloping land beside water", "money lent"])
    np.testing.assert_allclose([x["score"] for x in res], offline, rtol=1e-4, atol=1e-5)  # batched with others
    assert res[0]["metrics"]["exact_match"] == 100.0 and res[0]["metrics"]["bleu_a"] == pytest.approx(100.0)
    assert res[1]["metrics"] is None  # no reference given


def test_health_model_card_and_openapi(server):
    h = server.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert set(h.json()["deployments"]) == {"Router", "Expert0", "Expert1", "Scorer"}
    card = server.get("/v1/model").json()
    assert [e["deployment"] for e in card["experts"]] == ["Expert0", "Expert1"]
    assert card["experts_source"] == "collapsed" and card["routing"]["n_domains"] == 2
    assert card["reward_model"]["available"] and card["metrics"]["results"]["moe"]["bleu_a"] == 12.5
    assert card["limits"]["max_items"] == 8 and card["auth"] == "off"
    schema = server.get("/openapi.json").json()
    body = schema["paths"]["/v1/definitions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/DefinitionsRequest") and "DefinitionItem" in schema["components"]["schemas"]
    assert server.get("/docs").status_code == 200


# =================================================================================================== bad input
BAD_REQUESTS = [
    ("empty term", {"items": [{"term": ""}]}, 422),
    ("blank term", {"items": [{"term": "  "}]}, 422),
    ("term too long", {"items": [{"term": "t" * 41}]}, 422),
    ("context too long", {"items": [{"term": "bank", "context": "c" * 201}]}, 422),
    ("too many items", {"items": [{"term": "x"}] * 9}, 422),
    ("term not a string", {"items": [{"term": 5}]}, 422),
    ("n not an int", {"items": [{"term": "bank"}], "n": "3"}, 422),
    ("items not a list", {"items": {"term": "bank"}}, 422),
    ("body not an object", [{"term": "bank"}], 422),
    ("unknown field", {"items": [{"term": "bank", "contxt": "x"}]}, 422),
    ("unknown language", {"items": [{"term": "bank", "lang": "xx"}]}, 422),
    ("n too large", {"items": [{"term": "bank"}], "n": 5}, 422),
    ("lone surrogate", '{"items": [{"term": "\\ud83d"}]}', 422),
    ("bad UTF-8", b'{"items": [{"term": "caf\xe9 \xff"}]}', 400),
    ("invalid JSON", b'{"items": [', 400),
    ("empty body", b"", 400),
    ("body too large", b'{"items": [{"term": "' + b"x" * 70000 + b'"}]}', 413),
]


@pytest.mark.parametrize("name,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_with_a_json_message(server, name, body, status):
    if isinstance(body, (bytes, str)):
        r = server.post("/v1/definitions", content=body, headers={"content-type": "application/json"})
    else:
        r = server.post("/v1/definitions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["code"] and err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_other_bad_requests_and_the_server_keeps_answering(server):
    before = {d: _replicas(d) for d in ("Ingress", "Router", "Expert0", "Expert1", "Scorer")}
    r = server.post("/v1/definitions", content=b'{"items": [{"term": "x"}]}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = server.post("/v1/score", json={"items": [{"term": "bank"}]})
    assert r.status_code == 422 and "definition" in r.json()["error"]["message"]
    r = server.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = server.get("/v1/definitions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    # a follow-up valid request succeeds, and no replica was restarted by any of the bad ones
    assert _define(server, [{"term": "bank"}])["definitions"][0]["definition"] is not None
    assert {d: _replicas(d) for d in before} == before
    stats = server.get("/healthz").json()["stats"]
    assert stats["client_errors"] >= len(BAD_REQUESTS) and stats["internal_errors"] == 0


# =================================================================================================== fault tolerance
def test_killed_expert_replica_is_replaced_and_no_accepted_request_is_lost(server, offline_router):
    import ray
    from ray import serve

    domain0 = [(t, c) for t, c in TRAIN if offline_router.route_prompts([_prompt(t, c)])[0] == 0][:4]
    items = [{"term": t, "context": c} for t, c in domain0]
    (victim,) = _replicas("Expert0")
    n_requests, concurrency = 40, 8
    statuses: list = []
    errors: list = []
    started = threading.Event()

    def one(i):
        started.set()
        try:
            r = server.post("/v1/definitions", json={"items": items[: 1 + i % len(items)]})
        except Exception as e:  # a dropped connection would be a lost request
            errors.append(repr(e))
            return
        statuses.append(r.status_code)
        if r.status_code == 200:
            body = r.json()["definitions"]
            assert len(body) == 1 + i % len(items) and all(d["domain"] == 0 for d in body)
        else:
            err = r.json()["error"]
            assert r.status_code == 503 and err["code"] == "unavailable" and err["message"], r.text

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i) for i in range(n_requests)]
        started.wait(10)
        time.sleep(0.3)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        for f in futures:
            f.result()
    assert not errors, errors
    assert len(statuses) == n_requests  # every request answered: 200, or a clear 503 (counted)
    ok, unavailable = statuses.count(200), statuses.count(503)
    assert ok + unavailable == n_requests and ok >= n_requests // 2, statuses
    # the controller replaced the replica; the deployment serves again
    deadline = time.time() + 90
    while time.time() < deadline:
        names = _replicas("Expert0")
        status = serve.status().applications[APP].deployments["Expert0"].status
        if names and victim not in names and str(status).endswith("HEALTHY"):
            break
        time.sleep(1)
    assert names and victim not in names, names
    assert _define(server, items[:2])["definitions"][0]["domain"] == 0
    print(f"replica kill during load: {ok} answered 200, {unavailable} answered 503 of {n_requests}; "
          f"ingress retries: {server.get('/healthz').json()['stats']['retries']}")


# =================================================================================================== web page
def test_web_page_is_served_from_the_app_with_no_outside_resource(server):
    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert '<script src="static/app.js"' in html and 'href="static/style.css"' in html
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = server.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.text) > 500
        html += r.text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html  # works offline
    for control in ("term", "context", "lang", "n", "scores", "batch-text", "batch-file", "token"):
        assert f'<label for="{control}"' in page.text  # every input has a label
    missing = server.get("/static/secrets.txt")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert server.get("/static/..%2fapp.py").status_code == 404


# =================================================================================================== auth + CLI
def test_cli_define_against_the_server(server, tmp_path):
    from typer.testing import CliRunner

    from lm_lexicon.cli import app

    url = str(server.base_url)
    runner = CliRunner()
    res = runner.invoke(app, ["define", "bank", "-c", "the bank of the river", "--url", url, "--json"])
    assert res.exit_code == 0, res.output
    one = json.loads(res.output)
    assert one["term"] == "bank"
    res = runner.invoke(app, ["define", "bank", "-c", "the bank of the river", "--url", url, "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.output)))
    assert len(rows) == 1 and rows[0]["definition"] == one["definition"] and rows[0]["domain"] == str(one["domain"])
    assert rows[0]["context"] == "the bank of the river" and rows[0]["selection"] == "greedy"
    res = runner.invoke(app, ["define", "bank", "-c", "the bank of the river", "--url", url])  # a table
    assert res.exit_code == 0 and re.search(rf"^\s*domain\s+{one['domain']}\s*$", res.output, re.M), res.output
    assert re.search(r"^\s*definition\b", res.output, re.M)
    res = runner.invoke(app, ["define", "tree", "-n", "3", "--scores", "--url", url])
    assert res.exit_code == 0 and "3 alternatives" in res.output and "(chosen)" in res.output
    assert runner.invoke(app, ["define", "bank", "--format", "xml", "--url", url]).exit_code == 2
    table_in = tmp_path / "terms.csv"
    table_in.write_text("term,context,note\ntree,an old oak tree,a\n,empty,b\nloan,,c\n")
    res = runner.invoke(app, ["define", "-i", str(table_in), "--format", "csv", "--url", url, "--no-progress"])
    assert res.exit_code == 0 and "2 of 3 rows defined" in res.output, res.output
    rows = list(csv.DictReader((tmp_path / "terms.defined.csv").open()))
    assert [(r["term"], r["note"]) for r in rows] == [("tree", "a"), ("loan", "c")] and rows[0]["definition"]
    src = tmp_path / "terms.jsonl"
    src.write_text("\n".join([json.dumps({"term": "tree", "id": 1}), json.dumps({"term": "", "id": 2}),
                              "not json", json.dumps({"term": "loan", "lang": "xx", "id": 4}),
                              json.dumps({"term": "loan", "context": "a bank loan", "id": 5})]) + "\n")
    out = tmp_path / "defined.jsonl"
    res = runner.invoke(app, ["define", "-i", str(src), "-o", str(out), "--url", url, "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 5] and all(isinstance(r["definition"], str) for r in rows)
    assert "3 rejected rows" in res.output
    rejected = [json.loads(x) for x in (tmp_path / "defined.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [2, 3, 4] and "unknown language" in rejected[2]["reason"]
    bad = runner.invoke(app, ["define", "x" * 50, "--url", url])
    assert bad.exit_code == 2 and "the limit is 40" in bad.output


def test_bearer_token_auth(server, pipeline_dir):
    """Redeploy with a token (only the ingress changes); last in the module: it leaves auth on."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(_args(pipeline_dir, auth_token="s3cret")), name=APP, route_prefix="/")
    body = {"items": [{"term": "bank"}]}
    deadline = time.time() + 60
    while time.time() < deadline and server.post("/v1/definitions", json=body).status_code != 401:
        time.sleep(0.5)
    r = server.post("/v1/definitions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert server.post("/v1/definitions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = server.post("/v1/definitions", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["definitions"][0]["term"] == "bank"
    assert server.get("/v1/model").status_code == 401
    assert server.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).json()["auth"] == "bearer token"
    assert server.get("/healthz").status_code == 200  # probes need no token
    assert server.get("/").status_code == 200  # the page holds no data; its API calls carry the token
