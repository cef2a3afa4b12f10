"""What a transfer job reports: summary.md and the frontier figure, from its results.json alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from contrans_tl.plotting import frontier, save_figure

__all__ = ["summary_markdown", "plot_frontier", "fmt"]


def fmt(x: Any, digits: int = 2) -> str:
    """A number for a table ("–" for None / NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and (abs(x) >= 1e4 or (0 < abs(x) < 10 ** -(digits + 1))):
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def _ci(pair: Any) -> str:
    return "–" if not pair or pair[0] is None else f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def _acc(cell: dict[str, Any] | None) -> str:
    """Token / Logit Acc with their Wilson intervals."""
    if not cell:
        return "–"
    return f"{fmt(cell['token_acc'])} {_ci(cell['token_ci95'])} / {fmt(cell['logit_acc'])} {_ci(cell['logit_ci95'])}"


def _p(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3f}" if x >= 0.001 else "<0.001")


def operating_table(result: dict[str, Any], key: str) -> list[str]:
    """The table at the operating point: every condition on the same test items, with intervals and p-values."""
    op = result["operating_point"]["concepts"]
    lines = [f"| {key} | alpha | KL (nats/tok) | ppl × | unsteered T / L | transplanted T / L | native, same alpha T / L "
             "| native at equal KL (score) | random at equal KL (score, points) | prompting T / L | p vs unsteered (Holm) "
             "| p vs random (Holm) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, t in result["table"].items():
        tests = result["tests"].get(c, {})
        rnd = t.get("random_at_kl") or {}
        nat = (t.get("native_at_kl") or {}).get(result["selection"]["metric"])
        lines.append(
            f"| {c} | {fmt(op[c]['alpha'], 4)} | {fmt(op[c]['kl'], 3)} | {fmt(op[c].get('ppl_ratio'))} | {_acc(t['baseline'])} | "
            f"{_acc(t.get('mapped'))} | {_acc(t.get('native_same_alpha'))} | {fmt(nat)} | "
            f"{fmt(rnd.get('score'))} {_ci(rnd.get('ci95'))} ({rnd.get('points', 0)}) | {_acc(t.get('prompting'))} | "
            f"{_p(tests.get('vs_baseline_p'))} ({_p(tests.get('vs_baseline_p_holm'))}) | "
            f"{_p(tests.get('vs_random_p'))} ({_p(tests.get('vs_random_p_holm'))}) |")
    return lines


def summary_markdown(result: dict[str, Any], *, key: str = "concept", title: str | None = None) -> str:
    """summary.md: what was measured, the operating point with its tests, transfer efficiency, the grid."""
    src, tgt = result["source"], result["target"]
    sel, op, te = result["selection"], result["operating_point"], result["transfer_efficiency"]
    goals = result["goals"]
    lines = [
        f"# {title or 'Concept transplantation'}: {src['name']} → {tgt['name']}",
        "",
        f"Models: source `{src['name']}` — {src['weights']}; target `{tgt['name']}` — {tgt['weights']}.",
        "",
        f"Fluency instrument: {result['fluency']['what']}; {result['fluency']['n_texts']} texts, "
        f"{result['fluency']['n_tokens']} tokens per measurement, bootstrap intervals over texts.",
        "",
        f"**Operating point** (chosen on validation items only): target layer(s) {op['layers']}, KL bound "
        f"{op['kl_bound']} nats/token, alpha per {key} in norm units. {sel['how']}",
        "",
        f"**Transfer efficiency** (test items, {te['metric']} score, KL {te['kl_range'][0]}–{te['kl_range'][1]} "
        f"nats/token): **{fmt(te['value'])}** 95 % CI {_ci(te['ci95'])} — the transplanted vectors' gain over the "
        f"unsteered model divided by the target's own vectors' gain at equal KL (Logit Acc "
        f"{fmt(te['by_metric']['logit']['value'])}, Token Acc {fmt(te['by_metric']['token']['value'])}; validation "
        f"{fmt(result['transfer_efficiency_validation']['value'])}).",
        "",
        f"Significant on test items (Holm-adjusted p < {goals['targets']['alpha']}): above the unsteered model "
        f"{goals['significant']['vs_baseline']} of {goals['n_concepts']}, above the random directions at equal KL "
        f"{goals['significant']['vs_random']} of {goals['n_concepts']}.",
        "",
        "At the operating point, test items (T / L = Token Acc / Logit Acc with 95 % Wilson intervals; scores are each "
        f"item's {sel['metric']} outcome averaged; p: paired sign-flip permutation test on the same items):",
        "",
        *operating_table(result, key),
        "",
        f"Random directions: {result['config']['n_random']} per {key}, each scored on every {key}'s items at "
        f"{result['config']['random_points']} alpha(s) of the grid {', '.join(fmt(a, 4) for a in result['random_grid']['alphas'])} "
        f"(centred where a probe direction reaches the KL bound: alpha {result['random_grid']['probe']['alpha']} cost "
        f"KL {fmt(result['random_grid']['probe']['kl'], 3)}); compared at equal KL, never at equal alpha.",
        "",
        "Validation grid of the chosen layer (mapped vectors: alpha → KL, validation score; * = within the bound):",
        "",
    ]
    chosen = sel["per_layer"]["-".join(map(str, op["layers"]))]["concepts"]
    for c, o in chosen.items():
        cells = ", ".join(f"{fmt(g['alpha'], 3)}→{fmt(g['kl'], 3)}{'*' if g['allowed'] else ''} "
                          f"({fmt(g.get('validation_score'))})" for g in o["grid"])
        lines.append(f"- {c}: {cells}")
    lines += ["", "Layers compared on validation: " + ", ".join(
        f"{v['layers']}: {fmt(v['mean_validation_score'], 3)}" for v in sel["per_layer"].values()), ""]
    lines.append(f"Map: {result['map'].get('estimator', 'ridge')} on {(result['map'].get('corpus') or {}).get('spec', '?')}, "
                 f"pairs {result['map']['pairs']}, held-out R² {result['map']['r2_heldout']}.")
    lines.append(f"Saved vectors (ready for `contrans export --unit norm`): {', '.join(result['artifacts'].values())}.")
    return "\n".join(lines) + "\n"


def plot_frontier(result: dict[str, Any], out: str | Path, *, key: str = "concept") -> list[Path]:
    """figures/frontier.png/.pdf (test items) and figures/frontier_validation.png/.pdf."""
    paths: list[Path] = []
    ops = result["operating_point"]["concepts"]
    for split, stem in (("test", "frontier"), ("validation", "frontier_validation")):
        fig = frontier(result["frontier"], key=key, split=split, kl_bound=result["operating_point"]["kl_bound"],
                       operating=ops, title=f"{result['source']['name']} → {result['target']['name']}: accuracy "
                       f"against KL on generic text ({split} items)")
        paths += save_figure(fig, Path(out) / "figures" / stem)
    return paths
