"""Merge N domain experts into one MoE checkpoint (paper §3.3, Algorithm 1) without loading N models at once.

For experts fine-tuned from one seed (same architecture, same tensor names and shapes):

* every FFN tensor of expert i becomes ``experts.{i}`` of its layer's MoE block
  (``model.layers.3.mlp.up_proj.weight`` -> ``lm.model.layers.3.mlp.experts.{i}.up_proj.weight``, see
  :mod:`lm_lexicon.moe.ffn_spec`);
* every other tensor (attention, norms, embeddings, LM head) is the mean of the experts' tensors, summed in expert
  order in float64 (float32 for half-precision weights) and cast back to the experts' dtype;
* each layer gets a router gate ``[N, hidden]``: the domain centroids when the policy uses a gate and the
  centroids live in the model's hidden space (same dimension: the MiniLM decoder seed and the MiniLM embedder),
  else ``N(0, initializer_range)`` drawn from ``seed``. The choice actually made is recorded in the config
  (``gate_init_effective``). Under ``domain`` routing the gate is unused; it is written anyway so the checkpoint
  can later be fine-tuned with another policy (or calibrated: :func:`lm_lexicon.moe.model.calibrate_gates`).

Memory: tensors are read one at a time (a file is mapped only while one tensor is copied out: see
:class:`SafetensorsCheckpoint`) and the output is written shard by shard (``max_shard_size``, default 2 GB), so the
peak is about one output shard (twice, while safetensors serialises it) plus the tensor being averaged, never N
models. Nothing is unpickled: experts must be safetensors.

Validation happens before anything is written: same ``model_type`` and architecture fields in ``config.json``
(dropout, name and version fields may differ), same tensor names, shapes and dtypes, same tokenizer files. A
mismatch raises :class:`ExpertMismatchError` naming the expert and the first differences.

Output directory: ``config.json`` (``model_type: lm_lexicon_moe``, base config under ``text_config``, the
``lm_lexicon_moe`` section: experts, policy, top_k, ffn spec, router dir, centroids file, embedder, seed),
``model.safetensors`` (or shards + ``model.safetensors.index.json``), tokenizer files and ``generation_config.json``
of expert 0, and ``router/`` (:meth:`lm_lexicon.partition.routing.DomainRouter.save`). It is written to a temporary
sibling and renamed into place, so a crash never leaves a directory that looks complete.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lm_lexicon.data.prompts import PromptTemplates
from lm_lexicon.moe.ffn_spec import MOE_PREFIX, FFNSpec, has_ffn_bias, spec_for_config
from lm_lexicon.moe.hf_config import ARCHITECTURE, MODEL_TYPE, ROUTING_POLICIES, SECTION
from lm_lexicon._util import sha256_file, written_atomically

MERGE_FORMAT = "lm_lexicon.moe.merge/1"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 2 * 1024 ** 3
GATE_INIT = ("centroids", "random")

# config.json fields that may differ between experts of one architecture: bookkeeping, and the dropout the fine-tune
# used (a training choice, not the architecture).
IGNORED_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "use_cache", "output_hidden_states", "return_dict",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "activation_dropout", "classifier_dropout",
}
# Files copied from expert 0 (all experts were checked to share the tokenizer).
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json",
                      "spiece.model", "*.jinja", "generation_config.json")
TOKENIZER_IDENTITY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model")

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class ExpertMismatchError(ValueError):
    """The experts cannot be merged: they differ in architecture, tensor names, shapes, dtypes or tokenizer."""


# =================================================================================================== reading
class SafetensorsCheckpoint:
    """Tensor-by-tensor access to the safetensors weights of one ``save_pretrained`` directory (sharded or not).

    Each :meth:`get` opens its file with ``safe_open``, copies the one tensor out and closes the file again: a memory
    map left open stays resident (and is counted in the process's RSS) once read, so merging N experts through open
    maps would show N experts' worth of memory. Here only the tensor being used is held.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / WEIGHTS_INDEX_NAME
        single = self.directory / WEIGHTS_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif single.is_file():
            files = [WEIGHTS_NAME]
        else:
            pickled = sorted(p.name for p in self.directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" (it holds pickled weights {pickled}, which are never loaded)" if pickled else ""
            raise FileNotFoundError(f"{self.directory}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
        self._entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}  # key -> file, dtype, shape
        for name in files:
            path = self.directory / name
            with safe_open(path, framework="pt") as f:
                for key in f.offset_keys():  # the file's order (keys() sorts them)
                    info = f.get_slice(key)
                    self._entries[key] = (path, info.get_dtype(), tuple(info.get_shape()))
        self.weight_map = {key: entry[0].name for key, entry in self._entries.items()}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._entries[key][1]]

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self._entries[key][0], framework="pt") as f:
            return f.get_tensor(key)


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    return json.loads(path.read_text(encoding="utf-8"))


# =================================================================================================== writing
@dataclass
class PlannedTensor:
    """One output tensor: its name, shape, dtype and how to compute it when its shard is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def parse_size(size: int | str) -> int:
    """``2_000_000``, ``"2GB"``, ``"500MB"``, ``"1GiB"`` -> bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def write_sharded(plan: Sequence[PlannedTensor], out_dir: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  metadata: Optional[dict] = None) -> list[str]:
    """Write ``plan`` as ``model.safetensors`` or as Hugging Face shards + index; return the file names.

    Shards are planned from the known sizes before any tensor is computed, and each shard's tensors are computed
    only when that shard is written, then freed: peak memory is one shard (a tensor larger than the limit gets a
    shard of its own).
    """
    limit = parse_size(max_shard_size)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    weight_map = {}
    for name, shard in zip(names, shards):
        tensors = {}
        for item in shard:
            t = item.produce()
            if tuple(t.shape) != item.shape or t.dtype != item.dtype:
                raise RuntimeError(f"{item.name}: produced {tuple(t.shape)} {t.dtype}, planned {item.shape} {item.dtype}")
            tensors[item.name] = t.contiguous()
            weight_map[item.name] = name
        save_file(tensors, str(out_dir / name), metadata=meta)
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in plan)}, "weight_map": weight_map}
        (out_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and not (dst / p.name).exists():
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


def atomic_directory(out_dir: str | Path, overwrite: bool):
    """Build a directory in a temporary sibling and rename it into place on success (a context manager yielding the
    sibling); an existing ``out_dir`` is a FileExistsError unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    return written_atomically(out_dir)


# =================================================================================================== validation
def _first(items: Iterable, n: int = 5) -> list:
    return sorted(items)[:n]


def validate_experts(dirs: Sequence[Path], configs: Sequence[dict], ckpts: Sequence[SafetensorsCheckpoint]) -> None:
    """Raise :class:`ExpertMismatchError` unless all experts share architecture, tensors and tokenizer."""
    ref_dir, ref_cfg, ref = dirs[0], configs[0], ckpts[0]
    ref_keys = set(ref.keys())
    for i in range(1, len(dirs)):
        where = f"expert {i} ({dirs[i]}) vs expert 0 ({ref_dir})"
        cfg = configs[i]
        fields = (set(ref_cfg) | set(cfg)) - IGNORED_CONFIG_KEYS
        differing = sorted(k for k in fields if ref_cfg.get(k) != cfg.get(k))
        if differing:
            detail = ", ".join(f"{k}: {ref_cfg.get(k)!r} != {cfg.get(k)!r}" for k in differing[:6])
            raise ExpertMismatchError(f"{where}: different architecture in config.json ({detail}). Experts must all "
                                      "be fine-tuned from the same seed model.")
        keys = set(ckpts[i].keys())
        if keys != ref_keys:
            raise ExpertMismatchError(
                f"{where}: different tensor names — only in expert 0: {_first(ref_keys - keys)}; only in expert {i}: "
                f"{_first(keys - ref_keys)}")
        bad = [(k, ref.shape(k), ckpts[i].shape(k)) for k in sorted(ref_keys) if ref.shape(k) != ckpts[i].shape(k)]
        if bad:
            raise ExpertMismatchError(f"{where}: different tensor shapes, e.g. " +
                                      "; ".join(f"{k}: {a} != {b}" for k, a, b in bad[:5]))
        bad = [(k, ref.dtype(k), ckpts[i].dtype(k)) for k in sorted(ref_keys) if ref.dtype(k) != ckpts[i].dtype(k)]
        if bad:
            raise ExpertMismatchError(f"{where}: different tensor dtypes, e.g. " +
                                      "; ".join(f"{k}: {a} != {b}" for k, a, b in bad[:5]))
        for name in TOKENIZER_IDENTITY_FILES:
            a, b = ref_dir / name, dirs[i] / name
            if a.is_file() != b.is_file() or (a.is_file() and sha256_file(a) != sha256_file(b)):
                raise ExpertMismatchError(f"{where}: different tokenizer ({name}); experts must share the seed's tokenizer")


# =================================================================================================== gates
def _load_router(router: Any):
    if router is None:
        return None
    from lm_lexicon.partition.routing import DomainRouter

    if isinstance(router, DomainRouter):
        return router
    return DomainRouter.load(Path(router))


def gate_rows(spec_hidden: int, n_experts: int, n_layers: int, gate_init: str, router, initializer_range: float,
              seed: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], str]:
    """The gate weight ``[N, hidden]`` of each layer and a note on how it was initialised.

    ``centroids``: every layer's rows are the unit centroids scaled by ``1/sqrt(hidden)`` (hidden states after the
    pre-FFN norm have norm ~ sqrt(hidden), so logits start as cosine similarities), when the centroids have the
    hidden size; otherwise the random init below, and the note says why.
    ``random``: ``N(0, initializer_range)`` from a generator seeded with ``seed`` (transformers' MoE gate init).
    """
    if gate_init not in GATE_INIT:
        raise ValueError(f"gate_init must be one of {GATE_INIT}, got {gate_init!r}")
    if gate_init == "centroids" and router is not None:
        centroids = np.asarray(router.centroids, dtype=np.float32)  # [k, d] unit rows
        if centroids.shape[1] == spec_hidden:
            rows = torch.from_numpy(centroids.copy()) / math.sqrt(spec_hidden)
            return [rows.to(dtype).clone() for _ in range(n_layers)], "centroids"
        note = f"random (centroid dim {centroids.shape[1]} != hidden size {spec_hidden})"
    elif gate_init == "centroids":
        note = "random (no router given)"
    else:
        note = "random"
    g = torch.Generator().manual_seed(int(seed))
    rows = [(torch.randn(n_experts, spec_hidden, generator=g) * initializer_range).to(dtype) for _ in range(n_layers)]
    return rows, note


# =================================================================================================== merge
def merge_experts(expert_dirs: Sequence[str | Path], out_dir: str | Path, *, routing: str = "domain",
                  top_k: int = 2, gate_init: str = "centroids", aux_loss_coef: float = 0.01, router: Any = None,
                  seed: int = 0, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                  provenance: Optional[dict] = None) -> Path:
    """Merge expert checkpoints (expert i = domain i) into an MoE directory ``out_dir``; return it.

    ``routing``/``top_k``/``gate_init``/``aux_loss_coef`` are the fields of
    :class:`lm_lexicon.config.MergeConfig` (``merge_experts(dirs, out, **cfg.merge.model_dump(), router=...)``).
    ``router``: the :class:`~lm_lexicon.partition.routing.DomainRouter` of the partition (or its directory); saved under
    ``router/`` and used for centroid gate init. It must have one centroid per expert. ``provenance``: extra
    JSON-able facts recorded in the config section (e.g. the partition's run id). The experts' prompt templates
    (``prompt_templates.json``) must agree; the MoE and its router get them.
    """
    dirs = [Path(d) for d in expert_dirs]
    if not dirs:
        raise ValueError("no experts to merge")
    if routing not in ROUTING_POLICIES:
        raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {routing!r}")
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n = len(dirs)
    configs = [read_config(d) for d in dirs]
    if configs[0].get("model_type") == MODEL_TYPE:
        raise ExpertMismatchError(f"{dirs[0]} is already an lm_lexicon MoE; merge dense experts")
    ckpts = [SafetensorsCheckpoint(d) for d in dirs]
    validate_experts(dirs, configs, ckpts)
    try:
        templates = PromptTemplates.agreed(dirs)  # one MoE answers one kind of prompt
    except ValueError as e:
        raise ExpertMismatchError(str(e)) from None
    router_obj = _load_router(router)
    if router_obj is not None and router_obj.n_clusters != n:
        raise ExpertMismatchError(f"the router has {router_obj.n_clusters} domains but {n} experts were given")

    base = configs[0]
    spec = spec_for_config(base)
    plan, counts, gate_note, model_dtype = _merge_plan(spec, base, ckpts, gate_init, router_obj, seed)
    section = {
        "n_experts": n, "routing": routing, "top_k": int(top_k), "aux_loss_coef": float(aux_loss_coef),
        "ffn_spec": spec.name, "gate_init": gate_init, "gate_init_effective": gate_note, "seed": int(seed),
        "experts": [{"index": i, "source": str(d.resolve()), "config_sha256": sha256_file(d / "config.json")}
                    for i, d in enumerate(dirs)],
        "router_dir": "router" if router_obj is not None else None,
        "centroids_file": "router/router.safetensors" if router_obj is not None else None,
        "embedder": None,  # filled from the saved router.json below
        "tensors": counts, "merged_with": MERGE_FORMAT,
    }
    if provenance:
        section["provenance"] = provenance
    with atomic_directory(out_dir, overwrite) as tmp:
        if router_obj is not None:
            router_obj.save(tmp / "router")
            templates.save(tmp / "router")
            section["embedder"] = json.loads((tmp / "router" / "router.json").read_text(encoding="utf-8"))["embedder"]
        write_sharded(plan, tmp, max_shard_size, metadata={"lm_lexicon": MERGE_FORMAT})
        write_moe_config(tmp, base, section, dtype=model_dtype)
        copy_tokenizer_files(dirs[0], tmp)
        templates.save(tmp)
    return Path(out_dir)


def _merge_plan(spec: FFNSpec, base: dict, ckpts: Sequence[SafetensorsCheckpoint], gate_init: str, router, seed: int):
    """The output tensors in checkpoint order (shared means; each FFN tensor as N expert tensors; a layer's gate
    after its last FFN tensor), tensor counts, how the gates were initialised, and the experts' weight dtype."""
    ref = ckpts[0]
    n = len(ckpts)
    ffn = {k: spec.parse_dense_key(k) for k in ref.keys()}
    layers = sorted({p[0] for p in ffn.values() if p is not None})
    if not layers:
        raise ExpertMismatchError(f"no FFN tensors matching the {spec.name!r} spec ({spec.layers_path}.N."
                                  f"{'/'.join(d for d, _ in spec.modules)}) in {ref.directory}")
    expected = set(spec.expert_rel_names(has_ffn_bias(spec, base)))
    for layer in layers:
        found = {p[1] for p in ffn.values() if p is not None and p[0] == layer}
        if found != expected:
            raise ExpertMismatchError(f"layer {layer} of {ref.directory}: FFN tensors {sorted(found)}, the "
                                      f"{spec.name!r} spec expects {sorted(expected)}")
    n_layers = base.get("num_hidden_layers", len(layers))
    if layers != list(range(n_layers)):
        raise ExpertMismatchError(f"{ref.directory}: FFN tensors found for layers {layers}, config has {n_layers}")
    some_ffn = next(k for k, p in ffn.items() if p is not None)
    model_dtype = ref.dtype(some_ffn)
    hidden = int(base["hidden_size"])
    gates, note = gate_rows(hidden, n, n_layers, gate_init, router, float(base.get("initializer_range", 0.02)), seed,
                            model_dtype)

    plan: list[PlannedTensor] = []
    counts = {"shared": 0, "expert": 0, "gate": 0}
    last_ffn_key_of_layer = {}
    for key, parsed in ffn.items():
        if parsed is not None:
            last_ffn_key_of_layer[parsed[0]] = key
    for key in ref.keys():
        parsed = ffn[key]
        shape, dtype = ref.shape(key), ref.dtype(key)
        if parsed is None:
            plan.append(PlannedTensor(MOE_PREFIX + key, shape, dtype, _mean_of(ckpts, key)))
            counts["shared"] += 1
            continue
        layer, rel = parsed
        for i, ckpt in enumerate(ckpts):
            plan.append(PlannedTensor(spec.expert_key(layer, i, rel), shape, dtype, _reader(ckpt, key)))
            counts["expert"] += 1
        if key == last_ffn_key_of_layer[layer]:
            gate = gates[layer]
            plan.append(PlannedTensor(spec.gate_key(layer), tuple(gate.shape), gate.dtype, lambda g=gate: g))
            counts["gate"] += 1
    return plan, counts, note, model_dtype


def _reader(ckpt: SafetensorsCheckpoint, key: str) -> Callable[[], torch.Tensor]:
    return lambda: ckpt.get(key)


def mean_tensor(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The merge's mean: summed in order in float64 (float32 for 16-bit floats), divided by the count, cast back.

    Integer tensors (buffers) must be identical across experts; they are copied, not averaged."""
    total, count, dtype, first = None, 0, None, None
    for t in tensors:
        if dtype is None:
            dtype, first = t.dtype, t
        if not dtype.is_floating_point:
            if not torch.equal(t, first):
                raise ExpertMismatchError("an integer tensor differs between experts and cannot be averaged")
            count += 1
            continue
        acc = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
        total = t.to(acc) if total is None else total.add_(t.to(acc))
        count += 1
    if not dtype.is_floating_point:
        return first
    return (total / count).to(dtype)


def _mean_of(ckpts: Sequence[SafetensorsCheckpoint], key: str) -> Callable[[], torch.Tensor]:
    return lambda: mean_tensor(ckpt.get(key) for ckpt in ckpts)


def write_moe_config(out_dir: Path, base: dict, section: dict, dtype: Optional[torch.dtype] = None) -> None:
    """``config.json`` of the MoE, written through :class:`LexiconMoEConfig` so it is exactly what loading expects."""
    from lm_lexicon.moe.hf_config import config_class

    text_config = {k: v for k, v in base.items() if k not in ("transformers_version", "_name_or_path")}
    config = config_class()(text_config=text_config, lm_lexicon_moe=section)
    config.architectures = [ARCHITECTURE]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(out_dir))
    # sanity: the section survived serialisation
    saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if saved.get("model_type") != MODEL_TYPE or SECTION not in saved:
        raise RuntimeError(f"{out_dir}/config.json lacks the {SECTION} section")
