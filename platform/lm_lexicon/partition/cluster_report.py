"""What the partition produced: sizes, cohesion / separation (the paper's Tables 7 and 8), top terms and sources
per domain, and a 2-D picture. Used to judge whether the domains are semantically distinct enough to deserve
separate experts.

Distances are cosine distances ``1 - cos`` on L2-normalised vectors, in the space the partition was made in.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lm_lexicon.partition.routing import json_safe, unit_rows


@dataclass
class ClusterQuality:
    """``cohesion[j]``: mean cosine distance of domain j's rows to its centroid (lower = tighter; NaN if empty).
    ``separation[p, q]``: cosine distance between centroids p and q (higher = further apart; 0 on the diagonal).
    ``sizes[j]``: rows in domain j."""

    cohesion: np.ndarray  # [k]
    separation: np.ndarray  # [k, k]
    sizes: np.ndarray  # [k]

    @property
    def n_clusters(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def mean_cohesion(self) -> float:
        """Size-weighted mean intra-cluster distance (the per-row average)."""
        ok = self.sizes > 0
        return float(np.average(self.cohesion[ok], weights=self.sizes[ok])) if ok.any() else float("nan")

    @property
    def mean_separation(self) -> float:
        """Mean distance over distinct centroid pairs (NaN with one domain)."""
        k = self.n_clusters
        if k < 2:
            return float("nan")
        return float(self.separation[~np.eye(k, dtype=bool)].mean())

    def to_dict(self) -> dict:
        return {"sizes": self.sizes.tolist(), "cohesion": _nan_to_none(self.cohesion.tolist()),
                "separation": self.separation.tolist(), "mean_cohesion": _nan_to_none(self.mean_cohesion),
                "mean_separation": _nan_to_none(self.mean_separation)}


def cohesion_separation(X: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> ClusterQuality:
    """Intra-cluster cohesion and inter-cluster separation, cosine distance.

    ``X`` ``[n, d]``, ``labels`` ``[n]`` in ``0..k-1``, ``centroids`` ``[k, d]`` (all normalised here).
    """
    X = unit_rows(X).astype(np.float64)
    C = unit_rows(centroids).astype(np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (X.shape[0],):
        raise ValueError(f"{labels.shape[0]} labels for {X.shape[0]} rows")
    k = C.shape[0]
    if X.shape[1] != C.shape[1]:
        raise ValueError(f"feature dim {X.shape[1]} != centroid dim {C.shape[1]}")
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k - 1}]")
    sizes = np.bincount(labels, minlength=k).astype(np.int64)
    dist = 1.0 - np.einsum("nd,nd->n", X, C[labels])  # [n] distance of each row to its own centroid
    sums = np.bincount(labels, weights=dist, minlength=k)
    cohesion = np.divide(sums, sizes, out=np.full(k, np.nan), where=sizes > 0)
    separation = 1.0 - C @ C.T  # [k, k]
    np.fill_diagonal(separation, 0.0)
    return ClusterQuality(cohesion=cohesion, separation=np.clip(separation, 0.0, 2.0), sizes=sizes)


def top_items(labels: np.ndarray, terms: Sequence[str] | None = None, sources: Sequence[str] | None = None,
              k: int = 10) -> dict[int, dict[str, list[tuple[str, int]]]]:
    """The ``k`` most frequent terms and sources of each domain: ``{domain: {"terms": [(t, n)], "sources": ...}}``.

    Ties are broken alphabetically so the report does not depend on row order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n_domains = int(labels.max()) + 1 if len(labels) else 0
    out: dict[int, dict[str, list[tuple[str, int]]]] = {d: {} for d in range(n_domains)}
    for name, values in (("terms", terms), ("sources", sources)):
        if values is None:
            continue
        if len(values) != len(labels):
            raise ValueError(f"{len(values)} {name} for {len(labels)} labels")
        counters = [Counter() for _ in range(n_domains)]
        for d, v in zip(labels.tolist(), values):
            counters[d][v] += 1
        for d, c in enumerate(counters):
            out[d][name] = sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))[:k]
    return out


def project_2d(X: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D coordinates ``[n, 2]`` by UMAP (cosine) when importable (or asked for), else PCA; returns (xy, name)."""
    X = unit_rows(X)
    if method in ("auto", "umap"):
        try:
            import umap  # optional: better separated pictures, not a dependency
        except ImportError:
            if method == "umap":
                raise
        else:
            if X.shape[0] > 3:
                xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed,
                               n_neighbors=min(15, X.shape[0] - 1)).fit_transform(X)
                return np.asarray(xy, dtype=np.float32), "umap"
    from sklearn.decomposition import PCA

    if X.shape[0] < 2 or X.shape[1] < 2:
        xy = np.zeros((X.shape[0], 2), dtype=np.float32)
        xy[:, : X.shape[1]] = X[:, :2]
        return xy, "pca"
    return PCA(n_components=2, random_state=seed).fit_transform(X).astype(np.float32), "pca"


def plot_clusters(X: np.ndarray, labels: np.ndarray, path: str | Path, sample: int = 3000, seed: int = 0,
                  method: str = "auto", title: str | None = None) -> dict:
    """Scatter a seeded sample of rows in 2-D coloured by domain; writes a PNG and returns what it drew.

    Uses matplotlib's object API on an Agg canvas, so it never touches the global backend (safe in Ray workers
    and in processes that already use another backend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    X = np.asarray(X)
    labels = np.asarray(labels, dtype=np.int64)
    if X.shape[0] != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {X.shape[0]} rows")
    if X.shape[0] == 0:
        raise ValueError("nothing to plot: 0 rows")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(X.shape[0], size=min(sample, X.shape[0]), replace=False))
    xy, used = project_2d(X[idx], seed=seed, method=method)
    lab = labels[idx]
    k = int(labels.max()) + 1

    fig = Figure(figsize=(7, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = _colormap(k)
    for d in range(k):
        m = lab == d
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(d % cmap.N), label=f"domain {d} ({m.sum()})",
                       linewidths=0)
    ax.set_title(title or f"{len(idx)} prompts by domain ({used.upper()})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=7, markerscale=2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return {"path": str(path), "projection": used, "n_points": int(len(idx))}


def _colormap(k: int):
    from matplotlib import colormaps

    return colormaps["tab10" if k <= 10 else "tab20"]


def render_markdown(quality: ClusterQuality, top: dict | None = None, *, title: str = "Domain partition",
                    plot_path: str | None = None, summary: dict | None = None, decimals: int = 3) -> str:
    """Markdown: sizes + cohesion per domain, the k x k separation matrix, top terms/sources, and the plot."""
    f = f"{{:.{decimals}f}}"
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f.format(v)  # noqa: E731
    k = quality.n_clusters
    lines = [f"# {title}", ""]
    if summary:
        keys = [key for key in ("method", "n_rows", "n_clusters", "seed", "slack", "size_bounds", "margin")
                if key in summary]
        lines += [", ".join(f"**{key}**: {summary[key]}" for key in keys), ""]
    lines += ["## Sizes and intra-cluster cohesion (mean cosine distance to centroid, lower is tighter)", "",
              "| domain | rows | share | cohesion |", "|---:|---:|---:|---:|"]
    total = max(int(quality.sizes.sum()), 1)
    for d in range(k):
        lines.append(f"| {d} | {quality.sizes[d]} | {100 * quality.sizes[d] / total:.1f}% | "
                     f"{fmt(quality.cohesion[d])} |")
    lines.append(f"| all | {int(quality.sizes.sum())} | 100% | {fmt(quality.mean_cohesion)} |")
    lines += ["", "## Inter-cluster separation (cosine distance between centroids, higher is further apart)", "",
              "| | " + " | ".join(str(q) for q in range(k)) + " |", "|---:|" + "---:|" * k]
    for p in range(k):
        lines.append(f"| **{p}** | " + " | ".join(fmt(quality.separation[p, q]) for q in range(k)) + " |")
    lines += ["", f"Mean separation over distinct pairs: {fmt(quality.mean_separation)}"]
    if top:
        lines += ["", "## Most frequent terms and sources", "",
                  "| domain | top terms | top sources |", "|---:|---|---|"]
        for d in sorted(top):
            terms = ", ".join(f"{_md(t)} ({n})" for t, n in top[d].get("terms", []))
            sources = ", ".join(f"{_md(s)} ({n})" for s, n in top[d].get("sources", []))
            lines.append(f"| {d} | {terms} | {sources} |")
    if plot_path:
        lines += ["", f"![domains]({plot_path})"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, X: np.ndarray, labels: np.ndarray, centroids: np.ndarray, *,
                 terms: Sequence[str] | None = None, sources: Sequence[str] | None = None, top_k: int = 10,
                 sample: int = 3000, seed: int = 0, summary: dict | None = None) -> dict:
    """Everything above into ``out_dir``: ``cluster_report.md``, ``cluster_report.json``, ``clusters.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quality = cohesion_separation(X, labels, centroids)
    top = top_items(labels, terms, sources, k=top_k) if (terms is not None or sources is not None) else None
    plot = plot_clusters(X, labels, out_dir / "clusters.png", sample=sample, seed=seed)
    md = render_markdown(quality, top, plot_path="clusters.png", summary=summary)
    (out_dir / "cluster_report.md").write_text(md)
    doc = {"quality": quality.to_dict(), "top": {str(d): v for d, v in (top or {}).items()}, "plot": plot,
           "summary": summary or {}}
    (out_dir / "cluster_report.json").write_text(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    return {"markdown": str(out_dir / "cluster_report.md"), "json": str(out_dir / "cluster_report.json"),
            "plot": plot["path"], "quality": quality}


def _md(s) -> str:
    return str(s).replace("|", "\\|")


def _nan_to_none(v):
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return None if isinstance(v, float) and np.isnan(v) else v
