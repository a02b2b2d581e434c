"""Prompt templates. The paper (after Giulianelli et al. 2023) puts the context first, then asks for the term."""
from __future__ import annotations

LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "fr": "French", "pt": "Portuguese", "de": "German",
                  "it": "Italian", "nl": "Dutch"}

DEFAULT_TEMPLATE = '"{context}" What is the definition of "{term}"?'
TERM_ONLY_TEMPLATE = 'What is the definition of "{term}"?'
MULTILINGUAL_TEMPLATE = "Define the {language} word '{term}'. Use only {language} to reply."


def format_prompt(term: str, context: str = "", lang: str = "en", *, template: str | None = None,
                  multilingual_template: str | None = None) -> str:
    """The prompt the model is conditioned on; the definition (and EOS) follows it in training.

    English rows use the paper's template (term-only when the context is empty); other languages use the
    multilingual template, which names the language so the model is asked to answer in it.
    """
    if not term or not term.strip():
        raise ValueError("term must be a non-empty string")
    if lang != "en":
        if lang not in LANGUAGE_NAMES:
            raise ValueError(f"unknown language code {lang!r}; known: {sorted(LANGUAGE_NAMES)}")
        return (multilingual_template or MULTILINGUAL_TEMPLATE).format(language=LANGUAGE_NAMES[lang], term=term)
    if not context:
        return TERM_ONLY_TEMPLATE.format(term=term) if template is None else template.format(term=term, context="")
    return (template or DEFAULT_TEMPLATE).format(term=term, context=context)
