"""Export an MoE to formats that need no lm_lexicon code to load.

**Collapsed** (:func:`export_collapsed`, any family, any policy): under domain routing the MoE restricted to
domain i IS a dense model — the shared weights plus expert i's FFN. So each domain becomes a plain checkpoint of
the experts' own architecture (``LlamaForCausalLM``, ``BertLMHeadModel``) that transformers (or vLLM) loads as is,
and the centroid router picks the checkpoint per prompt::

    out/collapsed.json        {"format": "lm-lexicon-collapsed", "domains": [{"domain": 0, "path": "domain-0"}, ...],
                               "router_dir": "router", "embedder": {...}, "source": ...}
    out/router/               router.json (method, k, dim, embedder spec) + router.safetensors (centroids, biases)
    out/domain-{i}/           config.json, model.safetensors, tokenizer files, generation_config.json

Routing rule: embed the prompt with the recorded embedder, ``i = argmax_j cos(e, c_j) - b_j``
(:meth:`lm_lexicon.partition.routing.DomainRouter.route_prompts`), send the prompt to ``domain-{i}``. This is how
serving runs one deployment per domain (shared/DESIGN.md §3).

**Mixtral** (:func:`export_mixtral`, Llama/Mistral families, token routing): a ``MixtralForCausalLM`` checkpoint
in the hub layout of Mixtral-8x7B (``block_sparse_moe.gate``, ``block_sparse_moe.experts.{i}.w1/w2/w3``), which
transformers 4.x and 5.x (it converts this layout on load) and vLLM read. Mixtral's router is softmax over all
logits, top-k, renormalised — the same function as our softmax over the top-k logits.

Both stream tensors from the MoE's safetensors and write shard by shard (see :mod:`lm_lexicon.moe.merge`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

from lm_lexicon.data.prompts import PromptTemplates
from lm_lexicon.moe.ffn_spec import LLAMA, get_spec
from lm_lexicon.moe.hf_config import SECTION
from lm_lexicon.moe.merge import (
                                  DEFAULT_MAX_SHARD_SIZE,
                                  PlannedTensor,
                                  SafetensorsCheckpoint,
                                  atomic_directory,
                                  copy_tokenizer_files,
                                  write_sharded,
                                  )

COLLAPSED_FORMAT = "lm-lexicon-collapsed"
COLLAPSED_MANIFEST = "collapsed.json"
EXPORT_FORMAT = "lm_lexicon.moe.export/1"
MIXTRAL_FAMILIES = ("llama", "mistral")
# Llama's SwiGLU projections under Mixtral's names: w1 = gate, w2 = down, w3 = up.
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _read_moe(moe_dir: Path) -> tuple[dict, dict, SafetensorsCheckpoint]:
    from lm_lexicon.moe.model import read_moe_config

    raw = read_moe_config(moe_dir)
    return raw, raw[SECTION], SafetensorsCheckpoint(moe_dir)


def _classified(spec, ckpt: SafetensorsCheckpoint) -> list[tuple[str, str, object]]:
    """``(moe_key, kind, info)`` for every tensor, in checkpoint order (see :meth:`FFNSpec.parse_moe_key`)."""
    return [(key, *spec.parse_moe_key(key)) for key in ckpt.keys()]


def _reader(ckpt: SafetensorsCheckpoint, key: str):
    return lambda: ckpt.get(key)


# =================================================================================================== collapsed
def collapsed_plan(moe_dir: str | Path, domain: int) -> list[PlannedTensor]:
    """The tensors of domain ``domain``'s dense model: shared tensors under their dense names + expert ``domain``'s
    FFN renamed back (``...mlp.experts.{i}.up_proj.weight`` -> ``...mlp.up_proj.weight``); gates are dropped."""
    raw, section, ckpt = _read_moe(Path(moe_dir))
    spec = get_spec(section["ffn_spec"])
    n = int(section["n_experts"])
    if not 0 <= domain < n:
        raise ValueError(f"domain must lie in [0, {n}), got {domain}")
    plan = []
    for key, kind, info in _classified(spec, ckpt):
        if kind == "shared":
            plan.append(PlannedTensor(info, ckpt.shape(key), ckpt.dtype(key), _reader(ckpt, key)))
        elif kind == "expert":
            layer, expert, rel = info
            if expert == domain:
                plan.append(PlannedTensor(spec.dense_key(layer, rel), ckpt.shape(key), ckpt.dtype(key),
                                          _reader(ckpt, key)))
    return plan


def export_collapsed(moe_dir: str | Path, out_dir: str | Path, *, domains: Optional[Sequence[int]] = None,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write one dense checkpoint per domain (default: all) + the router + ``collapsed.json``; return ``out_dir``.

    Each ``domain-{i}`` directory is the experts' architecture with expert i's FFNs: ``AutoModelForCausalLM``
    loads it without lm_lexicon. The domain-routed MoE with label i and ``domain-{i}`` give the same logits. Each
    carries the MoE's prompt templates (``prompt_templates.json``).
    """
    moe_dir = Path(moe_dir)
    raw, section, _ = _read_moe(moe_dir)
    n = int(section["n_experts"])
    domains = list(range(n)) if domains is None else [int(d) for d in domains]
    text_config = dict(raw["text_config"])
    text_config.pop("_name_or_path", None)
    if raw.get("dtype") is not None:
        text_config["dtype"] = raw["dtype"]
    router_src = moe_dir / (section.get("router_dir") or "router")
    templates = PromptTemplates.load(moe_dir)
    entries = []
    with atomic_directory(out_dir, overwrite) as tmp:
        for d in domains:
            ddir = tmp / f"domain-{d}"
            ddir.mkdir()
            write_sharded(collapsed_plan(moe_dir, d), ddir, max_shard_size, metadata={"lm_lexicon": EXPORT_FORMAT})
            (ddir / "config.json").write_text(json.dumps(text_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            copy_tokenizer_files(moe_dir, ddir)
            templates.save(ddir)
            entries.append({"domain": d, "path": ddir.name})
        has_router = (router_src / "router.json").is_file()
        if has_router:
            shutil.copytree(router_src, tmp / "router")
        manifest = {
            "format": COLLAPSED_FORMAT, "version": 1, "n_domains": n, "domains": entries,
            "router_dir": "router" if has_router else None,
            "embedder": section.get("embedder"),
            "routing_rule": "domain = argmax_j cos(embed(prompt), centroid_j) - bias_j "
                            "(lm_lexicon.partition.routing.DomainRouter.route_prompts); load domains[domain].path",
            "source": str(moe_dir.resolve()), "source_routing": section.get("routing"), "seed": section.get("seed"),
            "exported_with": EXPORT_FORMAT,
        }
        (tmp / COLLAPSED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


# =================================================================================================== mixtral
def mixtral_incompatibility(text_config: dict) -> Optional[str]:
    """Why a dense architecture cannot be expressed as Mixtral (None if it can)."""
    model_type = text_config.get("model_type")
    if model_type not in MIXTRAL_FAMILIES:
        return f"model_type {model_type!r} is not one of {MIXTRAL_FAMILIES}"
    if text_config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {text_config.get('hidden_act')!r} (Mixtral experts are SiLU-gated)"
    if text_config.get("mlp_bias"):
        return "mlp_bias=True (Mixtral experts have no biases)"
    if text_config.get("attention_bias"):
        return "attention_bias=True (Mixtral attention has no biases)"
    return None


def export_mixtral(moe_dir: str | Path, out_dir: str | Path, *, force_policy: bool = False,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write the MoE as a ``MixtralForCausalLM`` checkpoint; return ``out_dir``.

    Requires a Llama/Mistral-family MoE routed by ``token`` (Mixtral knows only learned top-k token routing);
    ``force_policy=True`` exports another policy's gates anyway (meaningful only if they were trained).
    ``router_aux_loss_coef`` is our coefficient divided by k: Mixtral's balance loss counts the k slots of each
    token, k times ours for the same routing.
    """
    from transformers import MixtralConfig

    moe_dir = Path(moe_dir)
    raw, section, ckpt = _read_moe(moe_dir)
    spec = get_spec(section["ffn_spec"])
    text = dict(raw["text_config"])
    why = mixtral_incompatibility(text) if spec is LLAMA else f"FFN spec {spec.name!r} is not SwiGLU"
    if why:
        raise ValueError(f"{moe_dir}: cannot export as Mixtral: {why}. Use export_collapsed() instead.")
    if section["routing"] != "token" and not force_policy:
        raise ValueError(f"{moe_dir} routes by {section['routing']!r}; Mixtral routes tokens by a learned top-k gate. "
                         "Export per-domain dense models with export_collapsed(), or pass force_policy=True.")
    n, top_k = int(section["n_experts"]), int(section["top_k"])
    config = MixtralConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        head_dim=text.get("head_dim"), hidden_act="silu",
        max_position_embeddings=text["max_position_embeddings"], initializer_range=text.get("initializer_range", 0.02),
        rms_norm_eps=text["rms_norm_eps"], use_cache=True, pad_token_id=text.get("pad_token_id"),
        bos_token_id=text.get("bos_token_id"), eos_token_id=text.get("eos_token_id"),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)), sliding_window=text.get("sliding_window"),
        attention_dropout=text.get("attention_dropout", 0.0), num_local_experts=n,
        num_experts_per_tok=min(top_k, n), router_aux_loss_coef=float(section["aux_loss_coef"]) / max(1, min(top_k, n)),
        router_jitter_noise=0.0, rope_parameters=text.get("rope_parameters"),
    )
    config.architectures = ["MixtralForCausalLM"]
    if raw.get("dtype") is not None:
        config.dtype = raw["dtype"]

    plan = []
    for key, kind, info in _classified(spec, ckpt):
        if kind == "shared":
            name = info
        elif kind == "gate":
            name = f"{spec.layers_path}.{info}.block_sparse_moe.gate.weight"
        else:
            layer, expert, rel = info
            module, _, leaf = rel.rpartition(".")
            name = f"{spec.layers_path}.{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL_NAMES[module]}.{leaf}"
        plan.append(PlannedTensor(name, ckpt.shape(key), ckpt.dtype(key), _reader(ckpt, key)))
    with atomic_directory(out_dir, overwrite) as tmp:
        write_sharded(plan, tmp, max_shard_size, metadata={"lm_lexicon": EXPORT_FORMAT})
        config.save_pretrained(str(tmp))
        copy_tokenizer_files(moe_dir, tmp)
        PromptTemplates.load(moe_dir).save(tmp)
    return Path(out_dir)
