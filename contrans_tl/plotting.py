"""Matplotlib figures from result objects. The only module of the library that imports matplotlib.

Each function takes plain results (dicts/arrays as the analyses write them) and returns a
Figure; :func:`save_figure` writes PNG and PDF side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    "save_figure",
    "accuracy_vs_alpha",
    "accuracy_vs_examples",
    "pca_before_after",
    "embedding_2d",
    "heatmap",
]

EMOTION_COLORS = {
    "happiness": "#f2b701",
    "sadness": "#3969ac",
    "anger": "#e73f74",
    "fear": "#7f3c8d",
    "disgust": "#11a579",
    "surprise": "#e68310",
}


def _color(name: str, i: int) -> str:
    return EMOTION_COLORS.get(name, plt.get_cmap("tab10")(i % 10))


def save_figure(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf``; returns both paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in out:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return out


def accuracy_vs_alpha(
    alphas: Sequence[float],
    token_acc: Mapping[str, Sequence[float]],
    logit_acc: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    random_logit_acc: Mapping[str, Sequence[float]] | None = None,
) -> Figure:
    """Fig 2a: per-emotion Token Acc bars against alpha, Logit Acc as lines (random control dashed)."""
    names = list(token_acc)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), sharey=True, squeeze=False)
    x = np.arange(len(alphas))
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        ax.bar(x, token_acc[name], color=_color(name, i), alpha=0.55, label="Token Acc")
        ax.plot(x, logit_acc[name], "o-", color=_color(name, i), label="Logit Acc")
        if random_logit_acc is not None and name in random_logit_acc:
            ax.plot(x, random_logit_acc[name], "x--", color="grey", label="random (Logit)")
        ax.set_xticks(x, [f"{a:g}" for a in alphas], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("alpha")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("accuracy on negatives")
    axes[0][-1].legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def accuracy_vs_examples(
    n_examples: Sequence[int], series: Mapping[str, Sequence[float]], *, ylabel: str = "Logit Acc", title: str = ""
) -> Figure:
    """Fig 5: accuracy against the number of refinement examples, one line per emotion."""
    fig, ax = plt.subplots(figsize=(4.2, 3))
    for i, (name, values) in enumerate(series.items()):
        ax.plot(list(n_examples), values, "o-", color=_color(name, i), label=name)
    ax.set_xscale("log")
    ax.set_xticks(list(n_examples), [str(n) for n in n_examples])
    ax.set_xlabel("refinement examples per side")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def pca_before_after(
    before: np.ndarray,
    after: np.ndarray,
    labels: Sequence[str],
    *,
    steered: str,
    title: str = "",
) -> Figure:
    """Fig 2b: target hidden states in the PCA plane of the unsteered states, before → after.

    Points are scenarios coloured by emotion; arrows go from each emotion's centroid before
    to its centroid after transplanting ``steered``.
    """
    mean = before.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(before - mean, full_matrices=False)
    basis = vt[:2].T
    b2, a2 = (before - mean) @ basis, (after - mean) @ basis
    labels = np.asarray(labels)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), sharex=True, sharey=True)
    for i, name in enumerate(dict.fromkeys(labels)):
        sel = labels == name
        for ax, pts in zip(axes, (b2, a2)):
            ax.scatter(pts[sel, 0], pts[sel, 1], s=10, color=_color(name, i), label=name, alpha=0.7)
        start, end = b2[sel].mean(0), a2[sel].mean(0)
        axes[1].annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": _color(name, i)})
    axes[0].set_title("before")
    axes[1].set_title(f"after transplanting {steered}")
    axes[0].legend(fontsize=6)
    for ax in axes:
        ax.set_xlabel("PC1")
    axes[0].set_ylabel("PC2")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def embedding_2d(points: Mapping[str, np.ndarray], labels: Sequence[str], *, title: str = "") -> Figure:
    """Fig 7/8: one panel per (model, method) of 2-D points coloured by emotion."""
    fig, axes = plt.subplots(1, len(points), figsize=(3.4 * len(points), 3.2), squeeze=False)
    labels = np.asarray(labels)
    for ax, (panel, pts) in zip(axes[0], points.items()):
        for i, name in enumerate(dict.fromkeys(labels)):
            sel = labels == name
            ax.scatter(pts[sel, 0], pts[sel, 1], s=8, color=_color(name, i), label=name, alpha=0.75)
        ax.set_title(panel, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def heatmap(
    values: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
) -> Figure:
    """A labelled heatmap with the value written in every cell (size matrix, layer-pair grids)."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(col_labels), 1 + 0.45 * len(row_labels)))
    im = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    if values.size <= 400:
        for (r, c), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=6, color="white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
