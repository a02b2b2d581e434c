"""The ``lm_lexicon_moe`` model type's config class, ``LexiconMoEConfig``, and the names of its config section.

The class is defined on first use (importing this module imports no transformers, see :mod:`.hf_registration`).
Building a config runs the callbacks given to :func:`when_built`: that is how :mod:`.hf_registration` registers the
model class (:mod:`.model`) the moment a config exists, without this module importing the model.

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

import threading
from typing import Callable

MODEL_TYPE = "lm_lexicon_moe"
SECTION = "lm_lexicon_moe"
ARCHITECTURE = "LexiconMoEForCausalLM"
ROUTING_POLICIES = ("domain", "token", "soft-sequence", "hard-sequence")

_lock = threading.RLock()
_config_class = None
_when_built: list[Callable[[], None]] = []


def when_built(callback: Callable[[], None]) -> None:
    """Run ``callback`` whenever a ``LexiconMoEConfig`` is built (it must be idempotent and cheap after the first
    call). Adding the same callback twice keeps one."""
    with _lock:
        if callback not in _when_built:
            _when_built.append(callback)


def _built() -> None:
    for callback in list(_when_built):
        callback()


def registered() -> bool:
    """Whether ``LexiconMoEConfig`` is defined and registered with ``AutoConfig`` yet."""
    return _config_class is not None


def _define_config_class():
    from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
    from transformers.models.auto.configuration_auto import AutoConfig

    class LexiconMoEConfig(PreTrainedConfig):
        """An LM-Lexicon MoE: the experts' architecture (``text_config``) + how it was merged and how it routes
        (the ``lm_lexicon_moe`` section; see the module docstring of :mod:`lm_lexicon.moe.hf_config`)."""

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
            _built()  # hf_registration registers the model class here: whoever builds this config wants it next

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
        return _config_class


def __getattr__(name):  # `from lm_lexicon.moe.hf_config import LexiconMoEConfig`
    if name == "LexiconMoEConfig":
        return register_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
