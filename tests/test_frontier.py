"""The frontier's numbers: reading curves at a KL, transfer efficiency, the operating point, random controls, tests."""

from __future__ import annotations

import numpy as np
import pytest

from contrans_tl.metrics import holm, mcnemar_p, paired_permutation_p
from contrans_tl.tasks.concept import ItemScores
from contrans_tl.tasks.frontier import (Curve, Point, choose_operating_point, curve_at, geometric_grid, random_at,
                                        transfer_efficiency)


def scores(hits: list[int]) -> ItemScores:
    """Items whose Logit and Token outcomes are both ``hits`` (so every metric reads the same)."""
    return ItemScores(tuple(bool(h) for h in hits), tuple(bool(h) for h in hits), tuple(0 for _ in hits))


def curve(kls: list[float], hit_counts: list[int], n: int = 20) -> Curve:
    """A curve on n items: the baseline hits none, point k hits the first hit_counts[k] items."""
    pts = tuple(Point(0.01 * (k + 1), kl, scores([1] * h + [0] * (n - h))) for k, (kl, h) in enumerate(zip(kls, hit_counts)))
    return Curve(scores([0] * n), pts)


def test_curve_is_read_linearly_in_kl_from_the_baseline_then_in_log_kl_and_never_past_its_end():
    c = curve([0.01, 0.1, 1.0], [4, 8, 16])
    got = curve_at(c, [0.005, 0.01, np.sqrt(0.01 * 0.1), 1.0, 2.0])
    assert got[:4] == pytest.approx([0.1, 0.2, 0.3, 0.8]) and np.isnan(got[4])


def test_curve_kl_is_made_monotone_in_alpha():
    c = curve([0.02, 0.01, 0.1], [4, 6, 8])  # noise made the second alpha read cheaper than the first
    kl, _ = c.ordered()
    assert list(kl) == [0.0, 0.02, 0.02, 0.1]


def test_transfer_efficiency_of_a_mapped_curve_at_half_the_native_gain():
    native = curve([0.01, 0.1, 1.0], [8, 12, 16])
    mapped = curve([0.01, 0.1, 1.0], [4, 6, 8])
    te = transfer_efficiency({"c": (mapped, native)}, (0.01, 0.1), n_boot=500)
    assert te["value"] == pytest.approx(0.5) and te["ci95"][0] <= 0.5 <= te["ci95"][1]
    assert te["per_concept"]["c"]["n_kl"] == 16
    # equal KL, not equal alpha: the same gains reached at ten times the KL transfer less
    costly = curve([0.1, 1.0, 10.0], [8, 12, 16])
    assert transfer_efficiency({"c": (costly, native)}, (0.01, 0.1), n_boot=200)["value"] < 0.6
    # a mapped curve that never gets there has no value at those KLs
    short = curve([0.001, 0.002, 0.005], [1, 1, 1])
    assert transfer_efficiency({"c": (short, native)}, (0.01, 0.1), n_boot=50)["value"] is None


def test_operating_point_is_the_best_validation_score_within_the_bound_and_ties_go_weaker():
    base = scores([0] * 10)
    pts = [Point(0.02, 0.01, scores([1] * 3 + [0] * 7)), Point(0.03, 0.05, scores([1] * 5 + [0] * 5)),
           Point(0.045, 0.08, scores([1] * 5 + [0] * 5)), Point(0.07, 0.3, scores([1] * 10))]
    op = choose_operating_point(pts, base, kl_bound=0.1)
    assert op["alpha"] == 0.03 and op["within_bound"] and op["validation_score"] == 0.5  # the tie goes to 0.03
    assert choose_operating_point(pts, base, kl_bound=1.0)["alpha"] == 0.07  # the bound is what stopped it
    none = choose_operating_point(pts, base, kl_bound=0.001)
    assert none["alpha"] == 0.0 and not none["within_bound"]


def test_random_controls_are_read_at_the_operating_kl_from_points_near_it():
    pts = [Point(0.01, 0.05, scores([1, 0, 0, 0])), Point(0.02, 0.1, scores([1, 1, 0, 0])),
           Point(0.03, 0.2, scores([1, 1, 1, 0])), Point(0.06, 5.0, scores([1, 1, 1, 1]))]
    values, n = random_at(pts, 0.1)
    w = 1 - np.log(2) / np.log(2.25)  # the weight of a point a factor 2 away in KL; the point at 0.1 weighs 1
    assert n == 3 and values[0] == 1 and values[3] == 0  # the point at KL 5 (a broken model) is not a control here
    assert values[1] == pytest.approx((1 + w) / (1 + 2 * w)) and values[2] == pytest.approx(w / (1 + 2 * w))
    assert random_at(pts, 1000.0) == (pytest.approx(np.array([])), 0)


def test_geometric_grid_neighbours_are_the_ratio_apart():
    grid = geometric_grid(0.02, 1.5, 8)
    assert len(grid) == 8 and grid[0] == 0.02 and max(b / a for a, b in zip(grid, grid[1:])) < 1.6


def test_paired_tests_can_fail_and_can_pass():
    a, b = [1] * 12 + [0] * 8, [0] * 20
    assert paired_permutation_p(a, b) < 0.001 and mcnemar_p(a, b) < 0.001
    assert paired_permutation_p(a, a) == 1.0 and mcnemar_p(a, a) == 1.0
    rng = np.random.default_rng(0)
    noise = [paired_permutation_p(rng.integers(0, 2, 40), rng.integers(0, 2, 40), seed=i) for i in range(40)]
    assert np.mean(np.array(noise) < 0.05) < 0.2  # no effect: rarely significant
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_a_curve_whose_top_alpha_broke_is_not_read_past_its_last_finite_point():
    c = curve([0.01, 0.1, float("inf")], [4, 8, 20])
    got = curve_at(c, [0.1, 10.0])
    assert got[0] == pytest.approx(0.4) and np.isnan(got[1])


def test_a_plateau_of_equal_kl_reads_its_last_point_and_stays_continuous():
    c = curve([0.01, 0.03, 0.03, 0.1], [2, 4, 6, 8])
    at, above = curve_at(c, [0.03, 0.0300001])
    assert at == pytest.approx(0.3) and above == pytest.approx(0.3, abs=1e-4)


def test_shared_items_are_drawn_once_for_every_concept_that_scores_them():
    """Two concepts scoring the same items: with ids the bootstrap draws each item once for both, so their gains
    move together and the pooled interval is wider than when they are (wrongly) drawn independently."""
    rng = np.random.default_rng(3)
    hits = lambda p: list((rng.random(30) < p).astype(int))  # noqa: E731
    native = curve([0.01, 0.1, 1.0], [10, 15, 20], n=30)
    mapped = Curve(scores([0] * 30), tuple(Point(0.01 * (k + 1), kl, scores(hits(p)))
                                          for k, (kl, p) in enumerate(zip([0.01, 0.1, 1.0], [0.2, 0.3, 0.4]))))
    pairs = {"a": (mapped, native), "b": (mapped, native)}
    shared = transfer_efficiency(pairs, (0.01, 0.1), n_boot=3000, item_ids={"a": range(30), "b": range(30)})
    apart = transfer_efficiency(pairs, (0.01, 0.1), n_boot=3000)
    assert shared["value"] == apart["value"]
    assert (shared["ci95"][1] - shared["ci95"][0]) > 1.15 * (apart["ci95"][1] - apart["ci95"][0])
