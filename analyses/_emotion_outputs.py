"""What the emotion demo reports from its cells: the headline rows, the summary.md text and the data of Fig 7/8."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["headline", "summary_markdown", "hidden_state_panels"]


def headline(results: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Per emotion: baseline, transplanted, random and native at the chosen alpha."""
    a_key = f"{alpha:g}"
    return {
        e: {
            "baseline": res["mapped"]["0"]["negatives"],
            "transplanted": res["mapped"][a_key]["negatives"],
            "random": res["random"].get(a_key, {}).get("negatives"),
            "native": res["native"][a_key]["negatives"],
            "positives_baseline": res["mapped"]["0"]["positives"],
            "positives_transplanted": res["mapped"][a_key]["positives"],
        }
        for e, res in results.items()
    }


def summary_markdown(result: dict[str, Any]) -> str:
    """A short markdown report: the headline table and how layer/alpha were chosen."""
    lines = [
        f"# Emotion transplantation: {result['source']['name']} → {result['target']['name']}",
        "",
        f"Transplanted at target layer(s) {result['layers']} with alpha = {result['alpha']:g} "
        f"({result['unit']} units), chosen on the refinement half: {result['selection']['how']}.",
        "",
        "Accuracy on held-out **negatives** (scenarios of the other five emotions): the rate at which "
        "the target answers the transplanted emotion. Token Acc / Logit Acc.",
        "",
        "| emotion | baseline (α=0) | transplanted | random (same norm) | native vector | cos(mapped, native) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(m: dict[str, float] | None) -> str:
        return "—" if m is None else f"{m['token_acc']:.2f} / {m['logit_acc']:.2f}"

    for e, h in result["headline"].items():
        lines.append(f"| {e} | {cell(h['baseline'])} | {cell(h['transplanted'])} | {cell(h['random'])} | "
                     f"{cell(h['native'])} | {result['cosine_mapped_native'][e]:.2f} |")
    mean = {k: sum(h[k]["logit_acc"] for h in result["headline"].values() if h[k]) / len(result["headline"])
            for k in ("baseline", "transplanted", "native")}
    noise = [e for e, h in result["headline"].items()
             if h["random"] is not None and h["random"]["logit_acc"] >= h["transplanted"]["logit_acc"]]
    lines += [
        "",
        f"Mean Logit Acc on negatives: baseline {mean['baseline']:.2f}, transplanted {mean['transplanted']:.2f}, "
        f"native {mean['native']:.2f}.",
    ]
    if noise:
        lines += ["", f"Not separable from the random control (random Logit Acc >= transplanted): {', '.join(noise)}."]
    lines += ["", "On **positives** (the emotion's own scenarios), Token / Logit Acc baseline → transplanted:", ""]
    for e, h in result["headline"].items():
        lines.append(f"- {e}: {cell(h['positives_baseline'])} → {cell(h['positives_transplanted'])}")
    r2 = result["map"]["r2_heldout"]
    lines += ["", f"Affine map: held-out R² from {min(r2):.2f} to {max(r2):.2f} over {len(r2)} layer pairs "
              f"({result['map'].get('n_train_samples')} word-aligned training samples).",
              f"Run time: {result['seconds']} s."]
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
