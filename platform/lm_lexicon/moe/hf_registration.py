"""Teach transformers' Auto classes the ``lm_lexicon_moe`` model type, without making ``import lm_lexicon`` slow.

Why a hook: registering needs a ``PreTrainedConfig`` subclass, and importing ``transformers.configuration_utils``
imports torch (about 2.7 s here). ``import lm_lexicon`` must stay instant (Ray workers, the CLI's ``--help``), so
:func:`install` only puts a tiny finder on ``sys.meta_path`` that waits for
``transformers.models.auto.configuration_auto`` — the module that defines ``AutoConfig`` and that every Auto class
imports — and registers the config class the moment that module has finished executing. If it is already imported,
registration happens at once. Either way, ``AutoConfig.from_pretrained(moe_dir)`` and
``AutoModelForCausalLM.from_pretrained(moe_dir)`` then find the MoE, never silently a dense model.

The model class (torch, ``transformers.modeling_utils``: another ~2.3 s) is registered later still: when a
:class:`LexiconMoEConfig` is first constructed — which ``AutoModelForCausalLM.from_pretrained`` does before it
looks the model class up. A process that only tokenizes never pays for it.

This module holds the config class (cheap: it needs only what ``configuration_auto`` already imported); the model
class lives in :mod:`lm_lexicon.moe.model`.

Config layout (``config.json``)::

    {"model_type": "lm_lexicon_moe",
     "architectures": ["LexiconMoEForCausalLM"],
     "text_config": {...the experts' own config: "model_type": "llama", hidden_size, ...},
     "lm_lexicon_moe": {"n_experts": 4, "routing": "domain", "top_k": 2, "aux_loss_coef": 0.01,
                        "ffn_spec": "llama", "router_dir": "router", "centroids_file": "router/router.safetensors",
                        "embedder": {...}, "seed": 0, "gate_init": "centroids", "experts": [...], ...}}

The base architecture sits under ``text_config`` (not inside the ``lm_lexicon_moe`` section) because that is where
transformers looks for a composite model's language-model config: generation builds its KV cache from
``config.get_text_config()``, and the attention implementation and dtype propagate to it.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys
import threading

log = logging.getLogger(__name__)

MODEL_TYPE = "lm_lexicon_moe"
SECTION = "lm_lexicon_moe"
ARCHITECTURE = "LexiconMoEForCausalLM"
ROUTING_POLICIES = ("domain", "token", "soft-sequence", "hard-sequence")
_TRIGGER = "transformers.models.auto.configuration_auto"

_lock = threading.RLock()
_config_class = None
_model_registered = False
_hook = None


# =================================================================================================== lazy hook
class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``target`` is imported, runs ``callback`` right after the module has executed."""

    def __init__(self, target: str, callback):
        self.target = target
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module
        callback, finder_self = self.callback, self

        def exec_module(module):
            original_exec(module)
            _remove_hook(finder_self)
            try:
                callback()
            except Exception as e:  # never break the user's `import transformers` because of us
                log.warning("lm_lexicon could not register the MoE with transformers: %s: %s", type(e).__name__, e)

        spec.loader.exec_module = exec_module  # a fresh loader per find_spec: patching this instance is local
        return spec


def _remove_hook(finder) -> None:
    try:
        sys.meta_path.remove(finder)
    except ValueError:
        pass


def install() -> None:
    """Register the ``lm_lexicon_moe`` config with ``AutoConfig`` now if transformers' Auto classes are loaded,
    else as soon as they are. Idempotent; costs nothing measurable at call time."""
    global _hook
    with _lock:
        if _config_class is not None:
            return
        if _TRIGGER in sys.modules:
            register_config()
            return
        if _hook is None or _hook not in sys.meta_path:
            _hook = _AfterImportFinder(_TRIGGER, register_config)
            sys.meta_path.insert(0, _hook)


# =================================================================================================== config class
def _define_config_class():
    from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
    from transformers.models.auto.configuration_auto import AutoConfig

    class LexiconMoEConfig(PreTrainedConfig):
        """An LM-Lexicon MoE: the experts' architecture (``text_config``) + how it was merged and how it routes
        (the ``lm_lexicon_moe`` section; see the module docstring of :mod:`lm_lexicon.moe.hf_registration`)."""

        model_type = MODEL_TYPE
        sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

        text_config: dict | PreTrainedConfig | None = None
        lm_lexicon_moe: dict | None = None

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            section = dict(self.lm_lexicon_moe or {})
            section.setdefault("n_experts", 2)
            section.setdefault("routing", "domain")
            section.setdefault("top_k", 2)
            section.setdefault("aux_loss_coef", 0.01)
            if section.get("ffn_spec") is None:
                from lm_lexicon.moe.ffn_spec import spec_for_config

                section["ffn_spec"] = spec_for_config(self.text_config).name
            _validate_section(section)
            self.lm_lexicon_moe = section
            # Tied embeddings are a property of the experts' architecture; mirror it so that transformers' tying
            # logic, which reads the top-level config, agrees with the language model inside.
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
            register_model()  # the first time anyone builds this config, they are about to want the model class

        # Read-only views of the section, so code says ``config.routing`` rather than indexing a dict.
        @property
        def n_experts(self) -> int:
            return int(self.lm_lexicon_moe["n_experts"])

        @property
        def routing(self) -> str:
            return str(self.lm_lexicon_moe["routing"])

        @property
        def num_experts_per_tok(self) -> int:
            """``top_k`` of token routing (named like Mixtral's field: a config attribute called ``top_k`` would
            be mistaken by ``generate`` for a sampling parameter)."""
            return int(self.lm_lexicon_moe["top_k"])

        @property
        def aux_loss_coef(self) -> float:
            return float(self.lm_lexicon_moe["aux_loss_coef"])

        @property
        def ffn_spec(self) -> str:
            return str(self.lm_lexicon_moe["ffn_spec"])

    # Defined in a function (so that merely importing this module imports no transformers), but named as if at
    # module level: pickle (Ray ships configs between processes) resolves it through this module's __getattr__.
    LexiconMoEConfig.__module__ = __name__
    LexiconMoEConfig.__qualname__ = "LexiconMoEConfig"
    return LexiconMoEConfig


def _validate_section(section: dict) -> None:
    n = section["n_experts"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{SECTION}.n_experts must be a positive integer, got {n!r}")
    if section["routing"] not in ROUTING_POLICIES:
        raise ValueError(f"{SECTION}.routing must be one of {ROUTING_POLICIES}, got {section['routing']!r}")
    k = section["top_k"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{SECTION}.top_k must be a positive integer, got {k!r}")
    if float(section["aux_loss_coef"]) < 0:
        raise ValueError(f"{SECTION}.aux_loss_coef must be >= 0, got {section['aux_loss_coef']!r}")


def config_class():
    """The ``LexiconMoEConfig`` class (registering it with ``AutoConfig`` on first use)."""
    return register_config()


def register_config():
    """Define and register ``LexiconMoEConfig`` with ``AutoConfig``; return it. Idempotent."""
    global _config_class
    with _lock:
        if _config_class is None:
            from transformers import AutoConfig

            cls = _define_config_class()
            AutoConfig.register(MODEL_TYPE, cls, exist_ok=True)
            _config_class = cls
            _remove_hook(_hook)
        return _config_class


def register_model() -> None:
    """Register ``LexiconMoEForCausalLM`` with ``AutoModelForCausalLM`` (imports torch + transformers modeling)."""
    global _model_registered
    with _lock:
        if _model_registered:
            return
        _model_registered = True  # set first: importing the model module builds no config, but be safe on re-entry
        try:
            from transformers import AutoModelForCausalLM

            from lm_lexicon.moe.model import LexiconMoEForCausalLM

            AutoModelForCausalLM.register(register_config(), LexiconMoEForCausalLM, exist_ok=True)
        except BaseException:
            _model_registered = False
            raise


def __getattr__(name):  # `from lm_lexicon.moe.hf_registration import LexiconMoEConfig`
    if name == "LexiconMoEConfig":
        return register_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
