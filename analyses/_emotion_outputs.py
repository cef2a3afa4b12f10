"""What the emotion demo reports from its cells: the headline rows, summary.md, and its figures (Fig 2a, 2b, 5, 7/8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrans_tl.metrics import accuracy_interval

__all__ = ["headline", "confusion", "measurability", "goals", "summary_markdown", "hidden_state_panels", "plot"]


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


def confusion(results: dict[str, Any], alpha: float) -> dict[str, Any]:
    """The 6×6 transplant matrices at ``alpha``: row = emotion transplanted, column = label that won
    among the six on that emotion's held-out negatives (counts), per condition, with the diagonal share.

    The diagonal is each row's Logit Acc; the off-diagonal says where a push that misses lands (a
    vector that makes every scenario "surprised" is a push, not a concept).
    """
    a_key = f"{alpha:g}"
    rows = {
        "baseline": {e: res["mapped"]["0"]["negatives"] for e, res in results.items()},
        "transplanted": {e: res["mapped"][a_key]["negatives"] for e, res in results.items()},
        "native": {e: res["native"][a_key]["negatives"] for e, res in results.items()},
        "random": {e: res["random"][a_key]["negatives"] for e, res in results.items() if a_key in res["random"]},
    }
    out: dict[str, Any] = {}
    for cond, per in rows.items():
        if not per or any("label_counts" not in m for m in per.values()):
            continue  # cells from a run before label counts were kept
        counts = {e: m["label_counts"] for e, m in per.items()}
        total = sum(sum(c.values()) for c in counts.values())
        out[cond] = {"counts": counts, "diagonal_share": sum(c[e] for e, c in counts.items()) / total if total else None}
    return out


def _ci(metrics: dict[str, Any], n: int) -> tuple[float, float]:
    return accuracy_interval([(metrics["logit_acc"], n)])


def measurability(result: dict[str, Any]) -> dict[str, Any]:
    """Per emotion: Logit Acc with 95% Wilson intervals (transplanted, random over all seeds, baseline), and
    whether the transfer is *measurable*: the transplanted interval lies above both the random control's
    and the baseline's. An emotion whose random control reaches it is a push, not evidence."""
    alpha_key = f"{result['alpha']:g}"
    out: dict[str, Any] = {}
    for e, h in result["headline"].items():
        n = int(h["transplanted"]["n"])
        seeds = result["results"][e]["random"].get(alpha_key, {}).get("seeds", [])
        row = {"n": n, "transplanted": _ci(h["transplanted"], n), "baseline": _ci(h["baseline"], n),
               "native": _ci(h["native"], n)}
        if h["random"] is not None and seeds:
            row["random"] = _ci(h["random"], n * len(seeds))
        low = row["transplanted"][0]
        row["measurable"] = bool(low > row["baseline"][1] and ("random" not in row or low > row["random"][1]))
        out[e] = row
    return out


def goals(result: dict[str, Any], targets: dict[str, float]) -> dict[str, Any]:
    """The transfer against its targets at the chosen alpha: per emotion, how far the transplanted
    Token and Logit Acc lie above the larger of the baseline and the random control; the causal
    ratio (transplanted − baseline) / (native − baseline) of the mean accuracies; mean Token Acc."""
    per: dict[str, Any] = {}
    for e, h in result["headline"].items():
        row = {}
        for m in ("token_acc", "logit_acc"):
            floor = max(h["baseline"][m], h["random"][m] if h["random"] is not None else 0.0)
            row[f"{m}_margin"] = h["transplanted"][m] - floor
        per[e] = row
    n = len(per)

    def mean(cond: str, m: str) -> float:
        return sum(h[cond][m] for h in result["headline"].values()) / n

    ratios = {}
    for m in ("token_acc", "logit_acc"):
        gain = mean("native", m) - mean("baseline", m)
        ratios[m] = (mean("transplanted", m) - mean("baseline", m)) / gain if abs(gain) > 1e-9 else float("nan")
    return {
        "targets": targets,
        "per_emotion": per,
        "emotions_above_margin": {m: sum(r[f"{m}_margin"] >= targets["margin"] - 1e-9 for r in per.values())
                                  for m in ("token_acc", "logit_acc")},
        "n_emotions": n,
        "causal_ratio": ratios,
        "mean_token_acc": mean("transplanted", "token_acc"),
        "mean_logit_acc": mean("transplanted", "logit_acc"),
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
    meas = result.get("measurability")
    if meas:
        lines += ["", "Logit Acc with 95% Wilson intervals (random: all seeds pooled). *Measurable*: the transplanted "
                  "interval lies above both the baseline's and the random control's.", "",
                  "| emotion | n | baseline | transplanted | random | native | measurable |", "|---|---|---|---|---|---|---|"]

        def iv(row: dict[str, Any], key: str) -> str:
            return "—" if key not in row else f"[{row[key][0]:.2f}, {row[key][1]:.2f}]"

        for e, row in meas.items():
            lines.append(f"| {e} | {row['n']} | {iv(row, 'baseline')} | {iv(row, 'transplanted')} | {iv(row, 'random')} "
                         f"| {iv(row, 'native')} | {'yes' if row['measurable'] else '**no**'} |")
    conf = result.get("confusion", {})
    if "transplanted" in conf:
        labels = list(next(iter(conf["transplanted"]["counts"].values())))  # all six labels, steered or not
        lines += ["", f"Transplant matrix at alpha {result['alpha']:g}: row = emotion transplanted, column = label "
                  "that won among the six on its held-out negatives (counts); diagonal share "
                  + ", ".join(f"{c} {conf[c]['diagonal_share']:.2f}" for c in ("transplanted", "native", "random", "baseline")
                              if c in conf) + ".", "",
                  "| transplanted \\ answered | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for e, counts in conf["transplanted"]["counts"].items():
            lines.append(f"| {e} | " + " | ".join(f"**{counts[x]}**" if x == e else str(counts[x]) for x in labels) + " |")
    g = result.get("goals")
    if g:
        t = g["targets"]
        lines += ["", f"Against the targets at alpha {result['alpha']:g}: emotions at least {t['margin']:.2f} above both "
                  f"the baseline and the random control: Token Acc {g['emotions_above_margin']['token_acc']} of "
                  f"{g['n_emotions']}, Logit Acc {g['emotions_above_margin']['logit_acc']} of {g['n_emotions']}; causal "
                  f"ratio (transplanted − baseline) / (native − baseline): Token {g['causal_ratio']['token_acc']:.2f}, "
                  f"Logit {g['causal_ratio']['logit_acc']:.2f} (target {t['causal_ratio']}); mean Token Acc "
                  f"{g['mean_token_acc']:.2f} (target {t['mean_token_acc']})."]
    flu = result.get("fluency")
    if flu:
        alphas = list(next(iter(flu["mapped"].values())))
        lines += ["", f"Fluency: {flu['what']} (unsteered {flu['base_ppl']:.1f}; bound {flu['max_ppl_ratio']}×), "
                  f"at layer(s) {result['layers']}:", "",
                  "| emotion | " + " | ".join(f"mapped α={a}" for a in alphas) + f" | native α={result['alpha']:g} "
                  f"| random α={result['alpha']:g} |", "|---|" + "---|" * (len(alphas) + 2)]
        for e, row in flu["mapped"].items():
            lines.append(f"| {e} | " + " | ".join(f"{row[a]:.2f}" for a in alphas)
                         + f" | {flu['native'][e]:.2f} | {flu['random'][e]:.2f} |")
    samples = result.get("samples")
    if samples:
        lines += ["", f"Sample continuations (greedy, {samples['max_new_tokens']} tokens) at the chosen setting: after "
                  f"the evaluation prompt of one held-out negative, and after \"{samples['opener']}\":", "",
                  "| emotion | scenario | unsteered answer | transplanted answer | transplanted, neutral opener |",
                  "|---|---|---|---|---|"]

        def q(text: str) -> str:
            return "`" + text.replace("\n", " ⏎ ").replace("|", "/").replace("`", "'").strip() + "`"

        for e, row in samples["emotions"].items():
            lines.append(f"| {e} | {row['scenario'][:60]}… | {q(row['unsteered']['answer'])} | "
                         f"{q(row['transplanted']['answer'])} | {q(row['transplanted']['opener'])} |")
        first = next(iter(samples["emotions"].values()))
        lines += ["", f"Unsteered, neutral opener: {q(first['unsteered']['opener'])}"]
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


def plot(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Write Fig 2a, Fig 2b, Fig 5 and Fig 7/8 under ``out/figures``."""
    from contrans_tl import plotting

    out = Path(out)
    fig_dir = out / "figures"
    written: list[Path] = []
    alphas = result["alphas"]
    keys = [f"{a:g}" for a in alphas]
    res = result["results"]
    tok = {e: [res[e]["mapped"][k]["negatives"]["token_acc"] for k in keys] for e in res}
    log = {e: [res[e]["mapped"][k]["negatives"]["logit_acc"] for k in keys] for e in res}
    rnd = {e: [res[e]["mapped"]["0"]["negatives"]["logit_acc"] if k == "0" else
               res[e]["random"].get(k, {}).get("negatives", {}).get("logit_acc", float("nan")) for k in keys] for e in res}
    title = f"{result['source']['name']} → {result['target']['name']}, layer {result['layers']}"
    written += plotting.save_figure(plotting.accuracy_vs_alpha(alphas, tok, log, title=title, random_logit_acc=rnd),
                                    fig_dir / "fig2a_accuracy_vs_alpha")
    n_ex = result["n_examples"]
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
