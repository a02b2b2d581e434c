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

The config class lives in :mod:`.hf_config` (cheap: it needs only what ``configuration_auto`` already imported),
the model class in :mod:`.model`; this module wires both to the Auto classes.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys
import threading

from lm_lexicon.moe import hf_config

log = logging.getLogger(__name__)

_TRIGGER = "transformers.models.auto.configuration_auto"

_lock = threading.RLock()
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
        hf_config.when_built(register_model)
        if hf_config.registered():
            return
        if _TRIGGER in sys.modules:
            hf_config.register_config()
            return
        if _hook is None or _hook not in sys.meta_path:
            _hook = _AfterImportFinder(_TRIGGER, hf_config.register_config)
            sys.meta_path.insert(0, _hook)


# =================================================================================================== model class
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

            AutoModelForCausalLM.register(hf_config.register_config(), LexiconMoEForCausalLM, exist_ok=True)
        except BaseException:
            _model_registered = False
            raise
