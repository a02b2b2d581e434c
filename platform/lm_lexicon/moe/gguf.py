"""GGUF files of the per-domain experts, for llama.cpp, llama-cpp-python and Ollama (CPU inference).

A collapsed domain checkpoint (:func:`lm_lexicon.moe.export.export_collapsed`) is one plain ``LlamaForCausalLM``;
:func:`write_gguf` turns it into one GGUF file with the ``gguf`` package's writer, streaming one tensor at a time:

* tensors get llama.cpp's names (``gguf.get_tensor_name_map``: ``model.layers.3.mlp.up_proj.weight`` ->
  ``blk.3.ffn_up.weight``). ``q_proj`` / ``k_proj`` rows are reordered for llama.cpp's RoPE, which rotates adjacent
  pairs ``(2i, 2i+1)`` where Hugging Face rotates ``(i, i + d/2)`` (:func:`rope_rows_to_gguf`; transformers undoes
  it when it reads a GGUF). A tied LM head is not written: llama.cpp falls back to ``token_embd``, as transformers
  ties it on load;
* 2-D tensors in ``bf16`` (default: the experts are saved in bfloat16, so the file is exact), ``f16`` or ``f32``;
  1-D tensors (the RMSNorm gains) in f32, as llama.cpp's converter writes them;
* ``llama.*`` hyper-parameters come from the checkpoint's ``config.json``; the tokenizer (``tokenizer.ggml.*``) and
  the descriptive ``general.*`` fields are copied from a GGUF of the same base model -- the seed's own file when
  the seed came from one (``bundled-smollm2``). The copied vocabulary is checked token by token against the
  checkpoint's ``tokenizer.json``; BOS/EOS/PAD ids and ``add_bos_token`` are set from the checkpoint's tokenizer.

The experts are not chat models: they were trained on the raw prompt (``"{context}" What is the definition of
"{term}"?``), a space, the definition and ``<|im_end|>``. So the file's chat template is replaced by one that passes
the user's message through unchanged (:data:`RAW_CHAT_TEMPLATE`): a chat client must send the formatted prompt.

:func:`export_gguf` converts every domain of a collapsed export and writes the bundle users run (see
:mod:`lm_lexicon.moe.gguf_bundle`): ``domain-{i}.gguf``, an Ollama ``domain-{i}.Modelfile`` each, ``router/``,
``gguf.json`` and a README.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lm_lexicon.moe.merge import SafetensorsCheckpoint, read_config

GGUF_DTYPES = ("bf16", "f16", "f32")
#: Passes the conversation's user messages through unchanged: the experts were trained on the raw prompt.
RAW_CHAT_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}" \
                    "{% endif %}{% endfor %}"
# Fields of the metadata source never copied: the file's own layout, and what the checkpoint itself determines.
_NOT_COPIED_PREFIXES = ("GGUF.", "llama.", "general.architecture", "general.type", "general.file_type",
                        "general.quantization_version",
                        "tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")


class GGUFExportError(ValueError):
    """The checkpoint cannot be written as a llama.cpp GGUF file (architecture, tokenizer or values); says why."""


# =================================================================================================== layout
def _qtypes():
    from gguf import GGMLQuantizationType, LlamaFileType

    return {"bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
            "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
            "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32)}


def rope_rows_to_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of ``q_proj``/``k_proj`` from Hugging Face's RoPE layout (each head's rows
    ``[x_0..x_{d/2-1} | x_{d/2}..x_{d-1}]`` rotated as pairs ``(i, i + d/2)``) to llama.cpp's (pairs ``(2i, 2i+1)``):
    row ``i`` of the first half goes to ``2i``, row ``i`` of the second half to ``2i + 1``."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_rows_from_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`rope_rows_to_gguf`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_llama(config: dict) -> None:
    """Raise :class:`GGUFExportError` unless ``config`` is a Llama that llama.cpp's ``llama`` architecture runs."""
    problems = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type is {config.get('model_type')!r}, not 'llama'")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r} (llama.cpp's llama is SiLU-gated)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{flag}=True (llama.cpp's llama has no biases)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type')!r} (only unscaled RoPE is exported; use llama.cpp's "
                        "convert_hf_to_gguf.py for scaled RoPE)")
    if problems:
        raise GGUFExportError("cannot write a llama.cpp GGUF: " + "; ".join(problems))


def rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


@dataclass(frozen=True)
class GGUFTensor:
    """One checkpoint tensor as it is written: its GGUF name and the RoPE reordering it needs (heads or None)."""

    hf_name: str
    gguf_name: str
    rope_heads: Optional[int]


def tensor_plan(keys: list[str], config: dict) -> list[GGUFTensor]:
    """How each checkpoint tensor maps into the GGUF file (a tied ``lm_head.weight`` is left out)."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    n_layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)
    plan, unknown = [], []
    for key in keys:
        if key == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some checkpoints carry; llama.cpp recomputes it from rope.freq_base
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(key)
            continue
        rope = heads if key.endswith("self_attn.q_proj.weight") else kv_heads if key.endswith(
            "self_attn.k_proj.weight") else None
        plan.append(GGUFTensor(key, name, rope))
    if unknown:
        raise GGUFExportError(f"{len(unknown)} tensors have no llama.cpp name, e.g. {unknown[:3]}")
    return plan


def _encode(t: torch.Tensor, dtype: str, name: str) -> np.ndarray:
    """The tensor's bytes as the writer takes them: f32 for 1-D tensors, else ``dtype`` (bf16 as raw bytes)."""
    if t.ndim == 1 or dtype == "f32":
        return t.to(torch.float32).contiguous().numpy()
    if dtype == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    half = t.to(torch.float16)
    if not torch.isfinite(half).all():
        raise GGUFExportError(f"{name}: values beyond float16's range (|x| > 65504); export with dtype='bf16'")
    return half.contiguous().numpy()


# =================================================================================================== metadata
def _source_fields(source: Path) -> dict:
    """``{key: (value, vtype, sub_type)}`` of the metadata source's copied fields (see the module docstring)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith(_NOT_COPIED_PREFIXES) or not (key.startswith("tokenizer.") or key.startswith("general.")):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        fields[key] = (field.contents(), vtype, sub)
    if "tokenizer.ggml.tokens" not in fields:
        raise GGUFExportError(f"{source} has no tokenizer (tokenizer.ggml.tokens): cannot take the vocabulary from it")
    return fields


def _checkpoint_vocab(model_dir: Path) -> list[str]:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir}: no tokenizer.json to check the GGUF vocabulary against")
    vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        if i < len(tokens):
            tokens[i] = token
    return tokens


def check_vocabulary(source_tokens: list[str], model_dir: Path, vocab_size: int) -> None:
    """The metadata source's vocabulary must be the checkpoint's, id for id (a GGUF of another model would
    tokenise differently and silently produce nonsense)."""
    mine = _checkpoint_vocab(model_dir)
    if len(source_tokens) != vocab_size:
        raise GGUFExportError(f"the metadata source has {len(source_tokens)} tokens, the model's vocab_size is "
                              f"{vocab_size}: it is not a GGUF of the same base model")
    diff = [i for i, (a, b) in enumerate(zip(source_tokens, mine)) if a != b]
    if diff or len(mine) > len(source_tokens):
        i = diff[0] if diff else len(source_tokens)
        raise GGUFExportError(f"the metadata source's vocabulary differs from {model_dir / 'tokenizer.json'} at "
                              f"{len(diff) or 1} ids (first: id {i}); use a GGUF of the same base model")


def _special_ids(model_dir: Path, config: dict) -> dict:
    """BOS/EOS/PAD ids and whether the tokenizer puts BOS before a text, as the checkpoint's tokenizer does."""
    from transformers import AutoTokenizer

    from lm_lexicon.train import bos_ids

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id if tok.eos_token_id is not None else config.get(
        "eos_token_id"), "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    return {**{k: int(v) for k, v in ids.items() if v is not None}, "add_bos": bool(bos_ids(tok))}


def _write_metadata(writer, config: dict, source_fields: dict, special: dict, name: str, file_type: int) -> None:
    from gguf import GGUFValueType

    writer.add_type("model")
    writer.add_file_type(int(file_type))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    heads = int(config["num_attention_heads"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != int(config["hidden_size"]):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    for key, (value, vtype, sub) in source_fields.items():
        if key == "general.name":
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_key_value("general.name", name, GGUFValueType.STRING)
    for key, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if key in special:
            writer.add_key_value(f"tokenizer.ggml.{field}", special[key], GGUFValueType.UINT32)
    writer.add_key_value("tokenizer.ggml.add_bos_token", special["add_bos"], GGUFValueType.BOOL)
    writer.add_chat_template(RAW_CHAT_TEMPLATE)


# =================================================================================================== write / read
def write_gguf(model_dir: str | Path, out_file: str | Path, *, metadata_source: str | Path, dtype: str = "bf16",
               name: Optional[str] = None, log: Callable[[str], None] = lambda m: None) -> dict:
    """Write the ``LlamaForCausalLM`` in ``model_dir`` as the GGUF file ``out_file``; return a summary
    (tensors, bytes, seconds). ``metadata_source``: a GGUF of the same base model to copy the tokenizer from."""
    from gguf import GGUFWriter

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    config = read_config(model_dir)
    check_llama(config)
    source_fields = _source_fields(Path(metadata_source))
    check_vocabulary(source_fields["tokenizer.ggml.tokens"][0], model_dir, int(config["vocab_size"]))
    ckpt = SafetensorsCheckpoint(model_dir)
    plan = tensor_plan(ckpt.keys(), config)
    qtype, file_type = _qtypes()[dtype]
    t0 = time.perf_counter()
    writer = GGUFWriter(str(out_file), "llama")
    for item in plan:  # tensor infos first (the header lists them), from shapes alone
        shape = ckpt.shape(item.hf_name)
        if len(shape) == 1 or dtype == "f32":
            writer.add_tensor_info(item.gguf_name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        elif dtype == "bf16":
            byte_shape = (*shape[:-1], 2 * shape[-1])
            writer.add_tensor_info(item.gguf_name, byte_shape, np.dtype(np.uint8), 2 * int(np.prod(shape)), qtype)
        else:
            writer.add_tensor_info(item.gguf_name, shape, np.dtype(np.float16), 2 * int(np.prod(shape)))
    _write_metadata(writer, config, source_fields, _special_ids(model_dir, config),
                    name or str(source_fields.get("general.name", ("model",))[0]), file_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in plan:
        t = ckpt.get(item.hf_name)
        if item.rope_heads:
            t = rope_rows_to_gguf(t, item.rope_heads)
        writer.write_tensor_data(_encode(t, dtype, item.hf_name))
    writer.close()
    summary = {"file": out_file.name, "tensors": len(plan), "bytes": out_file.stat().st_size, "dtype": dtype,
               "seconds": round(time.perf_counter() - t0, 2)}
    log(f"[export] gguf {out_file.name}: {len(plan)} tensors, {summary['bytes'] / 1e6:.0f} MB ({dtype}) "
        f"in {summary['seconds']:.1f} s")
    return summary


def read_gguf_tensors(path: str | Path, config: dict, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of a file written by :func:`write_gguf`, back under the checkpoint's names and layout (float32):
    what a round trip compares with the checkpoint. ``keys``: the checkpoint's tensor names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    by_gguf = {item.gguf_name: item for item in tensor_plan(keys, config)}
    out = {}
    for tensor in GGUFReader(str(path)).tensors:
        item = by_gguf.get(tensor.name)
        if item is None:
            raise GGUFExportError(f"{path}: unexpected tensor {tensor.name}")
        values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        out[item.hf_name] = rope_rows_from_gguf(values, item.rope_heads) if item.rope_heads else values
    return out


def read_gguf_metadata(path: str | Path, keys: tuple[str, ...] = ()) -> dict:
    """``{key: value}`` of a GGUF file's metadata (all scalar/string fields, plus the array fields named in
    ``keys``; large arrays such as the vocabulary are left out unless asked for)."""
    from gguf import GGUFReader, GGUFValueType

    out = {}
    for key, field in GGUFReader(str(path)).fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY and key not in keys:
            continue
        out[key] = field.contents()
    return out
