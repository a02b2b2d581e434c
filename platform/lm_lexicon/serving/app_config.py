"""What the Serve application is built from: its arguments (:class:`ServeArgs`), the pipeline artifacts it serves
(:class:`PipelineLayout`) and the model card (:func:`model_card`).

**Artifacts** (a pipeline ``output_dir``, see README "Artifacts"):

* experts: ``export/collapsed/domain-{i}/`` (plain dense checkpoints, one per domain: what serving is designed
  around, shared/DESIGN.md §3), or, when the export is absent, the MoE ``merge/model`` loaded once per expert
  deployment and pinned to that deployment's domain (every row gets ``domain_labels = i``: the same function, at
  the memory cost of holding every expert's FFN in each replica);
* router: the one the experts were exported with (``export/collapsed/router``, a copy of the MoE's
  ``merge/model/router``, itself the partition's router), so served routing IS the offline routing;
* prompt templates: the ``prompt_templates.json`` saved with the experts (and the router); every prompt the app
  routes, generates from and scores is built with them, so a recipe's custom templates are served as trained;
* reward model: ``evaluate/reward_model/`` (:meth:`lm_lexicon.evaluate.best_of_n.reward.RewardModel.save` format) when
  present (and trained on the experts' templates);
* metrics: ``evaluate/metrics.json``; defaults: the pipeline's resolved ``config.yaml`` (its ``serve`` section gives
  the limits and batching, its ``evaluate`` section the decoding settings, so served n = 1 output equals the
  evaluation's).

**Arguments**: :class:`ServeArgs` are the recipe's ``serve`` section (:class:`ServeOptions`, the same model) plus the
output directory; fields the args leave unset come from the run's ``serve`` section, decoding from its ``evaluate``
section, then the defaults here. Importing this module is cheap (no torch, no Ray).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lm_lexicon.data.prompts import TEMPLATES_FILE, PromptTemplates
from lm_lexicon.serving.schemas import Limits

DEFAULT_TOKEN_ENV = "LM_LEXICON_API_TOKEN"
MOE_MODEL_TYPE = "lm_lexicon_moe"
MOE_SECTION = "lm_lexicon_moe"
COLLAPSED_MANIFEST = "collapsed.json"
REWARD_CONFIG = "reward_config.json"
STAGE_CONFIG_ORDER = ("export", "evaluate", "merge", "experts", "partition", "data")
GENERATION_FROM_EVAL = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                        "no_repeat_ngram_size", "num_beams", "length_penalty")


# =================================================================================================== arguments
class DeploymentOptions(BaseModel):
    """Scaling, resources and batching of one deployment (or of every expert, see ``ServeArgs.expert``).

    ``autoscaling_config`` (Ray Serve's fields: ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``,
    ...) replaces ``num_replicas`` when given. ``max_ongoing_requests`` defaults to ``2 * max_batch_size`` (and
    must be >= ``max_batch_size``, or a replica could never fill a batch).
    """

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Fixed number of replicas (when no autoscaling_config).")
    autoscaling_config: Optional[dict] = Field(None, description="Ray Serve autoscaling (min_replicas, max_replicas, "
                                                                 "target_ongoing_requests, ...); replaces "
                                                                 "num_replicas.")
    max_ongoing_requests: Optional[int] = Field(None, ge=1, description="Requests a replica holds at once (None: "
                                                                        "2 x max_batch_size).")
    max_queued_requests: int = Field(-1, ge=-1, description="-1: unbounded queue at the callers' handles.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each replica reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources of each replica "
                                                                          "(e.g. {serve_node: 0.1}: only nodes "
                                                                          "that declare it).")
    max_batch_size: int = Field(32, ge=1, description="@serve.batch size.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch wait for a fuller batch.")
    torch_threads: Optional[int] = Field(1, ge=1, description="torch intra-op threads per replica (None: torch's "
                                                               "default, every core).")
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between Serve's health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check slower than this fails.")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description="Seconds a stopping replica may finish its "
                                                                       "requests.")

    @model_validator(mode="after")
    def _ongoing_covers_a_batch(self) -> "DeploymentOptions":
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}): a replica could never fill a batch")
        return self

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def serve_options(self, name: str) -> dict:
        """Keyword arguments of ``Deployment.options(...)``."""
        opts: dict[str, Any] = {
            "name": name, "max_ongoing_requests": self.ongoing, "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {}),
                                  **({"resources": dict(self.resources)} if self.resources else {})},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling_config:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def _opts(**kw) -> DeploymentOptions:
    return DeploymentOptions(**kw)


#: Keys of the recipe's ``serve`` section before it became :class:`ServeOptions` -> where they live now (None: gone,
#: they were never read). Old runs' ``config.yaml`` still hold them.
LEGACY_SERVE_KEYS = {"max_items": "limits.max_items", "max_term_chars": "limits.max_term_chars",
                     "max_context_chars": "limits.max_context_chars", "max_batch_size": "expert.max_batch_size",
                     "batch_wait_timeout_s": "expert.batch_wait_timeout_s", "auth_token_env": "auth_token_env",
                     "host": None, "port": None}


class ServeOptions(BaseModel):
    """How a pipeline is served: the recipe's ``serve`` section (:class:`lm_lexicon.config.PipelineConfig`) and,
    with the output directory and an optional token, the Serve application's arguments (:class:`ServeArgs`). One
    model, so a field set in the recipe and one set in the args are the same field: the args win
    (:func:`resolve_args`)."""

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field("lm-lexicon", description="Shown in the model card.")
    experts_source: Literal["auto", "collapsed", "moe"] = Field(
        "auto", description="auto: export/collapsed when present, else merge/model pinned per domain.")
    router_dir: Optional[str] = Field(None, description="Override the router directory.")
    reward_model_dir: Optional[str] = Field(None, description="Override <output_dir>/evaluate/reward_model.")
    ingress: DeploymentOptions = Field(default_factory=lambda: _opts(num_cpus=0.1, max_ongoing_requests=256,
                                                                     max_batch_size=1, torch_threads=None))
    router: DeploymentOptions = Field(default_factory=lambda: _opts(num_cpus=0.5, max_batch_size=64,
                                                                    batch_wait_timeout_s=0.005,
                                                                    max_ongoing_requests=256))
    expert: DeploymentOptions = Field(default_factory=lambda: _opts(max_batch_size=32, batch_wait_timeout_s=0.02),
                                      description="Options of every expert deployment (batch 32: docs/BENCHMARKS.md, "
                                                  "32 beat 16 on a 2-core CPU at 128 requests in flight).")
    expert_overrides: dict[int, dict] = Field(default_factory=dict,
                                              description="Per-domain changes to `expert` (e.g. autoscaling).")
    scorer: DeploymentOptions = Field(default_factory=lambda: _opts(num_cpus=0.5, max_batch_size=64,
                                                                    batch_wait_timeout_s=0.005,
                                                                    max_ongoing_requests=256))
    generation: dict = Field(default_factory=dict, description="GenerationSettings fields (default: the "
                                                               "pipeline's evaluate section).")
    limits: Limits = Field(default_factory=Limits)
    metrics: list[str] = Field(default_factory=lambda: ["bleu_a", "sacrebleu", "rouge_l", "exact_match"],
                               description="Reference-based metrics of /v1/score (lm_lexicon.metrics names).")
    auth_token_env: Optional[str] = Field(DEFAULT_TOKEN_ENV, description="Env var holding the bearer token, read "
                                                                         "by the ingress replica; auth is off "
                                                                         "when neither it nor auth_token is set.")
    insecure: bool = Field(False, description="Serve without a token on a non-loopback address (0.0.0.0): the "
                                              "ingress refuses to start there otherwise "
                                              "(lm_lexicon.serving.exposure).")
    request_timeout_s: float = Field(120.0, gt=0, description="A request not answered by then gets a 504.")
    retry_window_s: float = Field(30.0, ge=0, description="How long a call to a dead or restarting replica is "
                                                          "retried before the request gets a 503.")
    device: str = Field("cpu", description="Device of the experts and the reward model (cpu, cuda).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights dtype of the experts.")

    @model_validator(mode="before")
    @classmethod
    def _no_legacy_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [k for k in LEGACY_SERVE_KEYS if k in data and k not in cls.model_fields]
            if old:
                moved = ", ".join(f"{k} -> {LEGACY_SERVE_KEYS[k]}" if LEGACY_SERVE_KEYS[k] else
                                  f"{k} (unused: pass --host/--port to lm-lexicon serve)" for k in old)
                raise ValueError(f"serve options moved: {moved}")
        return data

    @model_validator(mode="after")
    def _check(self) -> "ServeOptions":
        for d, override in self.expert_overrides.items():
            self.expert_for(d)  # validates
        return self

    def expert_for(self, domain: int) -> DeploymentOptions:
        """The expert options of one domain: ``expert`` updated with ``expert_overrides[domain]``."""
        override = self.expert_overrides.get(int(domain)) or {}
        merged = {**self.expert.model_dump(exclude_unset=False), **override}
        if "autoscaling_config" in override and override["autoscaling_config"]:
            merged.pop("num_replicas", None)
        return DeploymentOptions(**merged)


class ServeArgs(ServeOptions):
    """Arguments of :func:`serve_app.app.build_app` (the ``args:`` of ``serve_app/serve_config.yaml``): the
    :class:`ServeOptions` plus what a recipe does not hold."""

    output_dir: str = Field(..., description="Pipeline output directory (e.g. runs/tiny).")
    auth_token: Optional[str] = Field(None, description="Bearer token (prefer auth_token_env: args are visible "
                                                        "in the Serve config).")


def resolve_args(args: "ServeArgs | dict", pipeline_config: Optional[dict] = None) -> ServeArgs:
    """``args`` (a dict is validated) over the pipeline config's ``serve`` section (the same :class:`ServeOptions`;
    the args' fields win, the section's fill the rest), and decoding from its ``evaluate`` section."""
    sa = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    cfg = pipeline_config or {}
    eval_cfg = cfg.get("evaluate") or {}
    data = deep_merge(recipe_serve_section(cfg.get("serve")), sa.model_dump(exclude_unset=True))
    known = _generation_fields()
    data["generation"] = {**{k: eval_cfg[k] for k in GENERATION_FROM_EVAL if k in eval_cfg and k in known},
                          **data.get("generation", {})}
    return ServeArgs.model_validate(data)


def recipe_serve_section(section: Optional[dict]) -> dict:
    """The ``serve`` section of a run's ``config.yaml`` as :class:`ServeOptions` fields (validated). A run from
    before the section became ServeOptions holds its old keys (:data:`LEGACY_SERVE_KEYS`): they are read where they
    moved, as they were then (an unset ``auth_token_env`` kept the default)."""
    section = dict(section or {})
    legacy = {k: section.pop(k) for k in list(section) if k in LEGACY_SERVE_KEYS and k not in ServeOptions.model_fields}
    if legacy:
        for key, value in legacy.items():
            target = LEGACY_SERVE_KEYS[key]
            if target is None:
                continue
            head, _, leaf = target.rpartition(".")
            section.setdefault(head, {})[leaf] = value
        if section.get("auth_token_env") is None:
            section.pop("auth_token_env", None)
    return ServeOptions.model_validate(section).model_dump(exclude_unset=True)


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated with ``extra``, nested mappings merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _generation_fields() -> set[str]:
    import dataclasses

    from lm_lexicon.evaluate.generate import GenerationSettings

    return {f.name for f in dataclasses.fields(GenerationSettings)}


def generation_settings(args: ServeArgs) -> dict:
    """The experts' default GenerationSettings (deterministic; n > 1 samples per request); one generation pass holds at least a full serve batch."""
    from lm_lexicon.evaluate.generate import GenerationSettings

    settings = GenerationSettings.from_any({k: v for k, v in args.generation.items()})
    if settings.do_sample or settings.num_return_sequences != 1:
        settings = settings.replace(do_sample=False, num_return_sequences=1)  # n comes per request
    biggest = max([args.expert.max_batch_size] + [args.expert_for(d).max_batch_size for d in args.expert_overrides])
    if settings.batch_size < biggest:
        settings = settings.replace(batch_size=biggest)
    return settings.to_dict()


def resolve_token(token: Optional[str], token_env: Optional[str], environ: Optional[dict] = None) -> Optional[str]:
    """The bearer token: ``token`` (``ServeArgs.auth_token``), else the env var ``token_env``
    (``ServeArgs.auth_token_env``) of ``environ`` (this process's environment); None means auth is off. The ingress
    replica calls it where it runs, and ``lm-lexicon serve`` before starting, to refuse an exposed unauthenticated
    API."""
    environ = os.environ if environ is None else environ
    if token:
        return token
    if token_env and environ.get(token_env):
        return environ[token_env]
    return None


# =================================================================================================== artifacts
@dataclass
class ExpertSpec:
    """One expert deployment: the checkpoint it loads and how (``pinned``: an MoE with every row labelled
    ``domain``)."""

    domain: int
    model_path: str
    kind: Literal["dense", "moe"]
    pinned: bool = False

    @property
    def deployment_name(self) -> str:
        return f"Expert{self.domain}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PipelineLayout:
    output_dir: Path
    source: Literal["collapsed", "moe"]
    experts: list[ExpertSpec]
    router_dir: Path
    reward_model_dir: Optional[Path]
    reward_reason: Optional[str]
    metrics_path: Optional[Path]
    pipeline_config: dict = field(default_factory=dict)
    config_path: Optional[Path] = None
    prompt_templates: Any = None  # the experts' PromptTemplates (None: the defaults)

    @property
    def n_domains(self) -> int:
        return len(self.experts)

    @classmethod
    def discover(cls, output_dir: str | Path, source: str = "auto", router_dir: Optional[str | Path] = None,
                 reward_model_dir: Optional[str | Path] = None) -> "PipelineLayout":
        """Find what to serve under a pipeline ``output_dir`` (module docstring); a clear error when nothing is."""
        out = Path(output_dir).expanduser().resolve()
        if not out.is_dir():
            raise FileNotFoundError(f"{output_dir}: no such pipeline output directory")
        collapsed = out / "export" / "collapsed"
        moe = out / "merge" / "model"
        if source not in ("auto", "collapsed", "moe"):
            raise ValueError(f"experts source must be auto, collapsed or moe, got {source!r}")
        if source in ("auto", "collapsed") and (collapsed / COLLAPSED_MANIFEST).is_file():
            manifest = json.loads((collapsed / COLLAPSED_MANIFEST).read_text(encoding="utf-8"))
            experts = [ExpertSpec(int(e["domain"]), str(collapsed / e["path"]), "dense")
                       for e in sorted(manifest["domains"], key=lambda e: int(e["domain"]))]
            found_router = collapsed / manifest["router_dir"] if manifest.get("router_dir") else None
            kind = "collapsed"
        elif source == "collapsed":
            raise FileNotFoundError(f"{collapsed}: no {COLLAPSED_MANIFEST} (run the export stage)")
        elif (moe / "config.json").is_file():
            raw = json.loads((moe / "config.json").read_text(encoding="utf-8"))
            if raw.get("model_type") != MOE_MODEL_TYPE or MOE_SECTION not in raw:
                raise ValueError(f"{moe} is not an lm_lexicon MoE (model_type={raw.get('model_type')!r})")
            section = raw[MOE_SECTION]
            if section.get("routing", "domain") != "domain":
                raise ValueError(f"{moe}: routing {section.get('routing')!r}; one deployment per domain needs "
                                 "domain routing (serve a token-routed MoE from its Mixtral export instead)")
            experts = [ExpertSpec(d, str(moe), "moe", pinned=True) for d in range(int(section["n_experts"]))]
            found_router = moe / (section.get("router_dir") or "router")
            kind = "moe"
        else:
            raise FileNotFoundError(f"{out}: nothing to serve: no export/collapsed/{COLLAPSED_MANIFEST} and no "
                                    "merge/model/config.json (run the pipeline's merge and export stages)")
        for e in experts:
            if not (Path(e.model_path) / "config.json").is_file():
                raise FileNotFoundError(f"{e.model_path}: no config.json (expert for domain {e.domain})")
        if sorted(e.domain for e in experts) != list(range(len(experts))):
            raise ValueError(f"expert domains must be 0..{len(experts) - 1}, got {[e.domain for e in experts]}")
        if router_dir is not None:
            found_router = Path(router_dir).expanduser().resolve()
        elif found_router is None or not (found_router / "router.json").is_file():
            found_router = out / "partition" / "router"
        if not (found_router / "router.json").is_file():
            raise FileNotFoundError(f"{found_router}: no router.json (the domain router)")
        router_doc = json.loads((found_router / "router.json").read_text(encoding="utf-8"))
        if int(router_doc.get("n_clusters", -1)) != len(experts):
            raise ValueError(f"{found_router}: the router has {router_doc.get('n_clusters')} domains but there are "
                             f"{len(experts)} experts")
        templates = _served_templates(experts, found_router)

        rm = Path(reward_model_dir).expanduser().resolve() if reward_model_dir else out / "evaluate" / "reward_model"
        if (rm / REWARD_CONFIG).is_file() and (rm / TEMPLATES_FILE).is_file() and \
                PromptTemplates.load(rm) != templates:
            reward_dir = None
            reason = (f"the reward model at {rm} was trained on prompts of other templates than the experts'; "
                      "best-of-n keeps the first sample and scores are null")
        elif (rm / REWARD_CONFIG).is_file():
            reward_dir, reason = rm, None
        else:
            reward_dir = None
            reason = (f"no reward model at {rm} (the evaluate stage saves one there); best-of-n keeps the first "
                      "sample and scores are null")
        metrics = out / "evaluate" / "metrics.json"
        cfg, cfg_path = read_pipeline_config(out)
        return cls(out, kind, experts, found_router, reward_dir, reason, metrics if metrics.is_file() else None,
                   cfg, cfg_path, templates)


def _served_templates(experts: list[ExpertSpec], router_dir: Path):
    """The prompt templates saved with the experts (they must agree, and with the router's when it has them): the
    prompts the ingress builds for routing, generation and scoring."""
    dirs = sorted({e.model_path for e in experts})
    if (router_dir / TEMPLATES_FILE).is_file():
        dirs.append(str(router_dir))
    return PromptTemplates.agreed(dirs)


def read_pipeline_config(output_dir: Path) -> tuple[dict, Optional[Path]]:
    """The resolved recipe a stage wrote beside its artifacts (the latest stage first); ``({}, None)`` if none."""
    import yaml

    for stage in STAGE_CONFIG_ORDER:
        path = Path(output_dir) / stage / "config.yaml"
        if path.is_file():
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue
            if isinstance(doc, dict):
                return doc, path
    return {}, None


# =================================================================================================== model card
def _compact_metrics(path: Optional[Path]) -> Optional[dict]:
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {"error": f"cannot read {path.name}: {e}"}
    results = doc.get("results") or {}
    table = {}
    for model, metrics in results.items():
        if isinstance(metrics, dict):
            table[model] = {m: (v.get("value") if isinstance(v, dict) else v) for m, v in metrics.items()}
    return {"path": str(path), "meta": doc.get("meta") or {}, "results": table}


def _architecture(model_path: str) -> Optional[str]:
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = cfg.get("architectures") or []
    return archs[0] if archs else cfg.get("model_type")


def _templates_of(layout: PipelineLayout) -> PromptTemplates:
    return layout.prompt_templates if layout.prompt_templates is not None else PromptTemplates()


def model_card(layout: PipelineLayout, args: ServeArgs, generation: dict) -> dict:
    """``GET /v1/model``: what is served, how requests are routed, decoding, limits, and the evaluation results."""
    router_doc = json.loads((layout.router_dir / "router.json").read_text(encoding="utf-8"))
    experts = []
    for e in layout.experts:
        opts = args.expert_for(e.domain)
        experts.append({
            "domain": e.domain, "deployment": e.deployment_name, "path": e.model_path, "kind": e.kind,
            "pinned_domain": e.domain if e.pinned else None, "architecture": _architecture(e.model_path),
            "max_batch_size": opts.max_batch_size, "batch_wait_timeout_s": opts.batch_wait_timeout_s,
            "max_ongoing_requests": opts.ongoing, "num_gpus": opts.num_gpus, "num_cpus": opts.num_cpus,
            "scaling": {"autoscaling_config": opts.autoscaling_config} if opts.autoscaling_config
            else {"num_replicas": opts.num_replicas},
        })
    meta = {k: v for k, v in (router_doc.get("meta") or {}).items() if k in ("seed", "slack", "margin")}
    return {
        "name": args.app_name,
        "recipe": layout.pipeline_config.get("name"),
        "output_dir": str(layout.output_dir),
        "experts_source": layout.source,
        "experts": experts,
        "routing": {
            "router_dir": str(layout.router_dir), "method": router_doc.get("method"),
            "n_domains": router_doc.get("n_clusters"), "biased": router_doc.get("biased"),
            "embedder": router_doc.get("embedder"), **meta,
            "rule": "domain = argmax_j cos(embed(prompt), centroid_j) - bias_j "
                    "(lm_lexicon.partition.routing.DomainRouter); "
                    "prompt = lm_lexicon.data.prompts.format_prompt(term, context, lang, templates=prompt_templates)",
        },
        "prompt_templates": _templates_of(layout).to_config(),
        "generation": generation,
        "best_of_n": "n > 1 samples n definitions (temperature/top-k/top-p of `generation`) and keeps the one the "
                     "reward model scores highest; without a reward model, the first sample",
        "reward_model": {"available": layout.reward_model_dir is not None,
                         "path": str(layout.reward_model_dir) if layout.reward_model_dir else None,
                         "reason": layout.reward_reason},
        "limits": args.limits.model_dump(),
        "reference_metrics": list(args.metrics),
        "metrics": _compact_metrics(layout.metrics_path),
    }
