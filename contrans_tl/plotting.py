"""Matplotlib figures from result objects. The only module of the library that imports matplotlib.

Each function takes plain results (dicts/arrays as the analyses write them) and returns a
Figure; :func:`save_figure` writes PNG and PDF side by side.
"""

from __future__ import annotations

from pathlib import Path
import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from contrans_tl.files import atomic_path

__all__ = [
    "save_figure",
    "frontier",
    "accuracy_vs_alpha",
    "accuracy_vs_examples",
    "pca_before_after",
    "embedding_2d",
    "heatmap",
    "accuracy_vs_training",
    "token_shift_bars",
    "transfer_report",
    "layer_search",
]

EMOTION_COLORS = {
    "happiness": "#f2b701",
    "sadness": "#3969ac",
    "anger": "#e73f74",
    "fear": "#7f3c8d",
    "disgust": "#11a579",
    "surprise": "#e68310",
}


def _color(name: str, i: int) -> Any:
    return EMOTION_COLORS.get(name, colormaps["tab10"](i % 10))


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """A Figure with a grid of axes, made without pyplot: no backend is chosen and no global
    figure list grows, so importing or calling this module leaves a notebook's matplotlib as it was."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf``; returns both paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in out:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:], dpi=150, bbox_inches="tight")
    return out


def _band(xs: np.ndarray, ys: np.ndarray, n_bins: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bin centres (geometric), mean and the 10–90 % range of ``ys`` in log-spaced bins of ``xs`` (> 0)."""
    edges = np.geomspace(xs.min(), xs.max() * 1.0001, n_bins + 1)
    centre, mean, low, high = [], [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        inside = ys[(xs >= a) & (xs < b)]
        if len(inside):
            centre.append(math.sqrt(a * b))
            mean.append(inside.mean())
            low.append(np.percentile(inside, 10))
            high.append(np.percentile(inside, 90))
    return np.array(centre), np.array(mean), np.array(low), np.array(high)


def frontier(
    rows: Sequence[Mapping[str, Any]],
    *,
    key: str = "concept",
    split: str = "test",
    kl_bound: float | None = None,
    operating: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "",
) -> Figure:
    """Accuracy against KL on generic text, one column per concept, Logit Acc above Token Acc.

    Mapped and native vectors are lines over their alpha grids; random directions are points
    with a 10–90 % band over log-KL bins; the unsteered model is a dotted line, the KL bound a
    vertical line and the operating point a star. KL 0 (unsteered) cannot sit on a log axis, so
    the baseline is drawn across the panel instead.
    """
    rows = [r for r in rows if r.get("split") == split]
    names = list(dict.fromkeys(r[key] for r in rows))
    fig, axes = _subplots(2, max(1, len(names)), figsize=(2.6 * max(1, len(names)) + 0.6, 5.6), squeeze=False,
                          sharey="row")
    styles = {"mapped": ("#d62728", "-o", "mapped (transplanted)"), "native": ("#1f77b4", "-s", "native (target's own)")}
    for j, name in enumerate(names):
        mine = [r for r in rows if r[key] == name]
        for i, metric in enumerate(("logit_acc", "token_acc")):
            ax = axes[i][j]
            base = [r[metric] for r in mine if r["condition"] == "baseline"]
            if base:
                ax.axhline(base[0], color="0.4", ls=":", lw=1, label="unsteered")
            rnd = [(r["kl"], r[metric]) for r in mine if r["condition"] == "random" and r["kl"]]
            if rnd:
                xs, ys = np.array([x for x, _ in rnd]), np.array([y for _, y in rnd])
                ax.scatter(xs, ys, s=7, color="0.55", alpha=0.5, lw=0, label="random directions")
                if len(xs) >= 4:
                    c, m, lo, hi = _band(xs, ys)
                    ax.fill_between(c, lo, hi, color="0.6", alpha=0.25, lw=0)
                    ax.plot(c, m, color="0.45", lw=1)
            for cond, (color, style, label) in styles.items():
                pts = sorted((r["alpha"], r["kl"], r[metric]) for r in mine if r["condition"] == cond and r["kl"])
                if pts:
                    ax.plot([p[1] for p in pts], [p[2] for p in pts], style, color=color, ms=3.5, lw=1.3, label=label)
            prompt = [r[metric] for r in mine if r["condition"] == "prompting"]
            if prompt:
                ax.axhline(prompt[0], color="#2ca02c", ls="--", lw=1, label="prompting (no steering)")
            if kl_bound is not None:
                ax.axvline(kl_bound, color="k", lw=0.8, alpha=0.6)
            if operating is not None and name in operating and operating[name].get("alpha"):
                alpha = operating[name]["alpha"]
                hit = [r for r in mine if r["condition"] == "mapped" and r["alpha"] == alpha and r["kl"]]
                if hit:
                    ax.plot(hit[0]["kl"], hit[0][metric], "*", color="k", ms=11, zorder=5, label="operating point")
            ax.set_xscale("log")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(name)
            else:
                ax.set_xlabel("KL to unsteered, nats/token")
            if j == 0:
                ax.set_ylabel("Logit Acc" if metric == "logit_acc" else "Token Acc")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title or f"Accuracy against fluency cost ({split} items)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


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
    fig, axes = _subplots(1, len(names), figsize=(2.6 * len(names), 2.8), sharey=True, squeeze=False)
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
    fig, ax = _subplots(figsize=(4.2, 3))
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
    fig, axes = _subplots(1, 2, figsize=(8, 3.6), sharex=True, sharey=True)
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
    fig, axes = _subplots(1, len(points), figsize=(3.4 * len(points), 3.2), squeeze=False)
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
    fig, ax = _subplots(figsize=(max(4.5, 2.5 + 1.0 * len(col_labels)), max(3.0, 1.8 + 0.55 * len(row_labels))))
    im = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    if values.size <= 400:
        for (r, c), v in np.ndenumerate(values):
            if np.isfinite(v):  # dark text on light cells, light on dark, by the cell colour's luminance
                red, green, blue, _ = im.cmap(im.norm(v))
                light = 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.5
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=8,
                        color="black" if light else "white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def accuracy_vs_training(
    x: Sequence[float],
    baseline: Mapping[str, Sequence[float]],
    transplanted: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    xlabel: str = "training tokens",
    tick_labels: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Fig 3: baseline and transplanted accuracy against training progress, one panel per metric.

    ``baseline[metric]`` is a curve over ``x``; ``transplanted[metric][alpha]`` one per alpha.
    With ``tick_labels`` the x axis is categorical (checkpoints whose token count is unknown).
    """
    xs = np.asarray(x, dtype=float)
    fig, axes = _subplots(1, len(baseline), figsize=(4 * len(baseline), 3.2), sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], baseline):
        ax.plot(xs, baseline[metric], "o--", color="grey", label="baseline")
        for i, (alpha, curve) in enumerate(transplanted[metric].items()):
            ax.plot(xs, curve, "o-", color=colormaps["tab10"](i), label=f"transplanted (alpha {alpha})")
        if tick_labels is not None:
            ax.set_xticks(xs, list(tick_labels), rotation=45, ha="right", fontsize=7)
        elif xs.min() > 0 and xs.max() / xs.min() > 100:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(metric, fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("mean accuracy on negatives")
    axes[0][-1].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def token_shift_bars(
    rising: Mapping[str, Sequence[tuple[str, int]]],
    *,
    native: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    n_prompts: int,
    title: str = "",
) -> Figure:
    """Table 8 as bars: per emotion, how many prompts put each token among the top risers.

    ``rising[emotion]`` lists (token, count) best first; ``native`` (same shape) marks the
    counts of the natively refined vector with a tick for comparison.
    """
    fig, axes = _subplots(1, len(rising), figsize=(2.4 * len(rising), 3.0), squeeze=False)
    for i, (ax, (emotion, pairs)) in enumerate(zip(axes[0], rising.items())):
        pairs = list(pairs)[::-1]
        labels = [t for t, _ in pairs]
        ax.barh(range(len(pairs)), [n for _, n in pairs], color=_color(emotion, i), alpha=0.8, label="transplanted")
        own = dict(native.get(emotion, [])) if native else {}
        if own:
            ax.plot([own.get(t, 0) for t in labels], range(len(pairs)), "k|", markersize=8, label="native")
        ax.set_yticks(range(len(pairs)), labels, fontsize=6)
        ax.set_xlim(0, n_prompts)
        ax.set_title(emotion, fontsize=8)
        ax.set_xlabel("prompts", fontsize=7)
    axes[0][-1].legend(fontsize=5, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig

def transfer_report(report: Any) -> Figure:
    """A :class:`~contrans_tl.reports.transfer.TransferReport` (or its dict). Left: held-out R² and
    cosine(mapped, native) per target layer. Right: causal effects and ratios."""
    rep = report.to_dict() if hasattr(report, "to_dict") else report
    pairs = rep["pairs"]
    t = [p["target_layer"] for p in pairs]
    has_causal = rep.get("combined") is not None
    fig, axes = _subplots(1, 2 if has_causal else 1, figsize=(10 if has_causal else 5, 3.4), squeeze=False)
    ax = axes[0][0]
    ax.plot(t, [p["r2_heldout"] for p in pairs], "o-", label="held-out R² of the map")
    ax.plot(t, [p["cosine"] for p in pairs], "s-", label="cos(mapped, native)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("target layer")
    ax.set_xticks(t, [f"{p['target_layer']}\n←{p['source_layer']}" for p in pairs], fontsize=6)
    ax.set_ylim(min(-0.1, min(p["cosine"] for p in pairs) - 0.05), 1.02)
    ax.legend(fontsize=7)
    ax.set_title("geometry", fontsize=9)
    if has_causal:
        rows = [("all", rep["combined"])] + [(str(r["target_layer"]), r) for r in rep["per_layer"]]
        ax = axes[0][1]
        x = range(len(rows))
        w = 0.38
        ax.bar([i - w / 2 for i in x], [r["effect_native"] for _, r in rows], w, label="native (matched norm)")
        ax.bar([i + w / 2 for i in x], [r["effect_mapped"] for _, r in rows], w, label="transplanted")
        for i, (_, r) in enumerate(rows):
            ratio = r["causal_ratio"]
            top = max(r["effect_native"], r["effect_mapped"], 0)
            label = "n/a" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}"
            ax.text(i, top, label, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [name for name, _ in rows], fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("steered target layers")
        ax.set_ylabel(f"effect on {rep.get('metric_name') or 'metric'}")
        one = {r.get("alpha", rep["alpha"]) for r in rep["per_layer"]}
        strength = f"alpha {rep['alpha']:g} ({rep['unit']})"
        if one and one != {rep["alpha"]}:
            strength += f", one layer: {', '.join(f'{a:g}' for a in sorted(one))}"
        ax.set_title(f"causal effect, causal ratio on top; {strength}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{rep['source']} → {rep['target']}: {rep['concept']}", fontsize=10)
    fig.tight_layout()
    return fig


def layer_search(search: Any) -> Figure:
    """A :class:`~contrans_tl.reports.layer_search.LayerPairSearch` as heatmaps over the layer grid:
    held-out R², the logit-lens proxy and the combined score (best three pairs framed)."""
    panels = [("held-out R²", search.r2, "viridis")]
    if search.proxy is not None:
        panels.append(("logit-lens proxy cos(v̂, readout)", search.proxy, "coolwarm"))
        panels.append(("score = R²⁺ · proxy⁺", search.score, "magma"))
    width = 2.0 + 0.4 * len(search.target_layers)
    height = 1.0 + 0.3 * len(search.source_layers)
    fig, axes = _subplots(len(panels), 1, figsize=(width, height * len(panels)), squeeze=False)
    best = {(p["source_layer"], p["target_layer"]) for p in search.best_pairs(3)}
    for ax, (title, values, cmap) in zip(axes[:, 0], panels):
        arr = np.asarray(values, dtype=float)
        kw = {}
        if cmap == "coolwarm":
            lim = float(np.nanmax(np.abs(arr))) or 1.0
            kw = {"vmin": -lim, "vmax": lim}
        elif cmap == "viridis":
            kw = {"vmin": max(0.0, float(np.nanmin(arr))), "vmax": 1.0}
        im = ax.imshow(arr, cmap=cmap, aspect="auto", **kw)
        ax.set_xticks(range(len(search.target_layers)), search.target_layers, fontsize=6)
        ax.set_yticks(range(len(search.source_layers)), search.source_layers, fontsize=6)
        for i, s in enumerate(search.source_layers):
            for j, t in enumerate(search.target_layers):
                if cmap == "viridis" and arr.size <= 600:
                    ax.text(j, i, f"{arr[i, j]:.2f}" if abs(arr[i, j]) < 10 else f"{arr[i, j]:.0f}",
                            ha="center", va="center", fontsize=4.5, color="white" if arr[i, j] < 0.6 else "black")
                if (s, t) in best:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="white", lw=1.5))
        ax.set_xlabel(f"target layer ({search.target})", fontsize=8)
        if cmap == "viridis" and float(np.nanmin(arr)) < 0:
            title += f" (colour clipped at 0; min {float(np.nanmin(arr)):.2f})"
        ax.set_ylabel(f"source layer ({search.source})", fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
