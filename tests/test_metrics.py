"""Interval arithmetic of :mod:`contrans_tl.metrics` checked by simulation, not by re-deriving its formulas."""

from __future__ import annotations

import numpy as np
import pytest

from contrans_tl.errors import InvalidArgumentError
from contrans_tl.metrics import paired_difference_interval, wilson_interval

JOINT = {(1, 1): 0.25, (1, 0): 0.05, (0, 1): 0.20, (0, 0): 0.50}
"""Outcomes of one item under a and under b: accuracies 0.30 and 0.45, positively correlated (as the same
items under two steerings are)."""


def _unpaired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Newcombe's interval for two independent proportions (what a comparison without item pairing gets)."""
    (la, ua), (lb, ub) = wilson_interval(int(a.sum()), len(a)), wilson_interval(int(b.sum()), len(b))
    pa, pb = a.mean(), b.mean()
    return pb - pa - ((pb - lb) ** 2 + (ua - pa) ** 2) ** 0.5, pb - pa + ((ub - pb) ** 2 + (pa - la) ** 2) ** 0.5


def test_paired_interval_covers_the_true_difference_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(0)
    cells, probs = list(JOINT), list(JOINT.values())
    truth = (JOINT[(0, 1)] + JOINT[(1, 1)]) - (JOINT[(1, 0)] + JOINT[(1, 1)])
    covered, widths, unpaired_widths = 0, [], []
    for _ in range(2000):
        pairs = np.array([cells[i] for i in rng.choice(4, size=120, p=probs)])
        a, b = pairs[:, 0], pairs[:, 1]
        d, low, high = paired_difference_interval(a.tolist(), b.tolist())
        assert d == pytest.approx(b.mean() - a.mean()) and low <= d <= high
        covered += low <= truth <= high
        widths.append(high - low)
        unpaired_widths.append(np.subtract(*_unpaired(a, b)[::-1]))
    assert 0.93 <= covered / 2000 <= 0.975  # a 95 % interval: not anti-conservative, not needlessly wide
    assert np.mean(widths) < 0.8 * np.mean(unpaired_widths)  # pairing pays on correlated outcomes


def test_paired_interval_edges_and_bad_input():
    d, low, high = paired_difference_interval([1, 0, 1, 1] * 10, [1, 0, 1, 1] * 10)
    assert d == 0 and low < 0 < high  # the same outcomes: no difference, an honest interval around it
    d, low, high = paired_difference_interval([0] * 30, [1] * 30)
    assert d == 1 and high == 1.0 and low > 0.8
    with pytest.raises(InvalidArgumentError, match="as many outcomes"):
        paired_difference_interval([1, 0], [1])
    with pytest.raises(InvalidArgumentError, match="0/1"):
        paired_difference_interval([1, 2], [1, 0])
