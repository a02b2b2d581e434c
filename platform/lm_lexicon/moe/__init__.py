"""LM-Lexicon mixture of experts: merge N domain experts into one sparse MoE, load it, route it, export it.

* :mod:`lm_lexicon.moe.model` — the MoE layer (four routing policies) and ``LexiconMoEForCausalLM``; :func:`load`.
* :mod:`lm_lexicon.moe.merge` — :func:`merge_experts`: experts' FFNs -> ``experts.{i}``, everything else averaged.
* :mod:`lm_lexicon.moe.export` — per-domain dense checkpoints (:func:`export_collapsed`) and Mixtral
  (:func:`export_mixtral`).
* :mod:`lm_lexicon.moe.ffn_spec` — where the FFN sits in each model family.
* :mod:`lm_lexicon.moe.hf_config` — the ``lm_lexicon_moe`` config class and its section's names.
* :mod:`lm_lexicon.moe.hf_registration` — ``AutoConfig``/``AutoModelForCausalLM`` registration (lazy).

Importing this package imports nothing heavy; the names below load their module on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "load": "lm_lexicon.moe.model",
    "LoadedMoE": "lm_lexicon.moe.model",
    "LexiconMoEForCausalLM": "lm_lexicon.moe.model",
    "MoEFeedForward": "lm_lexicon.moe.model",
    "moe_from_dense": "lm_lexicon.moe.model",
    "calibrate_gates": "lm_lexicon.moe.model",
    "load_balancing_loss": "lm_lexicon.moe.model",
    "merge_experts": "lm_lexicon.moe.merge",
    "ExpertMismatchError": "lm_lexicon.moe.merge",
    "export_collapsed": "lm_lexicon.moe.export",
    "export_mixtral": "lm_lexicon.moe.export",
    "LexiconMoEConfig": "lm_lexicon.moe.hf_config",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
