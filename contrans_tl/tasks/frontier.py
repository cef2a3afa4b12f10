"""The accuracy–fluency frontier: how much a direction moves a concept per unit of damage to ordinary text.

Numbers only (the scorers that fill it are :mod:`contrans_tl.tasks.concept` and
:mod:`contrans_tl.fluency`). A direction's :class:`Curve` is its accuracy on a set of items at
every alpha of a grid, against the KL each alpha costs on generic text, with the unsteered
model at KL 0. On it:

* :func:`curve_at` reads a curve at given KLs (piecewise linear: in KL from the baseline to the
  first point, in log KL between points; never extrapolated past the last finite point);
* :func:`transfer_efficiency` — the mapped vectors' accuracy gain over the baseline divided by
  the native vectors' gain, at equal KL, averaged over a stated KL range, with a bootstrap
  interval over items (pooled over concepts: Σ mapped gain / Σ native gain);
* :func:`choose_operating_point` — per concept, the alpha with the best *validation* score among
  those within a KL bound (ties: the weaker alpha);
* :func:`random_at` — the random directions' per-item scores at one KL, from their own points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Literal, Mapping, Sequence

import numpy as np

from contrans_tl import validate
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.tasks.concept import ItemScores
from contrans_tl.tasks.selection import choose_within_bound

__all__ = ["Metric", "METRICS", "item_values", "Point", "Curve", "curve_at", "transfer_efficiency",
           "choose_operating_point", "random_at", "geometric_grid"]

Metric = Literal["both", "logit", "token"]
METRICS: tuple[str, ...] = ("both", "logit", "token")
"""What a frontier scores: "both" (each item's mean of its Token and Logit outcome), "logit" or "token"."""


def item_values(scores: ItemScores, metric: Metric) -> np.ndarray:
    """Each item's value under ``metric`` (0/1, or 0/0.5/1 for "both")."""
    validate.choice("metric", metric, METRICS)
    logit = np.asarray(scores.logit, dtype=np.float64)
    token = np.asarray(scores.token, dtype=np.float64)
    return {"both": (logit + token) / 2, "logit": logit, "token": token}[metric]


def geometric_grid(start: float, ratio: float, n: int) -> tuple[float, ...]:
    """``n`` strengths ``start · ratio^k`` (rounded to 4 significant digits, so grids read and key well)."""
    if not (start > 0 and ratio > 1 and n >= 1):
        raise InvalidArgumentError("grid", (start, ratio, n), "start > 0, ratio > 1 and n >= 1")
    return tuple(float(f"{start * ratio**k:.4g}") for k in range(n))


@dataclass(frozen=True)
class Point:
    """One alpha of one direction: the KL it costs on generic text and its per-item outcomes."""

    alpha: float
    kl: float
    scores: ItemScores


@dataclass(frozen=True)
class Curve:
    """A direction's points (any order; read in alpha order) and the unsteered outcomes on the same items."""

    baseline: ItemScores
    points: tuple[Point, ...]

    def ordered(self) -> tuple[np.ndarray, list[ItemScores]]:
        """KL of the baseline then each point in alpha order, made non-decreasing (a later alpha never
        reads as cheaper than an earlier one), and the outcomes in the same order."""
        pts = sorted(self.points, key=lambda p: p.alpha)
        kl = np.maximum.accumulate(np.array([0.0] + [p.kl for p in pts], dtype=np.float64))
        return kl, [self.baseline] + [p.scores for p in pts]


def _weights(kl: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """Interpolation weights [target, point] over a curve's KLs (row of NaN: target past its last finite point).

    A KL the curve reaches at several alphas (a plateau of :meth:`Curve.ordered`) reads the last of them.
    """
    out = np.full((len(targets), len(kl)), np.nan)
    finite = np.isfinite(kl)
    reach = kl[finite][-1] if finite.any() else -np.inf
    for t, target in enumerate(targets):
        if not 0 <= target <= reach:
            continue
        row = np.zeros(len(kl))
        j = int(np.searchsorted(kl, target, side="right"))  # first point beyond the target
        if kl[j - 1] == target:
            row[j - 1] = 1.0
        else:
            lo, hi = kl[j - 1], kl[j]
            w = target / hi if lo <= 0 else (math.log(target) - math.log(lo)) / (math.log(hi) - math.log(lo))
            row[j - 1], row[j] = 1 - w, w
        out[t] = row
    return out


def curve_at(curve: Curve, kls: Sequence[float], metric: Metric = "both") -> np.ndarray:
    """The curve's accuracy at each KL in ``kls`` (NaN past its last point)."""
    kl, scores = curve.ordered()
    acc = np.array([item_values(s, metric).mean() for s in scores])
    return _weights(kl, kls) @ acc


def _gain_matrix(curve: Curve, kls: Sequence[float], metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the gain over the baseline read at each KL: weights [kl, point] and values [point, item]."""
    kl, scores = curve.ordered()
    values = np.stack([item_values(s, metric) for s in scores])
    return _weights(kl, kls), values - values[0]


def transfer_efficiency(
    pairs: Mapping[str, tuple[Curve, Curve]],
    kl_range: tuple[float, float],
    *,
    metric: Metric = "both",
    n_kl: int = 16,
    n_boot: int = 2000,
    seed: int = 0,
    item_ids: Mapping[str, Sequence[Hashable]] | None = None,
) -> dict[str, object]:
    """Mapped gain ÷ native gain at equal KL over ``kl_range``, per concept and pooled, with a bootstrap interval.

    ``pairs[concept] = (mapped curve, native curve)`` on the same items (test items, say). At
    ``n_kl`` log-spaced KLs in the range, each curve is read (:func:`curve_at`); a KL past either
    curve's last point is left out for that concept. The pooled value is Σ mapped gain / Σ native
    gain over concepts and KLs. The interval resamples items with replacement, the same draw for
    both curves (the comparison stays paired); with ``item_ids`` (per concept, an id per item) the
    draw is over distinct ids shared by every concept, so an item that several concepts score (an
    emotion scenario is a negative of five emotions) is drawn once for all of them.
    """
    lo, hi = kl_range
    if not 0 < lo < hi:
        raise InvalidArgumentError("kl_range", kl_range, "0 < low < high (nats/token)")
    validate.integer("n_boot", n_boot, low=1)
    targets = list(np.geomspace(lo, hi, n_kl))
    per: dict[str, dict[str, object]] = {}
    gains: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (mapped, native) in pairs.items():
        wm, gm = _gain_matrix(mapped, targets, metric)
        wn, gn = _gain_matrix(native, targets, metric)
        if gm.shape[1] != gn.shape[1]:
            raise InvalidArgumentError("pairs", name, "mapped and native curves scored on the same items")
        keep = ~(np.isnan(wm).any(1) | np.isnan(wn).any(1))
        per[name] = {"n_kl": int(keep.sum()), "reached_kl": [float(targets[i]) for i in np.flatnonzero(keep)[[0, -1]]]
                     if keep.any() else None, "value": None}
        if keep.any():
            gains[name] = ((wm[keep] @ gm).sum(0), (wn[keep] @ gn).sum(0))  # per item: summed gain over the kept KLs
            cm, cn = float(gains[name][0].mean()), float(gains[name][1].mean())
            per[name].update(mapped_gain=cm / keep.sum(), native_gain=cn / keep.sum(),
                             value=cm / cn if abs(cn) > 1e-12 else None)
    num = sum(float(m.mean()) for m, _ in gains.values())
    den = sum(float(n.mean()) for _, n in gains.values())
    value = num / den if gains and abs(den) > 1e-12 else None
    ci = _bootstrap_ratio(gains, item_ids, n_boot, seed) if value is not None else None
    return {"value": value, "ci95": ci, "kl_range": [lo, hi], "metric": metric, "n_kl": n_kl, "per_concept": per,
            "how": "Σ over concepts and log-spaced KLs of (mapped − unsteered) ÷ Σ of (native − unsteered), the curves "
                   "read at equal KL; 95 % interval: percentiles of 2,000 bootstrap resamples of the items (paired)"}


def _bootstrap_ratio(gains: Mapping[str, tuple[np.ndarray, np.ndarray]], item_ids: Mapping[str, Sequence[Hashable]] | None,
                     n_boot: int, seed: int) -> list[float]:
    """Percentile interval of Σ mean mapped gain / Σ mean native gain over resamples of the items."""
    rng = np.random.default_rng(seed)
    ids = {c: list(item_ids[c]) if item_ids is not None else [(c, i) for i in range(len(m))] for c, (m, _) in gains.items()}
    universe = list(dict.fromkeys(x for c in gains for x in ids[c]))
    index = {x: k for k, x in enumerate(universe)}
    draws = rng.integers(0, len(universe), size=(n_boot, len(universe)))
    counts = np.zeros((n_boot, len(universe)))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)  # how often each distinct item is drawn
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    for c, (m, n) in gains.items():
        w = counts[:, [index[x] for x in ids[c]]]  # [boot, item]
        total = np.maximum(w.sum(1), 1e-12)
        num += (w @ m) / total
        den += (w @ n) / total
    ratios = np.where(np.abs(den) > 1e-12, num / np.where(den == 0, 1, den), np.nan)
    return [float(x) for x in np.nanpercentile(ratios, [2.5, 97.5])]


def choose_operating_point(points: Sequence[Point], baseline: ItemScores, *, kl_bound: float,
                           metric: Metric = "both") -> dict[str, object]:
    """The alpha with the best validation score among points with KL ≤ ``kl_bound`` (ties: the weaker alpha),
    through :func:`~contrans_tl.tasks.selection.choose_within_bound` (the one bounded choice of the library).

    ``points`` carry validation outcomes. When no alpha is within the bound the operating point is
    alpha 0 (the unsteered model), said in ``within_bound``.
    """
    by_alpha = {p.alpha: p for p in points}
    base = float(item_values(baseline, metric).mean())
    grid = [{"alpha": p.alpha, "kl": p.kl, "allowed": p.kl <= kl_bound,
             "validation_score": float(item_values(p.scores, metric).mean())} for p in points]
    if not points:
        raise InvalidArgumentError("points", points, "the validation points of at least one alpha")
    if not any(p.kl <= kl_bound for p in points):  # nothing within the bound: the unsteered model
        return {"alpha": 0.0, "kl": 0.0, "validation_score": base, "validation_baseline": base, "within_bound": False,
                "grid": grid}
    best, _ = choose_within_bound(list(by_alpha), lambda a: by_alpha[a].kl,
                                  lambda a: float(item_values(by_alpha[a].scores, metric).mean()),
                                  limit=kl_bound, cost=abs)
    chosen = by_alpha[best]
    return {"alpha": chosen.alpha, "kl": chosen.kl, "validation_score": float(item_values(chosen.scores, metric).mean()),
            "validation_baseline": base, "within_bound": True, "grid": grid}


def random_at(points: Sequence[Point], kl: float, *, metric: Metric = "both", window: float = 2.25) -> tuple[np.ndarray, int]:
    """Per-item scores of the random directions at ``kl``: every random point whose own KL lies within a factor
    ``window`` of it, weighted by closeness in log KL (triangular kernel). Returns (scores, points used);
    (empty, 0) when no random point is that close."""
    if kl <= 0:
        raise InvalidArgumentError("kl", kl, "a KL > 0 (the operating point's)")
    near = [(p, 1 - abs(math.log(p.kl / kl)) / math.log(window)) for p in points
            if 0 < p.kl < math.inf and abs(math.log(p.kl / kl)) < math.log(window)]
    if not near:
        return np.array([]), 0
    total = sum(w for _, w in near)
    return sum(w * item_values(p.scores, metric) for p, w in near) / total, len(near)
