"""Where the feed-forward network (FFN) sits in each model family: the one thing the MoE conversion must know.

Split-then-Merge turns each layer's FFN into ``N`` experts and averages everything else (paper §3.3). Which tensors
are "the FFN" differs by family, so each family gets an :class:`FFNSpec`:

=========  ==========================  ==============  ====================================================
spec       decoder layers              MoE slot        FFN tensors (layer-relative)
=========  ==========================  ==============  ====================================================
``llama``  ``model.layers.{l}``        ``mlp``         ``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj``
           (Llama, Mistral, Qwen2/3)                   — SwiGLU: ``down(act(gate(x)) * up(x))``
``bert``   ``bert.encoder.layer.{l}``  ``intermediate``  ``intermediate.dense``, ``output.dense``
           (``BertLMHeadModel`` decoder)               — ``output.dense(act(intermediate.dense(x)))``
=========  ==========================  ==============  ====================================================

BERT needs care: ``BertOutput`` is ``LayerNorm(dropout(dense(h)) + residual)``. Only ``dense`` belongs to the
expert; the LayerNorm (and the residual) must stay shared, i.e. averaged like attention. So the MoE block takes
the place of ``intermediate`` and returns hidden-size vectors, and ``output.dense`` becomes an identity: BertOutput
then applies the shared dropout, residual and LayerNorm to the mixture, exactly as the dense layer did.

Key names (used by merge, load and export, without building a model)::

    dense expert file     model.layers.3.mlp.gate_proj.weight
    MoE checkpoint        lm.model.layers.3.mlp.experts.{i}.gate_proj.weight     (i = 0..N-1)
                          lm.model.layers.3.mlp.gate.weight                      [N, hidden] router gate
    BERT                  bert.encoder.layer.3.output.dense.weight
                       -> lm.bert.encoder.layer.3.intermediate.experts.{i}.output.dense.weight

``lm.`` is the attribute under which :class:`~lm_lexicon.moe.model.LexiconMoEForCausalLM` holds the family's own
``*ForCausalLM`` (whose FFNs were swapped for MoE blocks): every shared tensor keeps its dense name behind it.

Importing this module costs only torch (already loaded wherever a config or model is built).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn

MOE_PREFIX = "lm."  # attribute of LexiconMoEForCausalLM that holds the family's causal LM


@dataclass(frozen=True)
class FFNSpec:
    """The FFN layout of one model family (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted path of the decoder-layer ModuleList inside the family's *ForCausalLM
    slot: str  # attribute of a decoder layer that the MoE block replaces
    # (layer-relative dense module path, module path inside one expert), one pair per FFN projection
    modules: tuple[tuple[str, str], ...]

    # ---- key names (pure strings) ----
    def _dense_pattern(self) -> re.Pattern:
        alternatives = "|".join(re.escape(dense) for dense, _ in self.modules)
        return re.compile(rf"^{re.escape(self.layers_path)}\.(\d+)\.({alternatives})\.(weight|bias)$")

    def parse_dense_key(self, key: str) -> Optional[tuple[int, str]]:
        """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "up_proj.weight")`` (layer, expert-relative name);
        None for a tensor that is not part of an FFN (it will be averaged)."""
        m = self._dense_pattern().match(key)
        if m is None:
            return None
        expert_module = dict(self.modules)[m.group(2)]
        return int(m.group(1)), f"{expert_module}.{m.group(3)}"

    def dense_key(self, layer: int, expert_rel: str) -> str:
        """Inverse of :meth:`parse_dense_key`: the dense checkpoint name of one expert tensor."""
        module, _, leaf = expert_rel.rpartition(".")
        dense_module = {e: d for d, e in self.modules}[module]
        return f"{self.layers_path}.{layer}.{dense_module}.{leaf}"

    def expert_key(self, layer: int, expert: int, expert_rel: str) -> str:
        """MoE checkpoint name (with the ``lm.`` prefix) of expert ``expert``'s tensor ``expert_rel``."""
        return f"{MOE_PREFIX}{self.layers_path}.{layer}.{self.slot}.experts.{expert}.{expert_rel}"

    def gate_key(self, layer: int) -> str:
        """MoE checkpoint name of layer ``layer``'s router gate weight ``[N, hidden]``."""
        return f"{MOE_PREFIX}{self.layers_path}.{layer}.{self.slot}.gate.weight"

    def parse_moe_key(self, key: str) -> tuple[str, Any]:
        """Classify an MoE checkpoint key: ``("expert", (layer, i, rel))``, ``("gate", layer)`` or
        ``("shared", dense_key)``."""
        if not key.startswith(MOE_PREFIX):
            raise ValueError(f"{key!r} is not an lm_lexicon MoE tensor name (no {MOE_PREFIX!r} prefix)")
        rest = key[len(MOE_PREFIX):]
        stem = re.escape(f"{self.layers_path}.") + r"(\d+)" + re.escape(f".{self.slot}.")
        m = re.match(stem + r"experts\.(\d+)\.(.+)$", rest)
        if m:
            return "expert", (int(m.group(1)), int(m.group(2)), m.group(3))
        m = re.match(stem + r"gate\.weight$", rest)
        if m:
            return "gate", int(m.group(1))
        return "shared", rest

    def expert_rel_names(self, bias: bool) -> list[str]:
        """Expert-relative tensor names of one expert (``gate_proj.weight``, ...)."""
        leaves = ("weight", "bias") if bias else ("weight",)
        return [f"{e}.{leaf}" for _, e in self.modules for leaf in leaves]

    # ---- module surgery (torch) ----
    def decoder_layers(self, causal_lm) -> Any:
        """The ``ModuleList`` of decoder layers of a family ``*ForCausalLM``."""
        obj = causal_lm
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def take_ffn(self, layer) -> Any:
        """A standalone copy of the dense layer's FFN: one expert (maps hidden -> hidden)."""
        if self.name == "bert":
            return BertFeedForward(copy.deepcopy(layer.intermediate), copy.deepcopy(layer.output.dense))
        return copy.deepcopy(getattr(layer, self.slot))

    def install(self, layer, moe_block) -> None:
        """Put ``moe_block`` where the dense FFN was; for BERT also make ``output.dense`` an identity (the expert
        now does that projection) while ``output.LayerNorm`` and dropout stay shared."""
        setattr(layer, self.slot, moe_block)
        if self.name == "bert":
            layer.output.dense = nn.Identity()


LLAMA = FFNSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers_path="model.layers",
    slot="mlp",
    modules=(("mlp.gate_proj", "gate_proj"), ("mlp.up_proj", "up_proj"), ("mlp.down_proj", "down_proj")),
)

BERT = FFNSpec(
    name="bert",
    model_types=("bert",),
    layers_path="bert.encoder.layer",
    slot="intermediate",
    modules=(("intermediate.dense", "intermediate.dense"), ("output.dense", "output.dense")),
)

SPECS: dict[str, FFNSpec] = {s.name: s for s in (LLAMA, BERT)}


def get_spec(name: str) -> FFNSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown FFN spec {name!r}; known: {sorted(SPECS)}") from None


def spec_for_config(config: Any) -> FFNSpec:
    """The spec of a model config (a transformers config object or its ``config.json`` dict).

    BERT qualifies only as a causal decoder (``is_decoder=True``, the MiniLM seed): an encoder is not a causal LM.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    model_type = get("model_type")
    for spec in SPECS.values():
        if model_type in spec.model_types:
            if spec.name == "bert" and not get("is_decoder", False):
                raise ValueError("a BERT checkpoint can become an MoE only as a causal decoder (is_decoder=True, "
                                 "BertLMHeadModel); this one is an encoder")
            return spec
    supported = sorted(t for s in SPECS.values() for t in s.model_types)
    raise ValueError(f"no FFN spec for model_type {model_type!r}; supported: {supported}. Add an FFNSpec in "
                     "lm_lexicon/moe/ffn_spec.py naming the family's decoder layers and FFN projections.")


def has_ffn_bias(spec: FFNSpec, config: Any) -> bool:
    """Whether the family's FFN projections carry biases (BERT: yes; Llama: only with ``mlp_bias``)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return spec.name == "bert" or bool(get("mlp_bias", False))


class _OutputProjection(nn.Module):
    """Holds BERT's ``output.dense`` under the same name, so expert tensor names read like the dense ones."""

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.dense = dense


class BertFeedForward(nn.Module):
    """BERT's FFN without the residual and LayerNorm (those stay shared): ``output.dense(act(intermediate.dense(x)))``."""

    def __init__(self, intermediate: nn.Module, output_dense: nn.Module):
        super().__init__()
        self.intermediate = intermediate  # BertIntermediate: dense [hidden -> intermediate] + activation
        self.output = _OutputProjection(output_dense)  # dense [intermediate -> hidden]

    def forward(self, hidden_states):  # [n, hidden] -> [n, hidden]
        return self.output.dense(self.intermediate(hidden_states))
