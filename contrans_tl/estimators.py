"""How STEP 2 solves: batched float64 least squares from sufficient statistics, and the map estimators.

For each (source layer, target layer) pair, F minimises ||X F − Y||² (+ ridge ||F||²) over aligned
samples (the paper's eq. 2), with an optional bias. All pairs are solved at once from the centred
normal equations (:class:`Moments` → :class:`NormalEquations`): one batched eigendecomposition
serves every ridge strength of a search. The other estimators solve from the same statistics:
plain least squares (the paper), orthogonal Procrustes, reduced-rank regression, and the whitened
(CCA) map that carries a concept's mean difference without the attenuation of least squares
(:data:`SOLVERS`). :mod:`contrans_tl.reformulate` fits maps with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl import validate
from contrans_tl.errors import InvalidArgumentError

__all__ = ["RIDGE_GRID", "ESTIMATORS", "Moments", "NormalEquations", "ridge_solve", "Solver", "SOLVERS", "solve_map",
           "r2_score", "ridge_arg", "estimator_args", "solve_least_squares", "solve_procrustes", "solve_reduced_rank", "solve_whitened"]

RIDGE_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
"""Ridge strengths searched by ``ridge="auto"``, in units of the mean squared singular value."""

ESTIMATORS: tuple[str, ...] = validate.MAP_ESTIMATORS
"""``estimator=`` values: "lstsq", "ridge" (the default), "procrustes", "rrr", "whitened"."""


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a least-squares problem per pair, in float64; they add up.

    Summing the moments of two sample sets gives the moments of their union, so a ridge
    search on a fit/validation split and the final fit on both reuse one pass over the data.
    """

    n: int
    sx: Float[Tensor, "pair d_src"]
    sy: Float[Tensor, "pair d_tgt"]
    sxx: Float[Tensor, "pair d_src d_src"]
    sxy: Float[Tensor, "pair d_src d_tgt"]
    syy: Float[Tensor, "pair"]
    yty: Float[Tensor, "pair d_tgt d_tgt"] | None = None
    """The target's second moments YᵀY, kept only when asked (the whitened estimator needs them)."""

    @classmethod
    def of(
        cls, x: Float[Tensor, "pair n_samples d_src"], y: Float[Tensor, "pair n_samples d_tgt"], *,
        target_cov: bool = False,
    ) -> "Moments":
        """One batched GEMM pass over the samples (a second one for YᵀY with ``target_cov``)."""
        x, y = x.double(), y.double()
        return cls(
            n=x.shape[1],
            sx=x.sum(1),
            sy=y.sum(1),
            sxx=x.transpose(1, 2) @ x,
            sxy=x.transpose(1, 2) @ y,
            syy=torch.linalg.vector_norm(y, dim=(1, 2)) ** 2,
            yty=y.transpose(1, 2) @ y if target_cov else None,
        )

    def __add__(self, other: "Moments") -> "Moments":
        yty = None if self.yty is None or other.yty is None else self.yty + other.yty
        return Moments(self.n + other.n, self.sx + other.sx, self.sy + other.sy,
                       self.sxx + other.sxx, self.sxy + other.sxy, self.syy + other.syy, yty)


class NormalEquations:
    """Centred normal equations of every pair, solved for any ridge strength, float64.

    With ``XᵀX = V diag(S²) Vᵀ`` (the right singular vectors and squared singular values of
    the centred source states, from one batched ``eigh``), ``F = V diag(1/(S² + λ)) Vᵀ XᵀY``
    is the ridge solution for every λ at the cost of one small product, and λ = 0 (with
    numpy's cutoff on tiny singular values) the minimum-norm least-squares solution. When
    every λ is positive and no decomposition exists yet, a batched Cholesky solve is used.
    """

    def __init__(self, moments: Moments, *, bias: bool) -> None:
        m = moments
        n = m.n
        own_mean = m.sy / n
        if bias:
            self.x_mean, self.y_mean = (m.sx / n)[:, None], own_mean[:, None]
        else:
            self.x_mean = torch.zeros_like(m.sx)[:, None]
            self.y_mean = torch.zeros_like(m.sy)[:, None]
        xm, ym = self.x_mean[:, 0], self.y_mean[:, 0]
        self.gram = m.sxx - n * xm[:, :, None] * xm[:, None, :]
        self.cross = m.sxy - n * xm[:, :, None] * ym[:, None, :]
        self.yy = m.syy - n * (ym**2).sum(-1)
        self.ss_tot = m.syy - n * (own_mean**2).sum(-1)
        diag = torch.diagonal(self.gram, dim1=1, dim2=2)
        self.scale = diag.mean(1).clamp_min(1e-300)  # = mean squared singular value: the ridge unit
        self.n = n
        self.rank_scale = max(n, self.gram.shape[-1])
        # centred YᵀY (from moments with ``target_cov``), or None
        self.ycov = None if m.yty is None else m.yty - n * ym[:, :, None] * ym[:, None, :]
        self._eig: tuple[Tensor, Tensor, Tensor] | None = None
        self._target_eig: tuple[Tensor, Tensor] | None = None

    def _eigen(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._eig is None:
            eig, v = torch.linalg.eigh(self.gram)  # one batched call for all pairs
            eig = eig.clamp_min(0)
            self._eig = (eig, v, v.transpose(1, 2) @ self.cross)
        return self._eig

    def source_eigen(self) -> tuple[Float[Tensor, "pair d_src"], Float[Tensor, "pair d_src d_src"]]:
        """Eigenvalues (ascending, >= 0) and eigenvectors of the centred source XᵀX, cached."""
        eig, v, _ = self._eigen()
        return eig, v

    def target_eigen(self) -> tuple[Float[Tensor, "pair d_tgt"], Float[Tensor, "pair d_tgt d_tgt"]]:
        """Eigenvalues (ascending, >= 0) and eigenvectors of the centred target YᵀY, cached."""
        if self.ycov is None:
            raise InvalidArgumentError("moments", "<Moments without yty>",
                                       "moments with the target's second moments (Moments.of(..., target_cov=True))")
        if self._target_eig is None:
            eig, v = torch.linalg.eigh(self.ycov)
            self._target_eig = (eig.clamp_min(0), v)
        return self._target_eig

    def intercept(self, weight: Float[Tensor, "pair d_src d_tgt"]) -> Float[Tensor, "pair d_tgt"]:
        """The bias that goes with ``weight``: ȳ − x̄ W (zero without a bias)."""
        return (self.y_mean - self.x_mean @ weight)[:, 0]

    def solve(
        self, ridge: Float[Tensor, "pair"]
    ) -> tuple[Float[Tensor, "pair d_src d_tgt"], Float[Tensor, "pair d_tgt"]]:
        """Weights and bias for one ridge strength per pair (relative units; 0 = min-norm)."""
        lam = ridge.double() * self.scale
        if self._eig is None and bool((lam > 0).all()):
            eye = torch.eye(self.gram.shape[-1], dtype=torch.float64)
            chol, info = torch.linalg.cholesky_ex(self.gram + lam[:, None, None] * eye)
            if not bool(info.any()):
                weight = torch.cholesky_solve(self.cross, chol)
                return weight, self.intercept(weight)
        _, v, proj = self._eigen()
        weight = v @ (self._shrink(lam)[:, :, None] * proj)
        return weight, self.intercept(weight)

    def power(
        self, eig: Float[Tensor, "pair d"], vecs: Float[Tensor, "pair d d"], lam: Float[Tensor, "pair"], exponent: float
    ) -> Float[Tensor, "pair d d"]:
        """(S + λ)^exponent from S's eigendecomposition; directions below numpy's cutoff get 0 (a pseudo-power)."""
        shifted = eig + lam[:, None]
        cutoff = shifted[:, -1:] * torch.finfo(torch.float64).eps * max(self.n, eig.shape[-1])
        kept = torch.where(shifted > cutoff, shifted.clamp_min(1e-300) ** exponent, torch.zeros_like(shifted))
        return (vecs * kept[:, None, :]) @ vecs.transpose(1, 2)

    def _shrink(self, lam: Float[Tensor, "pair"]) -> Float[Tensor, "pair d_src"]:
        """1 / (S² + λ) per eigen-direction, 0 below numpy's cutoff on tiny singular values."""
        eig, _, _ = self._eigen()
        cutoff = eig[:, -1:] * torch.finfo(torch.float64).eps * self.rank_scale
        return torch.where(eig > cutoff, 1 / (eig + lam[:, None]), torch.zeros_like(eig))

    def validation_r2(
        self, x: Float[Tensor, "pair n_val d_src"], y: Float[Tensor, "pair n_val d_tgt"], ridges: Sequence[float]
    ) -> Float[Tensor, "ridge pair"]:
        """R² on validation samples (about the training mean) of the fit at every ridge strength.

        In the eigenbasis the residual of every ridge follows from three products computed once
        (Z = (X − x̄)V, ZᵀZ and Zᵀ(Y − ȳ)), so the ridge search costs about one prediction, not one
        per strength: ‖Yc − Z D P‖² = ‖Yc‖² − 2 Σ D∘(P∘ZᵀYc) + Dᵀ(ZᵀZ ∘ PPᵀ)D with D = 1/(S² + λ).
        """
        _, v, proj = self._eigen()
        z = (x.double() - self.x_mean) @ v
        yc = y.double() - self.y_mean
        linear = (proj * (z.transpose(1, 2) @ yc)).sum(-1)  # [pair, d_src]
        quadratic = (z.transpose(1, 2) @ z) * (proj @ proj.transpose(1, 2))  # [pair, d_src, d_src]
        ss_tot = (yc**2).sum((1, 2))
        rows = []
        for ridge in ridges:
            d = self._shrink(torch.full_like(self.scale, float(ridge)) * self.scale)
            ss_res = ss_tot - 2 * (d * linear).sum(-1) + torch.einsum("pi,pij,pj->p", d, quadratic, d)
            rows.append(1 - ss_res / ss_tot.clamp_min(1e-300))
        return torch.stack(rows)

    def r2(self, weight: Float[Tensor, "pair d_src d_tgt"]) -> Float[Tensor, "pair"]:
        """R² of ``weight`` on the samples these moments came from, without another pass.

        ‖Yc − Xc F‖² = ‖Yc‖² − 2 tr(Fᵀ XᵀY) + tr(Fᵀ XᵀX F), all centred.
        """
        ss_res = self.yy - 2 * (weight * self.cross).sum((1, 2)) + ((self.gram @ weight) * weight).sum((1, 2))
        return 1 - ss_res / self.ss_tot.clamp_min(1e-300)


def ridge_solve(
    x: Float[Tensor, "pair n_samples d_src"],
    y: Float[Tensor, "pair n_samples d_tgt"],
    *,
    ridge: float | Float[Tensor, "pair"] = 0.0,
    bias: bool = True,
) -> tuple[Float[Tensor, "pair d_src d_tgt"], Float[Tensor, "pair d_tgt"]]:
    """Batched least squares (ridge in units of the mean squared singular value), float64."""
    factors = NormalEquations(Moments.of(x, y), bias=bias)
    lam = torch.as_tensor(ridge, dtype=torch.float64).expand(x.shape[0])
    return factors.solve(lam)


# ---- estimators: one Solver per ``estimator=`` name, all from the same normal equations ----------
Solver = Callable[[NormalEquations, Float[Tensor, "pair"], "int | None"], Float[Tensor, "pair d_src d_tgt"]]
"""(normal equations, ridge per pair in relative units, rank or None) → weight per pair; the bias is
:meth:`NormalEquations.intercept` of it."""


def solve_least_squares(eq: NormalEquations, ridge: Float[Tensor, "pair"], rank: int | None) -> Float[Tensor, "pair d_src d_tgt"]:
    """"lstsq" (ridge 0, the paper) and "ridge": F = (XᵀX + λ)⁻¹ XᵀY on centred states."""
    return eq.solve(ridge)[0]


def solve_procrustes(eq: NormalEquations, ridge: Float[Tensor, "pair"], rank: int | None) -> Float[Tensor, "pair d_src d_tgt"]:
    """"procrustes": W = s·Q, Q = U Vᵀ from the SVD XᵀY = U Σ Vᵀ of the centred cross moments.

    Q is the orthogonal Procrustes rotation: orthonormal rows (Q Qᵀ = I) when d_src <= d_tgt, so
    the map is an isometry of the source space into the target's, and orthonormal columns
    (Qᵀ Q = I) when d_src > d_tgt. It maximises tr(Qᵀ XᵀY) whatever the scale, so rescaling either
    side (scale-normalised states) changes nothing but s. The scalar s = tr Σ / tr(Qᵀ XᵀX Q) is
    the least-squares scale for that Q: the two models' residual streams differ in norm by large
    factors, and a pure rotation would transplant a vector at the source's magnitude. For
    d_src <= d_tgt, tr(Qᵀ XᵀX Q) = tr XᵀX for every such Q, so (s, Q) is the joint least-squares
    optimum; for d_src > d_tgt it is only when the source covariance is isotropic (otherwise U Vᵀ
    is the correlation-maximising map of embedding alignment). s is in ``provenance["scale"]``.
    """
    u, sing, vh = torch.linalg.svd(eq.cross, full_matrices=False)
    q = u @ vh
    scale = sing.sum(-1) / ((eq.gram @ q) * q).sum((1, 2)).clamp_min(1e-300)
    return scale[:, None, None] * q


def solve_reduced_rank(eq: NormalEquations, ridge: Float[Tensor, "pair"], rank: int | None) -> Float[Tensor, "pair d_src d_tgt"]:
    """"rrr": the ridge/least-squares fit projected onto the top-``rank`` principal directions of its fitted values.

    W_r = F V_r V_rᵀ, with V_r the top eigenvectors of Fᵀ(XᵀX + λ)F (the fitted values' second
    moments, on the ridge-augmented data): with λ = 0 the exact minimiser of ||X W − Y||² over
    rank(W) <= r (Eckart–Young on the fitted values), with λ > 0 reduced-rank ridge regression
    (Mukherjee & Zhu 2011). A concept then moves only along the r target directions the source
    predicts best, not along noise the full map also fits.
    """
    if rank is None:
        raise InvalidArgumentError("rank", rank, "an integer >= 1 (estimator='rrr' needs a rank)")
    weight, _ = eq.solve(ridge)
    lam = (ridge.double() * eq.scale)[:, None, None]
    fitted = weight.transpose(1, 2) @ (eq.gram @ weight + lam * weight)
    top = torch.linalg.eigh(fitted)[1][..., -rank:]
    return weight @ top @ top.transpose(1, 2)


def solve_whitened(eq: NormalEquations, ridge: Float[Tensor, "pair"], rank: int | None) -> Float[Tensor, "pair d_src d_tgt"]:
    """"whitened": the CCA map W = Σx^-½ U Vᵀ Σy^½, with U S Vᵀ the SVD of Σx^-½ Σxy Σy^-½.

    Why, for concepts. In canonical coordinates (x̃ = x Σx^-½ U, ỹ = y Σy^-½ V: unit variance,
    cross-correlations diag(S)) least squares maps ỹ = x̃ diag(S): every canonical direction is
    shrunk by its correlation ρ, the regression dilution of a noisy regressor. Suppose a concept
    shifts a latent factor that both models read with equal reliability; then its mean difference
    moves ỹ exactly as much as x̃, so the least-squares map attenuates a mapped concept vector by
    ρ, and the reverse regression (y → x, inverted) inflates it by 1/ρ. The whitened map ỹ = x̃ is
    their geometric mean and carries such a mean difference unattenuated; equivalently it is
    orthogonal Procrustes between the whitened states, re-coloured with the target's covariance.
    What it guarantees (λ = 0, full rank): for d_src <= d_tgt, W Σy⁻¹ Wᵀ = Σx⁻¹, i.e. every mapped
    vector has the same Mahalanobis length in the target as in the source (a concept is exactly
    as separable, in units of the target's spread, as it was in the source's); for
    d_src >= d_tgt, Wᵀ Σx W = Σy, i.e. mapped source states have the target's covariance.
    ``rank`` keeps the top canonical pairs only (directions with ρ near 0 are noise the map would
    otherwise carry at full weight); ``ridge`` λ adds λ·mean-eigenvalue to both covariances
    (canonical ridge), moving the map from CCA (λ = 0) toward scaled Procrustes (λ → ∞).
    """
    ex, vx = eq.source_eigen()
    ey, vy = eq.target_eigen()
    lam_x, lam_y = ridge.double() * eq.scale, ridge.double() * torch.diagonal(eq.ycov, dim1=1, dim2=2).mean(1)
    x_inv_root = eq.power(ex, vx, lam_x, -0.5)
    y_inv_root, y_root = eq.power(ey, vy, lam_y, -0.5), eq.power(ey, vy, lam_y, 0.5)
    u, _, vh = torch.linalg.svd(x_inv_root @ eq.cross @ y_inv_root, full_matrices=False)
    k = u.shape[-1] if rank is None else rank
    return x_inv_root @ u[..., :k] @ vh[:, :k] @ y_root


SOLVERS: dict[str, Solver] = {
    "lstsq": solve_least_squares,
    "ridge": solve_least_squares,
    "procrustes": solve_procrustes,
    "rrr": solve_reduced_rank,
    "whitened": solve_whitened,
}
"""The solver of each estimator name (:data:`ESTIMATORS`)."""


def ridge_arg(ridge: object) -> float | Literal["auto"]:
    """``ridge`` is "auto" or a finite number >= 0."""
    if isinstance(ridge, str):
        if ridge == "auto":
            return "auto"
        raise InvalidArgumentError("ridge", ridge, "'auto' or a number >= 0")
    return validate.real("ridge", ridge, low=0.0)


def estimator_args(
    estimator: object, ridge: object, rank: object, d_src: int, d_tgt: int
) -> tuple[str, float | Literal["auto"], int | None]:
    """Check ``estimator``, and the ``ridge`` and ``rank`` it takes ("auto" is 0 for an estimator without a ridge)."""
    name = validate.choice("estimator", estimator, list(ESTIMATORS))
    checked = ridge_arg(ridge)
    if name in ("lstsq", "procrustes"):
        if checked not in ("auto", 0.0):
            raise InvalidArgumentError("ridge", ridge, f"0 or 'auto' with estimator={name!r}, which has no ridge "
                                       "(estimator='ridge', 'rrr' or 'whitened' take one)")
        checked = 0.0
    if rank is None:
        if name == "rrr":
            raise InvalidArgumentError("rank", rank, f"an integer in [1, {min(d_src, d_tgt)}] (estimator='rrr' needs a rank)")
        return name, checked, None
    if name not in ("rrr", "whitened"):
        raise InvalidArgumentError("rank", rank, f"None with estimator={name!r} (a rank is taken by 'rrr' and 'whitened')")
    return name, checked, validate.integer("rank", rank, low=1, high=min(d_src, d_tgt))


def solve_map(
    x: Float[Tensor, "pair n_samples d_src"],
    y: Float[Tensor, "pair n_samples d_tgt"],
    *,
    estimator: str = "ridge",
    ridge: float = 0.0,
    rank: int | None = None,
    bias: bool = True,
) -> tuple[Float[Tensor, "pair d_src d_tgt"], Float[Tensor, "pair d_tgt"]]:
    """Batched fit of one estimator (:data:`SOLVERS`) at a fixed ridge, float64 (no split, no search)."""
    name, lam, rank = estimator_args(estimator, ridge, rank, x.shape[-1], y.shape[-1])
    if lam == "auto":
        raise InvalidArgumentError("ridge", ridge, "a number >= 0 (solve_map does no search: fit_map_from_states does)")
    eq = NormalEquations(Moments.of(x, y, target_cov=name == "whitened"), bias=bias)
    weight = SOLVERS[name](eq, torch.full((x.shape[0],), lam, dtype=torch.float64), rank)
    return weight, eq.intercept(weight)


def r2_score(
    x: Float[Tensor, "pair n_samples d_src"],
    y: Float[Tensor, "pair n_samples d_tgt"],
    weight: Float[Tensor, "pair d_src d_tgt"],
    bias: Float[Tensor, "pair d_tgt"],
    y_mean: Float[Tensor, "pair 1 d_tgt"] | None = None,
) -> Float[Tensor, "pair"]:
    """Variance-weighted R² per pair: 1 − Σ residual² / Σ (y − ȳ)², summed over all dims.

    ``y_mean`` defaults to the mean of ``y`` itself; pass the training mean for held-out data.
    """
    x = x.double()
    y = y.double()
    pred = x @ weight.double() + bias.double()[:, None, :]
    mean = y.mean(1, keepdim=True) if y_mean is None else y_mean.double()
    ss_res = ((y - pred) ** 2).sum((1, 2))
    ss_tot = ((y - mean) ** 2).sum((1, 2)).clamp_min(1e-300)
    return 1 - ss_res / ss_tot
