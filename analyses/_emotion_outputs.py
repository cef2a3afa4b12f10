"""What the emotion demo reports beyond the transfer job's numbers: the transplant matrix, Fig 5, samples, figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrans_tl.analyses._transfer_outputs import fmt, plot_frontier

__all__ = ["confusion_table", "emotion_summary", "hidden_state_panels", "plot"]


def confusion_table(counts: dict[str, dict[str, dict[str, int]]]) -> dict[str, Any]:
    """The transplant matrices at the operating point: row = emotion transplanted, column = the label that scored
    best among the six on its test items (counts; a tie goes to the first label), per condition, with the diagonal
    share (the test items of all emotions pooled)."""
    out: dict[str, Any] = {}
    for cond, rows in counts.items():
        total = sum(sum(c.values()) for c in rows.values())
        out[cond] = {"counts": rows, "diagonal_share": sum(c[e] for e, c in rows.items()) / total if total else None}
    return out


def _quote(text: str) -> str:
    return "`" + text.replace("\n", " ⏎ ").replace("|", "/").replace("`", "'").strip() + "`"


def emotion_summary(result: dict[str, Any]) -> str:
    """The demo's own sections of summary.md: transplant matrix, Fig 5, sample continuations."""
    lines: list[str] = []
    conf = result.get("confusion", {})
    if "transplanted" in conf:
        labels = list(next(iter(conf["transplanted"]["counts"].values())))
        lines += ["", "Transplant matrix at the operating point (test items): row = emotion transplanted, column = the "
                  "label that won among the six (counts); diagonal share "
                  + ", ".join(f"{c} {fmt(conf[c]['diagonal_share'])}" for c in conf) + ".", "",
                  "| transplanted \\ answered | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for e, counts in conf["transplanted"]["counts"].items():
            lines.append(f"| {e} | " + " | ".join(f"**{counts[x]}**" if x == e else str(counts[x]) for x in labels) + " |")
    sizes = result.get("n_examples")
    if sizes:
        lines += ["", "Fig 5, refinement size (mapped vectors from the first n contrast pairs, test items at each "
                  "emotion's operating alpha), Token / Logit Acc:", ""]
        for e, row in sizes.items():
            lines.append(f"- {e}: " + ", ".join(f"n={n}: {fmt(m['token_acc'])} / {fmt(m['logit_acc'])}" for n, m in row.items()))
    samples = result.get("samples")
    if samples:
        lines += ["", f"Sample continuations (greedy, {samples['max_new_tokens']} tokens) at the operating point: after "
                  f"the prompt of one test item, and after \"{samples['opener']}\":", "",
                  "| emotion | scenario | unsteered answer | transplanted answer | transplanted, neutral opener |",
                  "|---|---|---|---|---|"]
        for e, row in samples["emotions"].items():
            lines.append(f"| {e} | {row['scenario'][:60]}… | {_quote(row['unsteered']['answer'])} | "
                         f"{_quote(row['transplanted']['answer'])} | {_quote(row['transplanted']['opener'])} |")
        first = next(iter(samples["emotions"].values()))
        lines += ["", f"Unsteered, neutral opener: {_quote(first['unsteered']['opener'])}"]
    return "\n".join(lines) + "\n"


def hidden_state_panels(states: dict[str, Any]) -> dict[str, np.ndarray]:
    """2-D PCA and t-SNE of the source's and the target's hidden states (Fig 7/8)."""
    from sklearn.manifold import TSNE

    panels: dict[str, np.ndarray] = {}
    for name, arr in (("source", states["source"].numpy()), ("target", states["before"].numpy())):
        centred = arr - arr.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        panels[f"{name} PCA"] = centred @ vt[:2].T
        perplexity = max(2, min(30, len(arr) // 4))
        panels[f"{name} t-SNE"] = TSNE(n_components=2, perplexity=perplexity, random_state=0,
                                       init="pca").fit_transform(centred)
    return panels


def plot(result: dict[str, Any], out: str | Path) -> list[Path]:
    """The frontier (test and validation items), Fig 5, Fig 2b and Fig 7/8 under ``out/figures``."""
    from contrans_tl import plotting

    out = Path(out)
    fig_dir = out / "figures"
    written = plot_frontier(result, out, key="emotion")
    title = f"{result['source']['name']} → {result['target']['name']}, layer {result['layers']}"
    n_ex = result.get("n_examples") or {}
    if n_ex:
        sizes = sorted({int(n) for e in n_ex for n in n_ex[e]})
        series = {e: [n_ex[e].get(str(n), {}).get("logit_acc", float("nan")) for n in sizes] for e in n_ex}
        written += plotting.save_figure(plotting.accuracy_vs_examples(sizes, series, title=title),
                                        fig_dir / "fig5_accuracy_vs_examples")
    states = torch.load(out / "states.pt")
    written += plotting.save_figure(
        plotting.pca_before_after(states["before"].numpy(), states["after"].numpy(), states["labels"],
                                  steered=states["steered"], title=f"target layer {states['target_layer']}"),
        fig_dir / "fig2b_pca_before_after")
    written += plotting.save_figure(plotting.embedding_2d(hidden_state_panels(states), states["labels"]),
                                    fig_dir / "fig7_8_hidden_states_2d")
    return written
