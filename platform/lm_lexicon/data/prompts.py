"""Prompt templates: the one place where a record becomes the text a model is conditioned on.

Training, generation, the reward model, the partition's prompt embeddings and the retrieval and ICL baselines all
call :func:`record_prompt`, and serving :func:`format_prompt` (which it calls) with ``(term, context, lang,
templates=...)``, so a record gets the same prompt everywhere.

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

Which templates a model uses travels with the model: every model directory the pipeline writes (expert and dense
checkpoints, the merged and fine-tuned MoE, the collapsed and Mixtral exports, the GGUF bundle, the reward model, the
partition's router) holds ``prompt_templates.json`` (:meth:`PromptTemplates.save`), and whatever loads a model --
the MoE fine-tune, generation (:class:`lm_lexicon.evaluate.generate.DefinitionGenerator`), evaluation, serving -- reads
them from there (:meth:`PromptTemplates.load`). A directory without the file (an external checkpoint, a run from
before the file existed) uses the defaults. A stage that starts from something without templates (the seed model,
the raw data) takes them from the recipe (:meth:`PromptTemplates.from_config`). Prompt builders take the templates as
an argument; there is no process-wide state.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from lm_lexicon._util import atomic_write_text

LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "fr": "French", "pt": "Portuguese", "de": "German",
                  "it": "Italian", "nl": "Dutch"}

DEFAULT_TEMPLATE = '"{context}" What is the definition of "{term}"?'
TERM_ONLY_TEMPLATE = 'What is the definition of "{term}"?'
MULTILINGUAL_TEMPLATE = "Define the {language} word '{term}'. Use only {language} to reply."

#: Fields a template may use.
FIELDS = ("term", "context", "language")
#: The file beside a model's config.json that holds the templates it was trained with.
TEMPLATES_FILE = "prompt_templates.json"
TEMPLATES_FORMAT = "lm-lexicon-prompt-templates"


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

    @classmethod
    def from_config(cls, cfg: Any) -> "PromptTemplates":
        """The recipe's templates: ``data.prompt_templates`` of a ``PipelineConfig`` (or of a ``DataConfig``)."""
        data = getattr(cfg, "data", cfg)
        return parse_templates(getattr(data, "prompt_templates", None) or None)

    def save(self, model_dir: str | Path) -> Path:
        """Write ``prompt_templates.json`` into ``model_dir``: the overrides (what :meth:`load` reads) and, for a
        reader without this package, every language's templates in full."""
        path = Path(model_dir) / TEMPLATES_FILE
        doc = {"format": TEMPLATES_FORMAT, "version": 1, "overrides": self.to_config(),
               "templates": {lang: {"context": t.context, "term_only": t.term_only}
                             for lang, t in sorted(self._by_lang.items())},
               "fields": {"term": "the headword", "context": "the usage example (empty: the term_only template)",
                          "language": "the English name of the language"}}
        return atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> "PromptTemplates":
        """The templates saved with a model (:meth:`save`); the defaults when the directory has none (an external
        checkpoint, an older run). A file that is not valid is a ValueError naming it."""
        path = Path(model_dir) / TEMPLATES_FILE
        if not path.is_file():
            return cls()
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != TEMPLATES_FORMAT:
                raise ValueError(f"not an {TEMPLATES_FORMAT} file")
            return parse_templates(doc.get("overrides") or None)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: invalid prompt templates ({e})") from None

    @classmethod
    def agreed(cls, model_dirs: "list[str | Path]") -> "PromptTemplates":
        """The templates of models that must share them (experts merged into one MoE, the experts of one served
        pipeline); a ValueError naming the first that differs."""
        dirs = [Path(d) for d in model_dirs]
        if not dirs:
            return cls()
        first = cls.load(dirs[0])
        for d in dirs[1:]:
            other = cls.load(d)
            if other != first:
                raise ValueError(f"{d} was trained with other prompt templates than {dirs[0]} "
                                 f"({other.to_config() or 'the defaults'} vs {first.to_config() or 'the defaults'})")
        return first


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


def format_prompt(term: str, context: str = "", lang: str = "en", *,
                  templates: Optional[PromptTemplates | Mapping[str, Any]] = None) -> str:
    """The prompt the model is conditioned on; the definition (and EOS) follows it in training.

    ``templates``: a :class:`PromptTemplates` or a ``data.prompt_templates`` mapping (None: the defaults); a model's
    are :meth:`PromptTemplates.load` of its directory. An empty context selects the language's term-only template.
    """
    if not isinstance(term, str) or not term.strip():
        raise ValueError("term must be a non-empty string")
    if lang not in LANGUAGE_NAMES:
        raise ValueError(f"unknown language code {lang!r}; known: {sorted(LANGUAGE_NAMES)}")
    chosen = DEFAULTS if templates is None else parse_templates(templates)
    return chosen.format(term, context or "", lang)


def record_prompt(record: Any, templates: Optional[PromptTemplates | Mapping[str, Any]] = None) -> str:
    """:func:`format_prompt` of a :class:`~lm_lexicon.data.records.Record` (or a dict with its fields)."""
    get = record.get if isinstance(record, Mapping) else lambda k, d=None: getattr(record, k, d)
    return format_prompt(get("term"), get("context") or "", get("lang") or "en", templates=templates)


#: The built-in templates of every language.
DEFAULTS = PromptTemplates()
