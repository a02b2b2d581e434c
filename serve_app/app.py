"""Ray Serve application: FastAPI ingress -> domain router -> one expert deployment per domain -> scorer.

    serve run serve_app/serve_config.yaml                       # local, from the repository root
    serve deploy serve_app/serve_config.yaml                    # a running cluster (see docs/SERVING.md)
    lm-lexicon serve runs/tiny                                  # the same, built from a pipeline output dir

``build_app(args)`` is the application builder (``import_path: serve_app.app:build_app``); ``args`` are
:class:`lm_lexicon.serving.app_config.ServeArgs`. The deployments are thin: the work is in
:mod:`lm_lexicon.serving.engines`, the API models and validation in :mod:`lm_lexicon.serving.schemas`.

* ``Router`` embeds prompts with the pipeline's embedder and picks the nearest (biased) centroid; prompts of
  concurrent requests are embedded together (``@serve.batch``).
* ``Expert{i}`` holds domain i's collapsed dense checkpoint (or the MoE pinned to domain i) and generates with
  dynamic batching (``@serve.batch`` + :class:`lm_lexicon.serving.batching.MergingBatcher`, which hands a free model
  everything queued meanwhile); each has its own scaling/resources (``ServeArgs.expert_overrides``).
* ``Scorer``: reward-model scores (best-of-n selection) and reference-based metrics.
* ``Ingress``: validation, auth, the prompts (with the templates saved with the served experts, so the Router,
  the experts and the Scorer see what training saw), composition through ``DeploymentHandle``s, retries of calls
  that hit a dead or restarting replica (until ``retry_window_s``, then a 503 with ``Retry-After``), and JSON
  errors only; it also serves the web page at ``/`` (:mod:`lm_lexicon.serving.webpage`).
"""

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lm_lexicon import __version__
from lm_lexicon.data.prompts import parse_templates
from lm_lexicon.serving.app_config import (PipelineLayout, ServeArgs, generation_settings, model_card, resolve_args,
                                           resolve_token)
from lm_lexicon.serving.engines import GREEDY, metrics_settings, select_best
from lm_lexicon.serving.exposure import check_exposure
from lm_lexicon.serving.schemas import (ApiError, DefinitionsResponse, ErrorResponse, Limits, ScoreResponse,
                                        error_body, item_prompt, openapi_request_bodies, parse_definitions_request,
                                        parse_json_body, parse_score_request, references_of)
from lm_lexicon.serving.webpage import asset, load_assets

log = logging.getLogger("lm_lexicon.serve")

ERROR_RESPONSES: dict = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "Body is not UTF-8 / not JSON"), (401, "Missing or wrong bearer token"), (413, "Body too large"),
    (415, "Not application/json"), (422, "Failed validation (types, limits, language)"),
    (503, "A deployment stayed unavailable for the retry window; retry later"), (504, "Request timed out"))}


# =================================================================================================== FastAPI app
api = FastAPI(
    title="LM-Lexicon definitions API",
    version=__version__,
    description="Definition modeling (LM-Lexicon, Split-then-Merge) served by Ray Serve: each term is routed to "
                "its semantic domain's expert. Errors are JSON: {\"error\": {status, code, message, details}}.",
)


def _json_error(status: int, code: str, message: str, details: Optional[list] = None,
                headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, details), status_code=status, headers=headers)


async def _api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return _json_error(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _json_error(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    return _json_error(422, "validation_error", "; ".join(f"{d['loc']}: {d['msg']}" for d in details[:5]), details)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _json_error(500, "internal_error", f"internal error ({type(exc).__name__})")


api.add_exception_handler(ApiError, _api_error_handler)
api.add_exception_handler(StarletteHTTPException, _http_error_handler)
api.add_exception_handler(RequestValidationError, _validation_handler)
api.add_exception_handler(Exception, _unexpected_handler)


def _openapi() -> dict:
    """FastAPI's schema plus the POST bodies (parsed by hand so that bad bytes get our error, not FastAPI's)."""
    if api.openapi_schema:
        return api.openapi_schema
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in openapi_request_bodies().items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
        if path in schema.get("paths", {}) and "post" in schema["paths"][path]:
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    api.openapi_schema = schema
    return schema


api.openapi = _openapi


# =================================================================================================== deployments
def _retryable() -> tuple:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)


@serve.deployment(name="Router")
class Router:
    """Prompt -> domain id (the pipeline's DomainRouter and embedder); concurrent requests embedded together."""

    def __init__(self, router_dir: str, max_batch_size: int = 64, batch_wait_timeout_s: float = 0.005,
                 torch_threads: Optional[int] = 1):
        from lm_lexicon.serving.engines import RouterEngine

        self.engine = RouterEngine(router_dir, torch_threads)
        self._route_batch.set_max_batch_size(int(max_batch_size))
        self._route_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _route_batch(self, prompts: list[str]) -> list[int]:
        return await asyncio.to_thread(self.engine.route, prompts)

    async def route(self, prompts: list[str]) -> list[int]:
        return list(await asyncio.gather(*(self._route_batch(p) for p in prompts)))

    async def ping(self) -> dict:
        return {"status": "ok", "n_domains": self.engine.n_domains}

    def check_health(self) -> None:
        if self.engine.router is None or self.engine.router.embedder is None:
            raise RuntimeError("router has no embedder")


@serve.deployment(name="Expert")
class Expert:
    """One domain's definition generator with dynamic batching.

    ``@serve.batch`` collects the calls that arrive together; :class:`~lm_lexicon.serving.batching.MergingBatcher`
    then runs the model on up to ``max_batch_size`` queued prompts whenever it is free (Ray's batch loop alone cuts
    the requests arriving during a long generation into many small batches: see that module).
    """

    def __init__(self, spec: dict, settings: dict, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01,
                 torch_threads: Optional[int] = 1, device: str = "cpu", dtype: str = "float32"):
        from lm_lexicon.serving.batching import MergingBatcher
        from lm_lexicon.serving.engines import ExpertEngine

        self.engine = ExpertEngine(spec["domain"], spec["model_path"], spec["kind"], spec.get("pinned", False),
                                   settings, device=device, dtype=dtype, torch_threads=torch_threads)
        self.batcher = MergingBatcher(self._run_batch, int(max_batch_size), float(batch_wait_timeout_s))
        self._generate_batch.set_max_batch_size(int(max_batch_size))
        self.unhealthy: Optional[str] = None

    def _run_batch(self, requests: list) -> list[dict]:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.generate(requests)
        except Exception as e:
            # the batch's callers get the error (the ingress answers 500); a device out of memory also marks the
            # replica unhealthy, so Serve replaces it instead of failing every later batch
            if "out of memory" in str(e).lower():
                self.unhealthy = f"{type(e).__name__}: {e}"
            raise
        ms = (time.perf_counter() - t0) * 1000.0
        return [{"definitions": o, "batch_size": len(requests), "generate_ms": ms, "domain": self.engine.domain}
                for o in outputs]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=4096)
    async def _generate_batch(self, requests: list[tuple]) -> list[dict]:
        return await self.batcher.submit(requests)

    async def generate(self, prompt: str, n: int = 1, seed: int = 0) -> dict:
        return await self._generate_batch((prompt, int(n), int(seed)))

    async def ping(self) -> dict:
        recent = self.batcher.batches[-100:]
        return {"status": "ok", **self.engine.info(), "queued": self.batcher.queued,
                "mean_recent_batch": sum(recent) / len(recent) if recent else None}

    def check_health(self) -> None:
        if self.unhealthy:
            raise RuntimeError(f"expert replica is unhealthy: {self.unhealthy}")
        if not self.batcher.alive():
            raise RuntimeError("the expert's batching loop stopped")
        if self.engine.generator.model is None:
            raise RuntimeError("expert model not loaded")


@serve.deployment(name="Scorer")
class Scorer:
    """Reward-model scores (batched across requests) and reference-based metrics."""

    def __init__(self, reward_model_dir: Optional[str], reason: Optional[str], metrics: list[str],
                 max_batch_size: int = 64, batch_wait_timeout_s: float = 0.005, torch_threads: Optional[int] = 1,
                 device: str = "cpu"):
        from lm_lexicon.serving.engines import ScorerEngine

        self.engine = ScorerEngine(reward_model_dir, reason, metrics, device=device, torch_threads=torch_threads)
        self._reward_batch.set_max_batch_size(int(max_batch_size))
        self._reward_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _reward_batch(self, pairs: list[tuple]) -> list[Optional[float]]:
        scores = await asyncio.to_thread(self.engine.reward, [p for p, _, _ in pairs], [d for _, d, _ in pairs],
                                         [pool for _, _, pool in pairs])
        return [None] * len(pairs) if scores is None else scores

    async def reward(self, prompts: list[str], definitions: list[str], pools: Optional[list] = None) -> dict:
        """``{"scores": [float] | None, "reason": str | None, "ms": float}``. ``pools[i]``: the candidates pair i is
        ranked among (a best-of-n item's samples), which each pair carries into the batch for a reward model that
        compares candidates; by default the call's definitions that share the pair's prompt (/v1/score items of one
        term and context)."""
        from lm_lexicon.serving.engines import candidate_pools

        t0 = time.perf_counter()
        if not self.engine.available:
            return {"scores": None, "reason": self.engine.reason, "ms": 0.0}
        pools = [tuple(p) for p in pools] if pools is not None else candidate_pools(prompts, definitions)
        scores = await asyncio.gather(*(self._reward_batch((p, d, pool))
                                        for p, d, pool in zip(prompts, definitions, pools)))
        return {"scores": list(scores), "reason": None, "ms": (time.perf_counter() - t0) * 1000.0}

    async def reference_metrics(self, items: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self.engine.reference_metrics, items)

    async def info(self) -> dict:
        return {**self.engine.info(), "metrics_settings": self.engine.metrics_settings()}

    async def ping(self) -> dict:
        return {"status": "ok", "reward_model": self.engine.available}

    def check_health(self) -> None:
        pass  # a missing reward model is a documented state, not an unhealthy replica


async def _http_host() -> str:
    """The address Serve's HTTP proxies bind (its controller's HTTP options)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return str((await controller.get_http_config.remote()).host)
    except Exception as e:  # unknown: treated as exposed by check_exposure
        log.warning("cannot read Serve's HTTP options (%s)", type(e).__name__)
        return "<unknown address>"


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP API: validation, auth, composition of Router -> Expert{domain} -> Scorer."""

    async def __init__(self, router, experts: list, scorer, config: dict):
        self.router = router
        self.experts = list(experts)
        self.scorer = scorer
        self.limits = Limits.model_validate(config["limits"])
        env = config.get("auth_token_env")
        self.token: Optional[str] = resolve_token(config.get("auth_token"), env)
        if not self.token:  # the token is read here, so this is where an exposed, unauthenticated API is refused
            warning = check_exposure(await _http_host(), None, bool(config.get("insecure")), token_env=env,
                                     opt_out="insecure: true in the Serve args (lm-lexicon serve --insecure)")
            if warning:
                log.warning(warning)
        self.card = config["card"]
        self.templates = parse_templates(config.get("prompt_templates") or None)  # the served experts'
        self.request_timeout_s = float(config.get("request_timeout_s", 120.0))
        self.retry_window_s = float(config.get("retry_window_s", 30.0))
        self.model_name = config.get("app_name", "lm-lexicon")
        self.retryable = _retryable()
        self.stats = {"requests": 0, "ok": 0, "client_errors": 0, "unavailable": 0, "timeouts": 0,
                      "internal_errors": 0, "retries": 0}
        self.assets = load_assets()

    # ---- plumbing ----
    def _check_auth(self, request: Request) -> None:
        if not self.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "missing or invalid bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise ApiError(413, "body_too_large", f"request body is {int(length):,} bytes; the limit is "
                                                  f"{self.limits.max_body_bytes:,}")
        raw = await request.body()
        return parse_json_body(raw, request.headers.get("content-type"), self.limits)

    async def _call(self, what: str, method, *args):
        """``await method.remote(*args)``, retrying calls that hit a dead/restarting replica until the window ends."""
        deadline = time.monotonic() + self.retry_window_s
        attempt = 0
        while True:
            try:
                return await method.remote(*args)
            except self.retryable as e:
                attempt += 1
                self.stats["retries"] += 1
                delay = min(0.2 * 2 ** (attempt - 1), 2.0)
                log.warning("%s: %s (attempt %d); retrying", what, type(e).__name__, attempt)
                if time.monotonic() + delay > deadline:
                    raise ApiError(503, "unavailable", f"{what} is unavailable ({type(e).__name__}) after {attempt} "
                                                       f"attempts over {self.retry_window_s:g} s; retry later",
                                   headers={"Retry-After": "5"}) from e
                await asyncio.sleep(delay)

    async def _run(self, request: Request, work) -> JSONResponse:
        """Auth, body, the work under the request timeout; every failure becomes a JSON error response."""
        request_id = uuid.uuid4().hex[:16]
        self.stats["requests"] += 1
        try:
            self._check_auth(request)
            data = await self._body(request)
            payload = await asyncio.wait_for(work(data), timeout=self.request_timeout_s)
            self.stats["ok"] += 1
            return JSONResponse(payload, headers={"X-Request-Id": request_id})
        except ApiError as e:
            key = "client_errors" if e.status < 500 else "unavailable"
            self.stats[key] += 1
            return _json_error(e.status, e.code, e.message, e.details, {**e.headers, "X-Request-Id": request_id})
        except asyncio.TimeoutError:
            self.stats["timeouts"] += 1
            return _json_error(504, "timeout", f"request did not finish within {self.request_timeout_s:g} s",
                               headers={"X-Request-Id": request_id})
        except Exception as e:  # never a stack trace to the client; the log has it
            self.stats["internal_errors"] += 1
            log.exception("request %s failed", request_id)
            return _json_error(500, "internal_error", f"internal error ({type(e).__name__}); request id "
                                                      f"{request_id}", headers={"X-Request-Id": request_id})

    # ---- endpoints ----
    @api.post("/v1/definitions", response_model=DefinitionsResponse, responses=ERROR_RESPONSES,
              summary="Define terms (batched; results in input order)")
    async def definitions(self, request: Request):
        return await self._run(request, self._definitions)

    @api.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
              summary="Score definitions: reward model, and reference-based metrics when references are given")
    async def score(self, request: Request):
        return await self._run(request, self._score)

    @api.get("/", include_in_schema=False)
    async def page(self):
        """The web page (no auth: it holds no data; its API calls carry the token)."""
        return asset(self.assets, "index.html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        found = asset(self.assets, name)
        return found if found is not None else _json_error(404, "not_found", f"no such file: {name}")

    @api.get("/healthz", summary="Liveness of every deployment (no auth)")
    async def healthz(self):
        names = ["Router"] + [f"Expert{d}" for d in range(len(self.experts))] + ["Scorer"]
        handles = [self.router] + self.experts + [self.scorer]

        async def one(h):
            try:
                await asyncio.wait_for(h.ping.remote(), timeout=5.0)
                return "ok"
            except Exception as e:
                return f"unavailable ({type(e).__name__})"

        states = await asyncio.gather(*(one(h) for h in handles))
        deployments = dict(zip(names, states))
        ok = all(s == "ok" for s in states)
        return JSONResponse({"status": "ok" if ok else "degraded", "deployments": deployments, "stats": self.stats},
                            status_code=200 if ok else 503)

    @api.get("/v1/model", summary="Model card: experts, routing, decoding, limits, evaluation metrics")
    async def model(self, request: Request):
        async def work(_):
            card = dict(self.card)
            try:
                card["reward_model"] = await asyncio.wait_for(self.scorer.info.remote(), timeout=10.0)
            except Exception as e:
                card["reward_model"] = {**card.get("reward_model", {}), "live": f"unavailable ({type(e).__name__})"}
            card["auth"] = "bearer token" if self.token else "off"
            card["stats"] = dict(self.stats)
            return card

        self.stats["requests"] += 1
        try:
            self._check_auth(request)
            return JSONResponse(await work(None))
        except ApiError as e:
            self.stats["client_errors"] += 1
            return _json_error(e.status, e.code, e.message, e.details, e.headers)

    # ---- work ----
    async def _definitions(self, data: Any) -> dict:
        t0 = time.perf_counter()
        req = parse_definitions_request(data, self.limits)
        prompts = [item_prompt(it, self.templates) for it in req.items]
        t_route = time.perf_counter()
        domains = await self._call("Router", self.router.route, prompts)
        route_ms = (time.perf_counter() - t_route) * 1000.0
        if len(domains) != len(prompts) or any(not 0 <= d < len(self.experts) for d in domains):
            raise RuntimeError(f"router returned domains {domains} for {len(self.experts)} experts")

        async def generate(prompt: str, domain: int):
            t = time.perf_counter()
            out = await self._call(f"Expert{domain}", self.experts[domain].generate, prompt, req.n, req.seed)
            out["roundtrip_ms"] = (time.perf_counter() - t) * 1000.0
            return out

        generated = await asyncio.gather(*(generate(p, d) for p, d in zip(prompts, domains)))
        candidates = [g["definitions"] for g in generated]
        score_ms = 0.0
        scores = None
        reason = "not requested (return_scores=false, n=1)"
        if req.n > 1 or req.return_scores:
            flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
            flat_d = [c for cs in candidates for c in cs]
            pools = [list(cs) for cs in candidates for _ in cs]  # an item's samples, even if another has its prompt
            res = await self._call("Scorer", self.scorer.reward, flat_p, flat_d, pools)
            score_ms = res.get("ms", 0.0)
            if res["scores"] is not None:
                scores, k = [], 0
                for cs in candidates:
                    scores.append(res["scores"][k:k + len(cs)])
                    k += len(cs)
                reason = None
            else:
                reason = res["reason"]
        if req.n > 1:
            picked, selection = select_best(candidates, scores)
        else:
            picked, selection = [cs[0] if cs else "" for cs in candidates], GREEDY
        total_ms = (time.perf_counter() - t0) * 1000.0
        results = []
        for i, (it, p, d, g, pick) in enumerate(zip(req.items, prompts, domains, generated, picked)):
            item_scores = scores[i] if scores is not None else None
            score = item_scores[candidates[i].index(pick)] if item_scores else None
            results.append({
                "index": i, "term": it.term.strip(), "lang": it.lang, "prompt": p, "definition": pick,
                "domain": int(d), "score": score, "score_reason": reason if score is None else None,
                "selection": selection,
                "candidates": [{"definition": c, "score": item_scores[j] if item_scores else None}
                               for j, c in enumerate(candidates[i])] if req.n > 1 else None,
                "batch_size": g.get("batch_size"),
                "timing_ms": {"route": round(route_ms, 2), "generate": round(g.get("generate_ms", 0.0), 2),
                              "expert_roundtrip": round(g.get("roundtrip_ms", 0.0), 2), "score": round(score_ms, 2),
                              "total": round(total_ms, 2)},
            })
        return {"model": self.model_name, "n": req.n, "definitions": results,
                "reward_model": {"used": scores is not None, "reason": reason},
                "timing_ms": {"route": round(route_ms, 2), "score": round(score_ms, 2), "total": round(total_ms, 2)}}

    async def _score(self, data: Any) -> dict:
        t0 = time.perf_counter()
        req = parse_score_request(data, self.limits)
        prompts = [item_prompt(it, self.templates) for it in req.items]
        definitions = [it.definition for it in req.items]
        with_refs = [i for i, it in enumerate(req.items) if references_of(it)]
        metric_items = [{"term": req.items[i].term.strip(), "lang": req.items[i].lang,
                         "prediction": req.items[i].definition, "references": references_of(req.items[i])}
                        for i in with_refs]
        reward, metrics = await asyncio.gather(
            self._call("Scorer", self.scorer.reward, prompts, definitions),
            self._call("Scorer", self.scorer.reference_metrics, metric_items) if metric_items else _none())
        per_item: dict[int, dict] = dict(zip(with_refs, metrics or []))
        results = []
        for i, it in enumerate(req.items):
            s = reward["scores"][i] if reward["scores"] is not None else None
            results.append({"index": i, "term": it.term.strip(), "score": s,
                            "score_reason": None if s is not None else reward["reason"],
                            "metrics": per_item.get(i)})
        settings = self.card.get("reference_metrics_settings") or {}
        return {"results": results,
                "reward_model": {"available": reward["scores"] is not None, "reason": reward["reason"]},
                "metrics_settings": settings, "timing_ms": {"total": round((time.perf_counter() - t0) * 1000, 2)}}


async def _none():
    return None


# =================================================================================================== builder
def build_app(args: dict):
    """The application from :class:`~lm_lexicon.serving.app_config.ServeArgs` (a dict, e.g. the YAML's ``args``)."""
    sa = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args or {}))
    layout = PipelineLayout.discover(sa.output_dir, sa.experts_source, sa.router_dir, sa.reward_model_dir)
    sa = resolve_args(sa, layout.pipeline_config)
    settings = generation_settings(sa)
    card = model_card(layout, sa, settings)
    card["reference_metrics_settings"] = metrics_settings(sa.metrics)

    r = sa.router
    router = Router.options(**r.serve_options("Router")).bind(
        str(layout.router_dir), r.max_batch_size, r.batch_wait_timeout_s, r.torch_threads)
    experts = []
    for spec in layout.experts:
        o = sa.expert_for(spec.domain)
        experts.append(Expert.options(**o.serve_options(spec.deployment_name)).bind(
            spec.to_dict(), settings, o.max_batch_size, o.batch_wait_timeout_s, o.torch_threads, sa.device, sa.dtype))
    s = sa.scorer
    scorer = Scorer.options(**s.serve_options("Scorer")).bind(
        str(layout.reward_model_dir) if layout.reward_model_dir else None, layout.reward_reason, list(sa.metrics),
        s.max_batch_size, s.batch_wait_timeout_s, s.torch_threads, sa.device)
    config = {"limits": sa.limits.model_dump(), "auth_token": sa.auth_token, "auth_token_env": sa.auth_token_env,
              "card": card, "request_timeout_s": sa.request_timeout_s, "retry_window_s": sa.retry_window_s,
              "app_name": sa.app_name, "insecure": sa.insecure, "prompt_templates": card["prompt_templates"]}
    return Ingress.options(**sa.ingress.serve_options("Ingress")).bind(router, experts, scorer, config)
