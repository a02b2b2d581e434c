"""The HTTP API's request/response models and the validation every request goes through.

A request body is checked in this order, each failure a 4xx with a JSON error body (:class:`ApiError`), never a
stack trace:

1. size (413), content type (415), UTF-8 (400 ``invalid_utf8``), JSON syntax (400 ``invalid_json``);
2. structure and types against the pydantic models (422 ``validation_error``): strict types (``"n": "3"`` or
   ``"term": 5`` are errors, not coerced), unknown fields rejected (a typo such as ``"contxt"`` would otherwise
   be silently ignored);
3. the configurable :class:`Limits` (422 ``validation_error``): empty term, term/context/definition too long,
   too many items, ``n`` too large, a language outside the allow-list, control characters or lone UTF-16
   surrogates (``"\\ud800"`` is valid JSON but not encodable text).

Error body: ``{"error": {"status": 422, "code": "validation_error", "message": "items[0].term: must not be
empty", "details": [{"loc": ["items", 0, "term"], "msg": "must not be empty"}]}}``.

Prompts are built here (:func:`item_prompt`) by the same function the pipeline uses
(:func:`lm_lexicon.data.prompts.format_prompt`, what :func:`lm_lexicon.data.prompts.record_prompt` calls) with the
templates saved with the served experts, so routing and generation see exactly the prompt string the offline router
and evaluation see.
"""
from __future__ import annotations

import json
import unicodedata
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from lm_lexicon.data.prompts import LANGUAGE_NAMES, format_prompt

DEFAULT_LANGUAGES = ("en", "es", "fr", "pt", "de")
JSON_TYPES = ("application/json",)


# =================================================================================================== errors
class ApiError(Exception):
    """An error the API reports to the client: ``status`` (4xx/5xx), a stable ``code``, a message, details."""

    def __init__(self, status: int, code: str, message: str, details: Optional[list] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.details = list(details or [])
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.status, self.code, self.message, self.details)


def error_body(status: int, code: str, message: str, details: Optional[list] = None) -> dict:
    return {"error": {"status": int(status), "code": code, "message": message, "details": list(details or [])}}


def _loc_str(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def validation_error(details: list[dict], max_in_message: int = 5) -> ApiError:
    """A 422 from ``[{"loc": [...], "msg": ...}]`` (the message lists the first few)."""
    parts = [f"{_loc_str(d['loc'])}: {d['msg']}" for d in details[:max_in_message]]
    more = len(details) - max_in_message
    message = "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
    return ApiError(422, "validation_error", message, details)


# =================================================================================================== limits
class Limits(BaseModel):
    """What a request may hold (the API rejects anything beyond with a 4xx)."""

    model_config = ConfigDict(extra="forbid")

    max_items: int = Field(64, ge=1, description="Items per request.")
    max_term_chars: int = Field(100, ge=1, description="Longest accepted term (characters, after stripping).")
    max_context_chars: int = Field(2000, ge=1, description="Longest accepted context (characters).")
    max_definition_chars: int = Field(2000, ge=1, description="Longest definition accepted by /v1/score.")
    max_references: int = Field(32, ge=1, description="References per /v1/score item.")
    max_n: int = Field(8, ge=1, description="Largest best-of-n.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body (bytes).")
    languages: list[str] = Field(default_factory=lambda: list(DEFAULT_LANGUAGES),
                                 description="Accepted language codes (a subset of the prompt templates' languages).")

    def model_post_init(self, __context: Any) -> None:
        unknown = sorted(set(self.languages) - set(LANGUAGE_NAMES))
        if unknown:
            raise ValueError(f"languages {unknown} have no prompt template; known: {sorted(LANGUAGE_NAMES)}")
        if not self.languages:
            raise ValueError("languages must not be empty")


# =================================================================================================== requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DefinitionItem(_Strict):
    term: StrictStr = Field(..., description="The term to define.", examples=["bank"])
    context: Optional[StrictStr] = Field(None, description="A usage example (empty or absent: term-only).",
                                         examples=["they sat on the bank of the river"])
    lang: StrictStr = Field("en", description="Language code (see GET /v1/model for the allow-list).")


class DefinitionsRequest(_Strict):
    items: list[DefinitionItem] = Field(..., description="Terms to define; results come back in this order.")
    n: StrictInt = Field(1, description="Best-of-n: 1 is greedy decoding; n > 1 samples n definitions and keeps "
                                        "the one the reward model scores highest (the first sample when no reward "
                                        "model is deployed).")
    return_scores: StrictBool = Field(False, description="Score the returned definitions with the reward model "
                                                         "(and, with n > 1, return every candidate with its score).")
    seed: StrictInt = Field(0, description="Sampling seed (n > 1): a sample depends on (seed, prompt, index) only.")


class ScoreItem(_Strict):
    term: StrictStr
    context: Optional[StrictStr] = None
    lang: StrictStr = "en"
    definition: StrictStr = Field(..., description="The definition to score.")
    reference: Optional[Union[StrictStr, list[StrictStr]]] = Field(
        None, description="Reference definition(s): adds reference-based metrics. Pass every definition of the "
                          "headword for Protocol A BLEU as the paper computes it.")


class ScoreRequest(_Strict):
    items: list[ScoreItem]


# =================================================================================================== responses
class Candidate(BaseModel):
    definition: str
    score: Optional[float] = None


class DefinitionResult(BaseModel):
    index: int
    term: str
    lang: str
    prompt: str
    definition: str
    domain: Optional[int]
    score: Optional[float] = Field(None, description="Reward-model score of the definition (null: not requested "
                                                     "or no reward model; see score_reason).")
    score_reason: Optional[str] = None
    selection: str = Field(..., description="greedy | reward_model | first_sample")
    candidates: Optional[list[Candidate]] = None
    batch_size: Optional[int] = Field(None, description="Prompts in the expert's generation batch.")
    timing_ms: dict[str, float]


class DefinitionsResponse(BaseModel):
    model: str
    n: int
    definitions: list[DefinitionResult]
    reward_model: dict
    timing_ms: dict[str, float]


class ScoreResult(BaseModel):
    index: int
    term: str
    score: Optional[float]
    score_reason: Optional[str] = None
    metrics: Optional[dict[str, Optional[float]]] = None


class ScoreResponse(BaseModel):
    results: list[ScoreResult]
    reward_model: dict
    metrics_settings: dict
    timing_ms: dict[str, float]


class ErrorResponse(BaseModel):
    error: dict


# =================================================================================================== parsing
def parse_json_body(raw: bytes, content_type: Optional[str], limits: Limits) -> Any:
    """Bytes -> a JSON value, or an :class:`ApiError` saying what is wrong with them."""
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, "body_too_large", f"request body is {len(raw):,} bytes; the limit is "
                                              f"{limits.max_body_bytes:,}")
    if content_type:
        media = content_type.split(";")[0].strip().lower()
        if media and media not in JSON_TYPES and not media.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, got {media!r}")
    if not raw.strip():
        raise ApiError(400, "empty_body", "request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {e.start}: {e.reason})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                                            f"column {e.colno}")
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply")


def _pydantic(model: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise validation_error([{"loc": [], "msg": f"expected a JSON object, got {_json_type(data)}"}])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        details = [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
                   for err in e.errors(include_url=False, include_input=False, include_context=False)]
        raise validation_error(details)


def _json_type(v: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(v), type(v).__name__)


def text_problem(s: str, *, allow_newlines: bool) -> Optional[str]:
    """Why ``s`` cannot be used as model input (None when it can): lone surrogates, control characters."""
    for ch in s:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return "contains an invalid Unicode code point (a lone UTF-16 surrogate)"
        if unicodedata.category(ch) == "Cc" and not (allow_newlines and ch in "\n\r\t"):
            return f"contains a control character (U+{ord(ch):04X})"
    return None


def _check_text(errors: list, loc: list, value: Optional[str], limit: int, *, required: bool,
                allow_newlines: bool) -> None:
    if value is None:
        return
    if required and not value.strip():
        errors.append({"loc": loc, "msg": "must not be empty"})
        return
    if len(value) > limit:
        errors.append({"loc": loc, "msg": f"is {len(value):,} characters long; the limit is {limit:,}"})
        return
    problem = text_problem(value, allow_newlines=allow_newlines)
    if problem:
        errors.append({"loc": loc, "msg": problem})


def _check_common(errors: list, items: list, limits: Limits) -> None:
    if not items:
        errors.append({"loc": ["items"], "msg": "must hold at least one item"})
    if len(items) > limits.max_items:
        errors.append({"loc": ["items"], "msg": f"holds {len(items)} items; the limit is {limits.max_items}"})
        return  # do not report every item of an oversized request
    for i, it in enumerate(items):
        _check_text(errors, ["items", i, "term"], it.term.strip(), limits.max_term_chars, required=True,
                    allow_newlines=False)
        _check_text(errors, ["items", i, "context"], it.context, limits.max_context_chars, required=False,
                    allow_newlines=True)
        if it.lang not in limits.languages:
            errors.append({"loc": ["items", i, "lang"],
                           "msg": f"unknown language {it.lang!r}; accepted: {', '.join(limits.languages)}"})


def parse_definitions_request(data: Any, limits: Limits) -> DefinitionsRequest:
    req = _pydantic(DefinitionsRequest, data)
    errors: list[dict] = []
    _check_common(errors, req.items, limits)
    if not 1 <= req.n <= limits.max_n:
        errors.append({"loc": ["n"], "msg": f"must lie in [1, {limits.max_n}], got {req.n}"})
    if not 0 <= req.seed < 2 ** 63:
        errors.append({"loc": ["seed"], "msg": "must lie in [0, 2^63)"})
    if errors:
        raise validation_error(errors)
    return req


def parse_score_request(data: Any, limits: Limits) -> ScoreRequest:
    req = _pydantic(ScoreRequest, data)
    errors: list[dict] = []
    _check_common(errors, req.items, limits)
    if len(req.items) <= limits.max_items:
        for i, it in enumerate(req.items):
            _check_text(errors, ["items", i, "definition"], it.definition, limits.max_definition_chars,
                        required=False, allow_newlines=True)
            refs = references_of(it)
            if refs is not None:
                if len(refs) > limits.max_references:
                    errors.append({"loc": ["items", i, "reference"],
                                   "msg": f"holds {len(refs)} references; the limit is {limits.max_references}"})
                for j, r in enumerate(refs):
                    _check_text(errors, ["items", i, "reference", j] if isinstance(it.reference, list) else
                                ["items", i, "reference"], r, limits.max_definition_chars, required=True,
                                allow_newlines=True)
    if errors:
        raise validation_error(errors)
    return req


def references_of(item: ScoreItem) -> Optional[list[str]]:
    if item.reference is None:
        return None
    return [item.reference] if isinstance(item.reference, str) else list(item.reference)


def item_prompt(item: DefinitionItem | ScoreItem, templates=None) -> str:
    """The model's prompt for an item: the served model's ``templates`` (:func:`lm_lexicon.data.prompts.format_prompt`;
    None: the defaults) on the stripped term and context."""
    return format_prompt(item.term.strip(), (item.context or "").strip(), item.lang, templates=templates)


def openapi_request_bodies() -> dict[str, type[BaseModel]]:
    """``path -> request model`` for the POST endpoints (their bodies are parsed by hand, see module docstring)."""
    return {"/v1/definitions": DefinitionsRequest, "/v1/score": ScoreRequest}
