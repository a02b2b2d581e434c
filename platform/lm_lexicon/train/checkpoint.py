"""Checkpoints of the SFT loop and the exported model: safetensors weights (a checkpoint is also a loadable model),
the optimizer and RNG states (``torch.save`` of plain tensors and numbers, read back with ``weights_only=True``) and
the loop state as JSON. Every directory is written beside its final place and renamed into it, so a crash never
leaves a half-written one that looks complete."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from lm_lexicon import _util
from lm_lexicon.train.parallel import unwrap
from lm_lexicon.train.state import TrainerState

# the checkpoints' format tag: "sft" is the loop's former module name, kept so that existing checkpoints resume
CHECKPOINT_FORMAT = "lm_lexicon.sft/1"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
SUMMARY_FILE = "sft_summary.json"
CHECKPOINTS_DIR = "checkpoints"
# what a checkpoint holds beyond the model itself (DeepSpeed adds lm_lexicon.distributed.DEEPSPEED_STATE_DIR)
TRAINING_STATE_FILES = (STATE_FILE, OPTIMIZER_FILE, RNG_FILE)


SCRATCH_SUFFIX = ".tmp"  # a directory being written: step-0000004.tmp, model.tmp (never taken for a checkpoint)


def written_atomically(directory: Path):
    """Yield an empty temporary sibling of ``directory`` to fill; on success it replaces ``directory``."""
    return _util.written_atomically(directory, SCRATCH_SUFFIX)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_loop_state(directory: Path, state: TrainerState) -> None:
    """The RNG states and the loop state: what a checkpoint needs besides weights and optimizer."""
    torch.save(rng_state(), directory / RNG_FILE)
    (directory / STATE_FILE).write_text(json.dumps(dict(state.to_json(), format=CHECKPOINT_FORMAT), indent=2) + "\n",
                                        encoding="utf-8")


def save_checkpoint(directory: Path, model, tokenizer, optimizer, state: TrainerState) -> Path:
    """Write a resumable checkpoint: model + tokenizer (``save_pretrained``), optimizer, RNG and loop state."""
    with written_atomically(directory) as tmp:
        unwrap(model).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        torch.save({"optimizer": optimizer.state_dict()}, tmp / OPTIMIZER_FILE)
        write_loop_state(tmp, state)
    return Path(directory)


def save_model(model, directory: Path, dtype: str = "float32") -> None:
    """``save_pretrained`` (safetensors) with the floating-point weights cast to ``dtype``; the model object keeps
    its own dtype (training goes on in float32)."""
    base = unwrap(model)
    if dtype == "float32":
        base.save_pretrained(str(directory))
        return
    target = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    state = {k: v.detach().to(target) if v.is_floating_point() else v for k, v in base.state_dict().items()}
    base.save_pretrained(str(directory), state_dict=state)
    config_path = Path(directory) / "config.json"  # it states the in-memory model's dtype: say what the file holds
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_summary(directory: Path, state: TrainerState, weights: str, **extra) -> None:
    """``sft_summary.json`` of an exported model: the run's outcome and whether the weights are the best or last."""
    summary = dict(state.summary(), weights=weights, **extra)
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def read_trainer_state(directory: str | Path) -> dict:
    """The JSON loop state of a checkpoint (step, data position, early-stopping state, history)."""
    state = json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: not an lm_lexicon SFT checkpoint (format {state.get('format')!r})")
    return state


def load_model_weights(model, directory: str | Path) -> None:
    """Load the safetensors weights of a ``save_pretrained`` directory (sharded or not) into ``model`` in place."""
    from safetensors.torch import load_file

    target = unwrap(model)
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no .safetensors weights")
    expected = set(target.state_dict().keys())
    loaded: set[str] = set()
    for f in files:
        shard = load_file(str(f))
        unknown = set(shard) - expected
        if unknown:
            raise RuntimeError(f"{f}: weights the model does not have: {sorted(unknown)[:5]}")
        target.load_state_dict(shard, strict=False)
        loaded |= set(shard)
    # tied parameters (e.g. an LM head tied to the embeddings) are saved once; they share storage with a loaded key
    tensors = target.state_dict(keep_vars=True)
    loaded_storage = {tensors[k].data_ptr() for k in loaded}
    missing = sorted(k for k in expected - loaded if tensors[k].data_ptr() not in loaded_storage)
    if missing:
        raise RuntimeError(f"{directory}: checkpoint lacks weights {missing[:5]}")


def prune_checkpoints(root: Path, keep: int, protect: set[str]) -> None:
    """Delete all but the newest ``keep`` step checkpoints under ``root``, never one named in ``protect``."""
    ckpts = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(SCRATCH_SUFFIX))
    for p in ckpts[:-keep] if keep > 0 else ckpts:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)

