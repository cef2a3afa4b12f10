"""Choosing settings (alpha, layers) on validation data, never on the items reported.

:func:`selection_splits` makes seeded validation/test splits (or cross-fitted folds),
:func:`choose_best` picks the grid point with the best validation score and
:func:`choose_within_bound` the best among those whose fluency cost (perplexity on neutral text
relative to the unsteered model) stays within a bound. Numbers only: the scorers that fill the
grid live in the task modules.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

from contrans_tl import validate
from contrans_tl.errors import InvalidArgumentError

__all__ = ["Split", "selection_splits", "choose_best", "choose_within_bound"]


@dataclass(frozen=True)
class Split:
    """One fold: alpha is chosen on ``validation`` and reported on ``test`` (disjoint)."""

    fold: int
    validation: tuple[int, ...]
    test: tuple[int, ...]


def selection_splits(n: int, *, n_val: int, folds: int = 1, seed: int = 0) -> list[Split]:
    """Seeded splits of ``n`` items into validation and test, never overlapping.

    ``folds=1``: ``n_val`` random items validate, all others are the test set. ``folds=k>=2``
    (cross-fitting): the items are dealt into k test folds; fold f's validation set is
    ``n_val`` random items of the other folds, so every item is tested exactly once, with
    settings chosen on items it is not among.
    """
    validate.integer("folds", folds, low=1)
    validate.integer("n_val", n_val, low=1)
    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    if folds == 1:
        if n_val >= n:
            raise InvalidArgumentError("n_val", n_val, f"fewer than the {n} items, so some are left to test")
        return [Split(0, tuple(sorted(perm[:n_val])), tuple(sorted(perm[n_val:])))]
    if n < folds:
        raise InvalidArgumentError("folds", folds, f"at most the number of items ({n})")
    if n - (n + folds - 1) // folds < n_val:
        raise InvalidArgumentError("n_val", n_val, f"at most the {n - (n + folds - 1) // folds} items outside the "
                                   f"largest of {folds} test folds of {n} items")
    tests = [sorted(perm[f::folds]) for f in range(folds)]
    out = []
    for f, test in enumerate(tests):
        held = set(test)
        others = [i for i in perm if i not in held]
        out.append(Split(f, tuple(sorted(rng.sample(others, n_val))), tuple(test)))
    return out


K = TypeVar("K")


def choose_best(scores: Mapping[K, float], *, maximize: bool = True, cost: Callable[[K], float] | None = None) -> K:
    """The grid point with the best validation score; ties go to the lowest ``cost`` (e.g. |alpha|,
    the weakest intervention), then to the first listed."""
    if not scores:
        raise InvalidArgumentError("scores", dict(scores), "at least one grid point")
    keys = list(scores)
    sign = -1.0 if maximize else 1.0
    return min(keys, key=lambda k: (sign * float(scores[k]), cost(k) if cost else 0.0, keys.index(k)))


def choose_within_bound(
    points: Sequence[K],
    guard: Callable[[K], float],
    score: Callable[[K], float],
    *,
    limit: float,
    maximize: bool = True,
    cost: Callable[[K], float] | None = None,
) -> tuple[K, dict[K, dict[str, Any]]]:
    """The best-scoring point among those with ``guard(point) <= limit`` (ties as :func:`choose_best`).

    Each point's ``guard`` (a perplexity ratio, say) is measured before its score; a point over
    ``limit`` is never scored, so it cannot win and its validation cost is not paid. Returns the point and
    a record per point: ``guard``, ``allowed`` and, for allowed points, ``score``.
    """
    record: dict[K, dict[str, Any]] = {}
    allowed: dict[K, float] = {}
    for point in points:
        g = float(guard(point))
        record[point] = {"guard": g, "allowed": g <= limit}
        if record[point]["allowed"]:
            record[point]["score"] = allowed[point] = float(score(point))
    if not allowed:
        seen = ", ".join(f"{p}: {r['guard']:.3g}" for p, r in record.items())
        raise InvalidArgumentError("points", list(points), f"a grid with a point whose guard value stays within "
                                   f"{limit:g} (include a weaker alpha, or 0; guard values: {seen})")
    return choose_best(allowed, maximize=maximize, cost=cost), record
