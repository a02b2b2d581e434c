"""Prompt templates: the one place where a record becomes the text a model is conditioned on.

Training (:func:`lm_lexicon.sft.record_prompt`), the partition's prompt embeddings, retrieval and ICL baselines
(:func:`lm_lexicon.baselines.prompt_of`), generation and serving all call :func:`format_prompt` with
``(term, context, lang)``, so a record gets the same prompt everywhere.

Defaults (shared/DESIGN.md §2):

* English: the paper's template (after Giulianelli et al. 2023), context first --
  ``"{context}" What is the definition of "{term}"?`` -- and ``What is the definition of "{term}"?`` for a
  term-only row (empty context).
* Every other language: the multilingual paper's template, ``Define the {language} word '{term}'. Use only
  {language} to reply.``, where ``{language}`` is the English name of the language (Spanish, French, ...). It has no
  context slot (the multilingual dictionaries are term-only); a context, if a row has one, is not shown.

A recipe can replace the template of any language (``data.prompt_templates`` in the config, validated by
:func:`parse_templates`)::

    data:
      prompt_templates:
        es: "Define la palabra '{term}'. Responde solo en español."     # every Spanish row
        en:                                                             # rows with / without a context
          context: 'Context: {context}. Define "{term}".'
          term_only: "Define the {language} word '{term}'. Use only {language} to reply."

A template is ``str.format`` text with the fields ``{term}`` (required), ``{context}`` and ``{language}`` (literal
braces: ``{{`` ``}}``). A plain string is used for every row of the language, except that a template with
``{context}`` is used only for rows that have a context: a term-only row then gets the language's ``term_only``
template (the default one unless given). A ``term_only`` template may not contain ``{context}``.

Which templates are in force: the ``templates`` argument of :func:`format_prompt`, else the process-wide ones set by
:func:`set_prompt_templates` / :func:`configure_prompts` (a stage calls it with its config), else the ones in the
environment variable ``LM_LEXICON_PROMPT_TEMPLATES`` (JSON; :func:`set_prompt_templates` sets it, so processes
started afterwards -- e.g. the workers of a Ray cluster started locally later -- inherit the templates), else the
defaults. A process that builds prompts for a run with custom templates must call :func:`configure_prompts` with the
run's config; with the default templates nothing needs to be done.
"""
from __future__ import annotations

import json
import os
import string
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "fr": "French", "pt": "Portuguese", "de": "German",
                  "it": "Italian", "nl": "Dutch"}

DEFAULT_TEMPLATE = '"{context}" What is the definition of "{term}"?'
TERM_ONLY_TEMPLATE = 'What is the definition of "{term}"?'
MULTILINGUAL_TEMPLATE = "Define the {language} word '{term}'. Use only {language} to reply."

#: Fields a template may use.
FIELDS = ("term", "context", "language")
#: Environment variable carrying non-default templates to processes started later (JSON of the config mapping).
ENV_VAR = "LM_LEXICON_PROMPT_TEMPLATES"


@dataclass(frozen=True)
class LanguageTemplate:
    """The templates of one language: for rows with a context, and for term-only rows."""

    context: str
    term_only: str

    def format(self, term: str, context: str, language: str) -> str:
        template = self.context if context else self.term_only
        return template.format(term=term, context=context, language=language)


def _default(lang: str) -> LanguageTemplate:
    if lang == "en":
        return LanguageTemplate(DEFAULT_TEMPLATE, TERM_ONLY_TEMPLATE)
    return LanguageTemplate(MULTILINGUAL_TEMPLATE, MULTILINGUAL_TEMPLATE)


#: The built-in templates per language.
DEFAULT_TEMPLATES: dict[str, LanguageTemplate] = {lang: _default(lang) for lang in LANGUAGE_NAMES}


class PromptTemplates:
    """Templates for every language: the defaults with some languages replaced (immutable, comparable)."""

    def __init__(self, overrides: Optional[Mapping[str, LanguageTemplate]] = None):
        self._by_lang = {**DEFAULT_TEMPLATES, **dict(overrides or {})}
        self.overrides = {k: v for k, v in (overrides or {}).items() if v != DEFAULT_TEMPLATES.get(k)}

    def for_lang(self, lang: str) -> LanguageTemplate:
        try:
            return self._by_lang[lang]
        except KeyError:
            raise ValueError(f"unknown language code {lang!r}; known: {sorted(LANGUAGE_NAMES)}") from None

    def format(self, term: str, context: str = "", lang: str = "en") -> str:
        return self.for_lang(lang).format(term, context, LANGUAGE_NAMES[lang])

    def to_config(self) -> dict[str, dict[str, str]]:
        """The overrides as a ``data.prompt_templates`` mapping (empty for the defaults)."""
        return {k: {"context": v.context, "term_only": v.term_only} for k, v in sorted(self.overrides.items())}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PromptTemplates) and self._by_lang == other._by_lang

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._by_lang.items())))

    def __repr__(self) -> str:
        return f"PromptTemplates({self.to_config()!r})"


def _check_template(template: Any, where: str, allow_context: bool = True) -> str:
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{where}: a template must be a non-empty string, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{where}: not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            raise ValueError(f"{where}: unknown field {{{name}}} in {template!r}; allowed: "
                             + ", ".join("{" + f + "}" for f in FIELDS))
        if spec or conversion:
            raise ValueError(f"{where}: field {{{name}}} must be plain (no format spec or conversion)")
        names.append(name)
    if "term" not in names:
        raise ValueError(f"{where}: the template must contain {{term}}, got {template!r}")
    if not allow_context and "context" in names:
        raise ValueError(f"{where}: a term_only template cannot contain {{context}}")
    return template


def parse_templates(spec: Optional[Mapping[str, Any]]) -> PromptTemplates:
    """Validate a ``data.prompt_templates`` mapping (``{lang: template | {context, term_only}}``).

    Unknown language codes, templates without ``{term}``, unknown fields and a ``term_only`` template with
    ``{context}`` are ValueErrors that name the entry.
    """
    if spec is None:
        return PromptTemplates()
    if isinstance(spec, PromptTemplates):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"prompt templates must map language codes to templates, got {type(spec).__name__}")
    out: dict[str, LanguageTemplate] = {}
    for lang, value in spec.items():
        if lang not in LANGUAGE_NAMES:
            raise ValueError(f"unknown language code {lang!r} in prompt templates; known: "
                             + ", ".join(sorted(LANGUAGE_NAMES)))
        default = DEFAULT_TEMPLATES[lang]
        if isinstance(value, LanguageTemplate):
            value = {"context": value.context, "term_only": value.term_only}
        if isinstance(value, str):
            _check_template(value, lang)
            uses_context = "context" in {f for _, f, _, _ in string.Formatter().parse(value) if f}
            out[lang] = LanguageTemplate(value, default.term_only if uses_context else value)
        elif isinstance(value, Mapping):
            unknown = sorted(set(value) - {"context", "term_only"})
            if unknown or not value:
                raise ValueError(f"{lang}: a template mapping takes the keys 'context' and/or 'term_only', "
                                 f"got {sorted(value)}")
            context = _check_template(value["context"], f"{lang}.context") if "context" in value else default.context
            term_only = (_check_template(value["term_only"], f"{lang}.term_only", allow_context=False)
                         if "term_only" in value else default.term_only)
            out[lang] = LanguageTemplate(context, term_only)
        else:
            raise ValueError(f"{lang}: a template is a string or a mapping with 'context' / 'term_only', "
                             f"got {type(value).__name__}")
    return PromptTemplates(out)


# ------------------------------------------------------------------------------------------------------------------
# The templates in force in this process

_ACTIVE: Optional[PromptTemplates] = None
_FROM_ENV: tuple[Optional[str], PromptTemplates] = (None, PromptTemplates())


def active_templates() -> PromptTemplates:
    """The templates :func:`format_prompt` uses when none are passed (see the module docstring)."""
    global _FROM_ENV
    if _ACTIVE is not None:
        return _ACTIVE
    raw = os.environ.get(ENV_VAR) or None
    if raw != _FROM_ENV[0]:
        try:
            templates = parse_templates(json.loads(raw)) if raw else PromptTemplates()
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"environment variable {ENV_VAR} does not hold valid prompt templates: {e}") from None
        _FROM_ENV = (raw, templates)
    return _FROM_ENV[1]


def set_prompt_templates(spec: Optional[Mapping[str, Any] | PromptTemplates]) -> PromptTemplates:
    """Make ``spec`` (a ``data.prompt_templates`` mapping; None: the defaults) the templates of this process and of
    processes it starts from now on (environment variable). Returns the templates in force before."""
    global _ACTIVE
    previous = active_templates()
    templates = parse_templates(spec)
    _ACTIVE = templates
    if templates.overrides:
        os.environ[ENV_VAR] = json.dumps(templates.to_config(), ensure_ascii=False, sort_keys=True)
    else:
        os.environ.pop(ENV_VAR, None)
    return previous


def configure_prompts(cfg: Any) -> PromptTemplates:
    """:func:`set_prompt_templates` from a ``PipelineConfig`` or a ``DataConfig`` (its ``prompt_templates``)."""
    data = getattr(cfg, "data", cfg)
    return set_prompt_templates(getattr(data, "prompt_templates", None) or None)


@contextmanager
def prompt_templates(spec: Any) -> Iterator[PromptTemplates]:
    """``with prompt_templates(cfg_or_mapping):`` -- the templates in force inside the block, restored after."""
    global _ACTIVE
    data = getattr(spec, "data", spec)
    mapping = getattr(data, "prompt_templates", data)
    saved = (_ACTIVE, os.environ.get(ENV_VAR))
    set_prompt_templates(mapping or None)
    try:
        yield active_templates()
    finally:
        _ACTIVE = saved[0]
        if saved[1] is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved[1]


def format_prompt(term: str, context: str = "", lang: str = "en", *,
                  templates: Optional[PromptTemplates | Mapping[str, Any]] = None) -> str:
    """The prompt the model is conditioned on; the definition (and EOS) follows it in training.

    ``templates``: a :class:`PromptTemplates` or a ``data.prompt_templates`` mapping (None: the templates in force,
    :func:`active_templates`). An empty context selects the language's term-only template.
    """
    if not isinstance(term, str) or not term.strip():
        raise ValueError("term must be a non-empty string")
    if lang not in LANGUAGE_NAMES:
        raise ValueError(f"unknown language code {lang!r}; known: {sorted(LANGUAGE_NAMES)}")
    chosen = active_templates() if templates is None else parse_templates(templates)
    return chosen.format(term, context or "", lang)


def record_prompt(record: Any, templates: Optional[PromptTemplates | Mapping[str, Any]] = None) -> str:
    """:func:`format_prompt` of a :class:`~lm_lexicon.data.records.Record` (or a dict with its fields)."""
    get = record.get if isinstance(record, Mapping) else lambda k, d=None: getattr(record, k, d)
    return format_prompt(get("term"), get("context") or "", get("lang") or "en", templates=templates)
