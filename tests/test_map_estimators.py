"""The map estimators of fit_map_from_states (issue 23): each against a synthetic system with a known
answer, and each property it promises checked on a map whose provenance names it (so a test fails
when the option is ignored and the default ridge map comes back instead)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import contrans_tl as ct
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.models import ModelIdentity
from contrans_tl.pairing import PairedStates
from contrans_tl.reformulate import ESTIMATORS, RIDGE_GRID, solve_map

pytestmark = pytest.mark.usefixtures("one_thread")


def _states(x: torch.Tensor, y: torch.Tensor) -> tuple[PairedStates, PairedStates]:
    """PairedStates of samples ``[n, d]`` (one layer, one sample per text)."""
    idx = torch.arange(x.shape[0])

    def states(name: str, s: torch.Tensor) -> PairedStates:
        return PairedStates(s[:, None].float(), idx, (0,), ModelIdentity(name, None, 1, s.shape[-1]), "c", "words")

    return states("src", x), states("tgt", y)


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """A rows × cols matrix with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), max(rows, cols), generator=g, dtype=torch.float64))
    return q[:rows, :cols]


def _anisotropic(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Correlated, off-centre source samples (a covariance far from the identity)."""
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 2


def _isotropic(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Off-centre source samples whose sample covariance is exactly the identity."""
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    eig, vecs = torch.linalg.eigh(x.T @ x / n)
    return x @ vecs @ torch.diag(eig**-0.5) @ vecs.T + 2


# ---- procrustes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_src,d_tgt", [(6, 9), (8, 8), (9, 6)])
def test_procrustes_recovers_a_scaled_rotation(d_src, d_tgt):
    """Y = 2.5 · X Q + b + noise with Q semi-orthogonal: the map is 2.5·Q, its scale is recorded as 2.5,
    the bias is ȳ − x̄W, and the R² is near 1. With d_src > d_tgt Procrustes is the least-squares
    map only for an isotropic source (see solve_procrustes), so that case fits on all samples of
    one (nothing held out: a subset would be isotropic only up to sampling error)."""
    g = torch.Generator().manual_seed(d_src * 10 + d_tgt)
    x = _anisotropic(3000, d_src, g) if d_src <= d_tgt else _isotropic(3000, d_src, g)
    q = _orthonormal(d_src, d_tgt, g)
    b = torch.randn(d_tgt, generator=g, dtype=torch.float64)
    y = 2.5 * x @ q + b + 0.01 * torch.randn(3000, d_tgt, generator=g, dtype=torch.float64)
    holdout = 0.2 if d_src <= d_tgt else 0.0
    amap = ct.fit_map_from_states(*_states(x, y), layers=[(0, 0)], estimator="procrustes", holdout=holdout)
    assert amap.provenance["estimator"] == "procrustes" and amap.provenance["rank"] is None
    assert amap.provenance["scale"] == pytest.approx([2.5], abs=1e-3)
    assert torch.allclose(amap.weight[0].double(), 2.5 * q, atol=2e-3)
    assert torch.allclose(amap.bias[0].double(), b, atol=0.02)
    assert float((amap.r2_heldout if holdout else amap.r2_train)[0]) > 0.999
    assert float(amap.ridge[0]) == 0.0


@pytest.mark.parametrize("d_src,d_tgt", [(6, 9), (9, 6)])
def test_procrustes_map_is_orthogonal_even_when_the_truth_is_not(d_src, d_tgt):
    """Y = X A with a general A: the least-squares map is A (far from orthogonal); the Procrustes map is
    still s·Q with Q Qᵀ = I (d_src <= d_tgt) or Qᵀ Q = I (d_src > d_tgt), s as recorded."""
    g = torch.Generator().manual_seed(7)
    x = _anisotropic(2000, d_src, g)
    y = x @ torch.randn(d_src, d_tgt, generator=g, dtype=torch.float64) + 0.1 * torch.randn(2000, d_tgt, generator=g, dtype=torch.float64)
    src, tgt = _states(x, y)
    procrustes = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], estimator="procrustes")
    ridge = ct.fit_map_from_states(src, tgt, layers=[(0, 0)])

    def gram(w: torch.Tensor) -> torch.Tensor:
        w = w.double()
        return w @ w.T if d_src <= d_tgt else w.T @ w

    eye = torch.eye(min(d_src, d_tgt), dtype=torch.float64)
    scale = procrustes.provenance["scale"][0]
    assert torch.allclose(gram(procrustes.weight[0]) / scale**2, eye, atol=1e-5)
    ridge_gram = gram(ridge.weight[0])
    assert float((ridge_gram / ridge_gram.diagonal().mean() - eye).abs().max()) > 0.1  # the default map is not
    assert float(procrustes.r2_heldout[0]) < float(ridge.r2_heldout[0])  # and fits worse, as it must


# ---- reduced-rank regression -----------------------------------------------------------------------
def test_rrr_recovers_a_low_rank_map_and_has_that_rank():
    """Y = X A + noise with rank(A) = 2: the rank-2 map is A (rank exactly 2); the full ridge map is full rank."""
    g = torch.Generator().manual_seed(3)
    n, d_src, d_tgt, r = 3000, 10, 7, 2
    x = _anisotropic(n, d_src, g)
    a = torch.randn(d_src, r, generator=g, dtype=torch.float64) @ torch.randn(r, d_tgt, generator=g, dtype=torch.float64)
    y = x @ a + 0.3 * torch.randn(n, d_tgt, generator=g, dtype=torch.float64)
    src, tgt = _states(x, y)
    rrr = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], estimator="rrr", rank=r)
    full = ct.fit_map_from_states(src, tgt, layers=[(0, 0)])
    assert rrr.provenance["estimator"] == "rrr" and rrr.provenance["rank"] == r
    assert int(torch.linalg.matrix_rank(rrr.weight[0].double(), rtol=1e-5)) == r
    assert int(torch.linalg.matrix_rank(full.weight[0].double(), rtol=1e-5)) == min(d_src, d_tgt)
    assert torch.allclose(rrr.weight[0].double(), a, atol=0.02 * float(a.abs().max()))
    assert float(rrr.r2_heldout[0]) == pytest.approx(float(full.r2_heldout[0]), abs=0.01)
    assert float(rrr.ridge[0]) in RIDGE_GRID


def test_rrr_beats_truncating_the_least_squares_svd():
    """Least-squares RRR minimises the training residual over rank-r maps, so it is never worse than
    the naive rank-r map (the top-r SVD of the least-squares weight), and strictly better here."""
    g = torch.Generator().manual_seed(4)
    x = _anisotropic(500, 8, g)[None]
    y = x @ torch.randn(8, 6, generator=g, dtype=torch.float64) + torch.randn(1, 500, 6, generator=g, dtype=torch.float64)
    w_rrr, b_rrr = solve_map(x, y, estimator="rrr", rank=2)
    w_ols, _ = solve_map(x, y, estimator="lstsq")
    u, s, vh = torch.linalg.svd(w_ols[0])
    w_svd = (u[:, :2] * s[:2]) @ vh[:2]
    b_svd = y.mean(1)[0] - x.mean(1)[0] @ w_svd

    def residual(w: torch.Tensor, b: torch.Tensor) -> float:
        return float(((x[0] @ w + b - y[0]) ** 2).sum())

    assert residual(w_rrr[0], b_rrr[0]) < 0.99 * residual(w_svd, b_svd)


# ---- least squares ---------------------------------------------------------------------------------
def test_lstsq_is_plain_least_squares_and_named():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) + 2
    y = x @ torch.randn(5, 4, generator=g, dtype=torch.float64) + torch.randn(200, 4, generator=g, dtype=torch.float64)
    src, tgt = _states(x, y)
    lstsq = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], estimator="lstsq")
    ridge0 = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], ridge=0.0)
    assert lstsq.provenance["estimator"] == "lstsq" and ridge0.provenance["estimator"] == "ridge"
    assert torch.equal(lstsq.weight, ridge0.weight) and float(lstsq.ridge[0]) == 0.0
    w_np = np.linalg.lstsq(np.c_[x.numpy(), np.ones(200)], y.numpy(), rcond=None)[0]  # all samples, with a bias
    w_all, b_all = solve_map(x[None], y[None], estimator="lstsq")
    np.testing.assert_allclose(w_all[0].numpy(), w_np[:-1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b_all[0].numpy(), w_np[-1], rtol=1e-8, atol=1e-10)


# ---- whitened (CCA) --------------------------------------------------------------------------------
def test_whitened_preserves_mahalanobis_lengths_or_the_target_covariance():
    """λ = 0, full rank: W Σy⁻¹ Wᵀ = Σx⁻¹ when d_src <= d_tgt (a mapped vector is as long, in units of
    the target's spread, as it was in the source's), Wᵀ Σx W = Σy when d_src >= d_tgt (mapped source
    states have the target's covariance). Least squares keeps neither."""
    g = torch.Generator().manual_seed(6)
    for d_src, d_tgt in ((5, 8), (8, 5), (6, 6)):
        x = _anisotropic(1000, d_src, g)
        y = x @ torch.randn(d_src, d_tgt, generator=g, dtype=torch.float64) + torch.randn(1000, d_tgt, generator=g, dtype=torch.float64)
        cx, cy = torch.cov(x.T), torch.cov(y.T)
        for estimator, holds in (("whitened", True), ("lstsq", False)):
            w = solve_map(x[None], y[None], estimator=estimator)[0][0]
            if d_src <= d_tgt:
                lhs, rhs = w @ torch.linalg.inv(cy) @ w.T, torch.linalg.inv(cx)
                assert torch.allclose(lhs, rhs, rtol=1e-8, atol=1e-10 * float(rhs.abs().max())) == holds
            if d_src >= d_tgt:
                lhs, rhs = w.T @ cx @ w, cy
                assert torch.allclose(lhs, rhs, rtol=1e-8, atol=1e-10 * float(rhs.abs().max())) == holds


def test_whitened_carries_a_latent_mean_difference_unattenuated():
    """Both models read a latent factor z with reliability a² = 0.5 (canonical correlation ρ = 0.5),
    through different random mixings. A concept that shifts z moves both models' states; least squares
    maps the source's mean difference to ρ = 0.5 times the target's, the whitened map to all of it."""
    g = torch.Generator().manual_seed(8)
    n, d_src, d_tgt, a = 20000, 10, 14, 0.5**0.5
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)

    def reading(d: int) -> tuple[torch.Tensor, torch.Tensor]:
        mix = torch.randn(d, d, generator=g, dtype=torch.float64)
        white = torch.randn(n, d, generator=g, dtype=torch.float64)
        white[:, :1] = a * z + (1 - a**2) ** 0.5 * white[:, :1]
        return white @ mix, mix[0] * a  # the states, and what a unit shift of z moves them by

    (x, v), (y, u) = reading(d_src), reading(d_tgt)
    src, tgt = _states(x, y)
    ratios = {}
    for estimator in ("whitened", "lstsq", "ridge"):
        amap = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], estimator=estimator, ridge="auto" if estimator == "ridge" else 0.0)
        mapped = v @ amap.weight[0].double()
        assert float(torch.nn.functional.cosine_similarity(mapped, u, dim=0)) > 0.98, estimator
        ratios[estimator] = float(mapped.norm() / u.norm())
    assert ratios["whitened"] == pytest.approx(1.0, abs=0.05)
    assert ratios["lstsq"] == pytest.approx(0.5, abs=0.05) and ratios["ridge"] < 0.55


def test_whitened_rank_keeps_that_many_canonical_pairs():
    g = torch.Generator().manual_seed(9)
    x = _anisotropic(800, 7, g)
    y = x @ torch.randn(7, 9, generator=g, dtype=torch.float64) + torch.randn(800, 9, generator=g, dtype=torch.float64)
    amap = ct.fit_map_from_states(*_states(x, y), layers=[(0, 0)], estimator="whitened", rank=3)
    assert amap.provenance["estimator"] == "whitened" and amap.provenance["rank"] == 3
    assert int(torch.linalg.matrix_rank(amap.weight[0].double(), rtol=1e-5)) == 3


# ---- every estimator -------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_reports_held_out_r2_on_the_same_texts(estimator, tmp_path):
    """Y = X A + noise: each map is finite, names its estimator, scores R² on the same held-out samples,
    and keeps all of it through save/load."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(600, 2, 8, generator=g)
    y = (x[:, 1] @ torch.randn(8, 6, generator=g) + 0.5 * torch.randn(600, 6, generator=g))[:, None]
    idx = torch.arange(600) // 2
    src = PairedStates(x, idx, (0, 1), ModelIdentity("src", None, 2, 8), "c", "words")
    tgt = PairedStates(y, idx, (0,), ModelIdentity("tgt", None, 1, 6), "c", "words")
    rank = 3 if estimator in ("rrr", "whitened") else None
    amap = ct.fit_map_from_states(src, tgt, layers=[(1, 0), (0, 0)], estimator=estimator, rank=rank)
    reference = ct.fit_map_from_states(src, tgt, layers=[(1, 0), (0, 0)])
    assert amap.provenance["estimator"] == estimator and amap.provenance["rank"] == rank
    assert amap.provenance["n_heldout_samples"] == reference.provenance["n_heldout_samples"] == 120
    assert torch.isfinite(amap.r2_heldout).all() and torch.isfinite(amap.r2_train).all()
    assert float(amap.r2_heldout[0]) > 0.3 > abs(float(reference.r2_heldout[1]))  # layer 1 predicts, layer 0 does not
    loaded = ct.AffineMap.load(amap.save(tmp_path / "m.safetensors"))
    assert loaded.provenance == amap.provenance and torch.equal(loaded.weight, amap.weight)
    single = ct.fit_map_from_states(src, tgt, layers=[(1, 0)], estimator=estimator, rank=rank)
    vector = ct.ConceptVector(vectors=torch.randn(2, 8, generator=g), model=src.model, layers=(0, 1), method="mean_diff")
    assert single.apply(vector).provenance["estimator"] == estimator  # a mapped vector says which map made it


def test_estimator_arguments_are_checked():
    g = torch.Generator().manual_seed(11)
    src, tgt = _states(torch.randn(50, 4, generator=g), torch.randn(50, 3, generator=g))
    cases = [
        (dict(estimator="ols"), "estimator="),
        (dict(estimator="rrr"), "rank=None"),
        (dict(estimator="rrr", rank=4), "rank=4"),  # above min(d_src, d_tgt) = 3
        (dict(estimator="rrr", rank=0), "rank=0"),
        (dict(estimator="ridge", rank=2), "rank=2"),
        (dict(estimator="procrustes", ridge=0.1), "ridge=0.1"),
        (dict(estimator="lstsq", ridge=1.0), "ridge=1.0"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(InvalidArgumentError, match=fragment.replace("(", r"\(")):
            ct.fit_map_from_states(src, tgt, layers=[(0, 0)], **kwargs)
    with pytest.raises(InvalidArgumentError, match="ridge="):
        solve_map(torch.randn(1, 9, 2), torch.randn(1, 9, 2), ridge="auto")
