"""STEP 2 — reformulate: fit affine maps source → target on aligned hidden states.

For each (source layer, target layer) pair, F minimises ||X F − Y||² (+ ridge ||F||²) over
aligned samples of the same text (the paper's eq. 2), with an optional bias. All pairs are
solved at once in float64 from the centred normal equations: one batched eigendecomposition
(the SVD's right factors and singular values) serves every ridge strength of the search. The ridge is chosen per pair on a validation
split of the training texts; R² is reported on held-out texts that neither saw.

Other estimators (``estimator=``) solve from the same sufficient statistics: plain least squares
(the paper), orthogonal Procrustes, reduced-rank regression, and the whitened (CCA) map that
carries a concept's mean difference without the attenuation of least squares; see
:data:`SOLVERS`. Every one reports its held-out R² on the same held-out texts.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.pairing import PairedStates, capture_paired, corpus_hash
from contrans_tl.artifacts import AffineMap
from contrans_tl.capture import check_layers
from contrans_tl.corpus import MapCorpus
from contrans_tl import validate
from contrans_tl.errors import InvalidArgumentError, WidthMismatchError
from contrans_tl.handle import ModelHandle

__all__ = [
    "drop_outlier_samples",
    "default_layer_pairs",
    "Moments",
    "NormalEquations",
    "ridge_solve",
    "solve_map",
    "r2_score",
    "RIDGE_GRID",
    "ESTIMATORS",
    "Solver",
    "SOLVERS",
    "fit_map_from_states",
    "capture_pair",
    "fit_map",
]

RIDGE_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
"""Ridge strengths searched by ``ridge="auto"``, in units of the mean squared singular value."""

ESTIMATORS: tuple[str, ...] = validate.MAP_ESTIMATORS
"""``estimator=`` values: "lstsq", "ridge" (the default), "procrustes", "rrr", "whitened"."""


def default_layer_pairs(n_source: int, n_target: int) -> list[tuple[int, int]]:
    """Pair every target layer j with the source layer at the same relative depth.

    j ↔ round((j+1)·L_src/L_tgt) − 1, so the last layers pair with each other.
    """
    return [(max(0, math.floor((j + 1) * n_source / n_target + 0.5) - 1), j) for j in range(n_target)]


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


def _estimator_args(
    estimator: object, ridge: object, rank: object, d_src: int, d_tgt: int
) -> tuple[str, float | Literal["auto"], int | None]:
    """Check ``estimator``, and the ``ridge`` and ``rank`` it takes ("auto" is 0 for an estimator without a ridge)."""
    name = validate.choice("estimator", estimator, list(ESTIMATORS))
    checked = _ridge_arg(ridge)
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
    name, lam, rank = _estimator_args(estimator, ridge, rank, x.shape[-1], y.shape[-1])
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


def _split_texts(n_texts: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Boolean mask over texts: True for the ``fraction`` held out (at least one if > 0)."""
    mask = torch.zeros(n_texts, dtype=torch.bool)
    if fraction <= 0:
        return mask
    n_out = max(1, round(n_texts * fraction))
    if n_out >= n_texts:
        raise InvalidArgumentError("holdout", fraction, f"a share that leaves texts to fit on (of {n_texts} texts)")
    mask[torch.randperm(n_texts, generator=generator)[:n_out]] = True
    return mask


def _ridge_arg(ridge: object) -> float | Literal["auto"]:
    """``ridge`` is "auto" or a finite number >= 0."""
    if isinstance(ridge, str):
        if ridge == "auto":
            return "auto"
        raise InvalidArgumentError("ridge", ridge, "'auto' or a number >= 0")
    return validate.real("ridge", ridge, low=0.0)


def drop_outlier_samples(
    source: PairedStates, target: PairedStates, *, factor: float = 10.0
) -> tuple[PairedStates, PairedStates, int]:
    """Both captures without the samples whose norm exceeds ``factor`` × the layer's median.

    A sample is dropped from both sides when, at any captured layer of either model, its
    resid_post norm is more than ``factor`` times that layer's median norm. Massive
    activations do this: on the default pair one token ("Snow" opening a sentence) reaches
    ~140× the median norm at SmolLM2 layers 11–29, and when its text is held out the maps
    of all those layers score a held-out R² far below zero although they fit the rest well.
    Returns the filtered captures and the number of samples dropped.
    """
    if factor <= 0:
        return source, target, 0
    if not torch.equal(source.text_index, target.text_index):
        raise InvalidArgumentError(
            "target", f"<capture of {target.model.name}, {len(target.text_index)} samples>",
            "a capture aligned with source sample by sample (same texts, same pairing scheme)",
        )

    def bad(states: PairedStates) -> Tensor:
        norms = states.states.norm(dim=-1)  # [samples, layers]
        return (norms > factor * norms.median(dim=0).values).any(dim=1)

    keep = ~(bad(source) | bad(target))
    n_dropped = int((~keep).sum())
    if n_dropped == 0:
        return source, target, 0

    def subset(states: PairedStates) -> PairedStates:
        return dataclasses.replace(states, states=states.states[keep], text_index=states.text_index[keep])

    return subset(source), subset(target), n_dropped


def _check_corpus(corpus: object, states: PairedStates) -> dict[str, Any] | None:
    """The provenance of ``corpus`` (None if not given) after checking the states were captured on it."""
    if corpus is None:
        return None
    if not isinstance(corpus, MapCorpus):
        raise InvalidArgumentError("corpus", corpus, "a MapCorpus from contrans_tl.corpus.resolve_corpus, or None")
    if corpus_hash(corpus.texts) != states.corpus:
        raise InvalidArgumentError(
            "corpus", corpus.spec, f"the corpus the states were captured on (hash {states.corpus}; "
            f"{corpus.spec!r} hashes to {corpus_hash(corpus.texts)}): capture corpus.texts")
    return corpus.provenance


def _choose_ridge(
    estimator: str, rank: int | None, eq: NormalEquations,
    x_val: Float[Tensor, "pair n_val d_src"], y_val: Float[Tensor, "pair n_val d_tgt"],
) -> Float[Tensor, "pair"]:
    """Per pair, the strength of :data:`RIDGE_GRID` whose fit scores the best validation R²."""
    if estimator == "ridge":
        scores = eq.validation_r2(x_val, y_val, RIDGE_GRID)  # the whole path from three products
    else:
        solve = SOLVERS[estimator]
        rows = []
        for ridge in RIDGE_GRID:
            weight = solve(eq, torch.full_like(eq.scale, ridge), rank)
            rows.append(r2_score(x_val, y_val, weight, eq.intercept(weight), eq.y_mean))
        scores = torch.stack(rows)
    return torch.tensor(RIDGE_GRID, dtype=torch.float64)[scores.argmax(0)]


def _fitted_extras(estimator: str, weight: Float[Tensor, "pair d_src d_tgt"]) -> dict[str, Any]:
    """Estimator-specific provenance: Procrustes's scale s per pair (weight = s·Q, Q semi-orthogonal)."""
    if estimator != "procrustes":
        return {}
    scale = weight.norm(dim=(1, 2)) / min(weight.shape[1:]) ** 0.5  # ||s·Q||_F = s·sqrt(min(d_src, d_tgt))
    return {"scale": [float(x) for x in scale]}


def fit_map_from_states(
    source: PairedStates,
    target: PairedStates,
    *,
    layers: Sequence[tuple[int, int]] | None = None,
    estimator: str = "ridge",
    ridge: float | Literal["auto"] = "auto",
    rank: int | None = None,
    holdout: float = 0.2,
    bias: bool = True,
    seed: int = 0,
    outlier_factor: float = 0.0,
    corpus: MapCorpus | None = None,
) -> AffineMap:
    """Fit the per-pair affine maps from two models' aligned captures of the same corpus.

    ``layers`` lists (source layer, target layer) pairs (default: :func:`default_layer_pairs`).
    ``estimator`` picks the map family (:data:`SOLVERS`): "ridge" (default), "lstsq" (ridge 0, the
    paper), "procrustes" (scaled semi-orthogonal), "rrr" (reduced rank ``rank``) or "whitened"
    (CCA, optionally truncated to ``rank`` canonical pairs). ``holdout`` of the texts is set aside
    for the reported R²; with ``ridge="auto"`` (for "ridge", "rrr" and "whitened"; 0 for the
    others) another fifth of the remaining texts picks each pair's ridge from :data:`RIDGE_GRID`
    by validation R², and the final maps are refitted on all training texts. With
    ``outlier_factor > 0`` samples with massive activations (norm above ``outlier_factor`` × the
    layer's median, :func:`drop_outlier_samples`) are left out first: one such token can dominate
    a least-squares fit (the demo uses 10; the default 0 keeps every sample). ``corpus``, the
    :class:`~contrans_tl.corpus.MapCorpus` the states were captured on, is checked against their
    hash and recorded. Provenance keys: ``estimator``, ``rank``, ``scale`` (procrustes),
    ``corpus`` (the MapCorpus provenance or None), plus sample counts and the split.
    """
    if not isinstance(source, PairedStates) or not isinstance(target, PairedStates):
        raise InvalidArgumentError("source/target", (type(source).__name__, type(target).__name__),
                                   "PairedStates from capture_paired (use fit_map for models)")
    estimator, ridge, rank = _estimator_args(estimator, ridge, rank, source.model.d_model, target.model.d_model)
    holdout = validate.fraction("holdout", holdout)
    if source.corpus != target.corpus or source.scheme != target.scheme:
        raise InvalidArgumentError("target", f"{target.corpus}/{target.scheme}",
            "source and target states come from different corpora or alignment schemes "
            f"({source.corpus}/{source.scheme} vs {target.corpus}/{target.scheme})"
        )
    if source.states.shape[0] != target.states.shape[0] or not torch.equal(source.text_index, target.text_index):
        raise WidthMismatchError(
            f"source has {source.states.shape[0]} aligned samples but target has "
            f"{target.states.shape[0]}: token-level alignment needs the same tokenizer; use scheme='words'"
        )
    corpus_provenance = _check_corpus(corpus, source)
    pairs = (validate.layer_pairs("layers", layers) if layers is not None
             else default_layer_pairs(source.model.n_layers, target.model.n_layers))
    if not outlier_factor >= 0:
        raise InvalidArgumentError("outlier_factor", outlier_factor, "a factor >= 0 (0 keeps every sample)")
    source, target, n_dropped = drop_outlier_samples(source, target, factor=outlier_factor)
    if len(source.text_index) == 0:
        raise InvalidArgumentError("outlier_factor", outlier_factor, "a factor that leaves some samples (or 0)")
    x = torch.stack([source.layer(s) for s, _ in pairs])  # [pair, n, d_src]
    y = torch.stack([target.layer(t) for _, t in pairs])  # [pair, n, d_tgt]
    n_texts = int(source.text_index.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    held_text = _split_texts(n_texts, holdout, gen)
    held = held_text[source.text_index]
    train_idx, held_idx = (~held).nonzero()[:, 0], held.nonzero()[:, 0]
    n_train, d_src = len(train_idx), x.shape[-1]
    if n_train < d_src:
        warnings.warn(
            f"fit_map: {n_train} training samples for source width {d_src}: the system is "
            "underdetermined, so the minimum-norm solution is used (add text or a ridge)",
            stacklevel=2,
        )
    cov = estimator == "whitened"
    if ridge == "auto":
        train_texts = (~held_text).nonzero()[:, 0]
        val_text = torch.zeros(n_texts, dtype=torch.bool)
        val_text[train_texts[_split_texts(len(train_texts), 0.2, gen)]] = True
        val = val_text[source.text_index]
        fit_idx, val_idx = (~val & ~held).nonzero()[:, 0], val.nonzero()[:, 0]
        fit_moments = Moments.of(x[:, fit_idx], y[:, fit_idx], target_cov=cov)
        ridge_per_pair = _choose_ridge(estimator, rank, NormalEquations(fit_moments, bias=bias),
                                       x[:, val_idx], y[:, val_idx])
        train_moments = fit_moments + Moments.of(x[:, val_idx], y[:, val_idx], target_cov=cov)
    else:
        ridge_per_pair = torch.full((len(pairs),), float(ridge), dtype=torch.float64)
        train_moments = Moments.of(x[:, train_idx], y[:, train_idx], target_cov=cov)
    factors = NormalEquations(train_moments, bias=bias)
    weight = SOLVERS[estimator](factors, ridge_per_pair, rank)
    bias_vec = factors.intercept(weight)
    r2_train = factors.r2(weight)
    if len(held_idx):
        r2_held = r2_score(x[:, held_idx], y[:, held_idx], weight, bias_vec, factors.y_mean)
    else:
        r2_held = torch.full((len(pairs),), float("nan"))
    target_norms = torch.zeros(target.model.n_layers)
    for i, layer in enumerate(target.layers):
        target_norms[layer] = target.states[:, i].norm(dim=-1).mean()
    return AffineMap(
        weight=weight.float(),
        bias=bias_vec.float(),
        source=source.model,
        target=target.model,
        source_layers=tuple(s for s, _ in pairs),
        target_layers=tuple(t for _, t in pairs),
        r2_heldout=r2_held.float(),
        r2_train=r2_train.float(),
        ridge=ridge_per_pair,
        target_norms=target_norms,
        provenance={
            "corpus_hash": source.corpus,
            "alignment": source.scheme,
            "n_texts": n_texts,
            "n_train_samples": n_train,
            "n_heldout_samples": len(held_idx),
            "holdout": holdout,
            "seed": seed,
            "outlier_factor": outlier_factor,
            "outliers_dropped": n_dropped,
            "estimator": estimator,
            "rank": rank,
            **_fitted_extras(estimator, weight),
            "corpus": corpus_provenance,
        },
    )


def _same_tokens(source: ModelHandle, target: ModelHandle, texts: Sequence[str]) -> bool:
    """Whether both tokenizers split every text into the same tokens (BOS aside)."""
    if source.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        return False
    texts = list(texts)
    return bool(source.tokenizer(texts, add_special_tokens=False)["input_ids"]
                == target.tokenizer(texts, add_special_tokens=False)["input_ids"])


def capture_pair(
    source: ModelHandle,
    target: ModelHandle,
    texts: Sequence[str],
    source_layers: Sequence[int],
    target_layers: Sequence[int],
    *,
    alignment: Literal["auto", "words", "tokens"] = "auto",
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[PairedStates, PairedStates]:
    """Both models' paired states on ``texts``: every token when the two tokenizers split every
    text identically ("auto"), word boundaries otherwise."""
    scheme: Literal["words", "tokens"]
    if alignment == "auto":
        scheme = "tokens" if _same_tokens(source, target, texts) else "words"
    else:
        scheme = alignment
    xs = capture_paired(source, texts, layers=source_layers, scheme=scheme, batch_size=batch_size,
                         progress="source corpus" if progress else None)
    ys = capture_paired(target, texts, layers=target_layers, scheme=scheme, batch_size=batch_size,
                         progress="target corpus" if progress else None)
    return xs, ys


def fit_map(
    source: ModelHandle,
    target: ModelHandle,
    texts: Sequence[str] | MapCorpus,
    *,
    layers: Sequence[tuple[int, int]] | None = None,
    estimator: str = "ridge",
    ridge: float | Literal["auto"] = "auto",
    rank: int | None = None,
    holdout: float = 0.2,
    bias: bool = True,
    alignment: Literal["auto", "words", "tokens"] = "auto",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    outlier_factor: float = 0.0,
) -> AffineMap:
    """Reformulate: capture both models on ``texts`` and fit per-layer-pair affine maps.

    ``texts`` is a list of texts or a :class:`~contrans_tl.corpus.MapCorpus` (from
    :func:`~contrans_tl.corpus.resolve_corpus`), whose spec and digest the map then records in
    ``provenance["corpus"]``. ``alignment="auto"`` uses every token when the two tokenizers split
    every text identically and word boundaries otherwise. ``estimator``, ``ridge`` (a fixed
    strength relative to the mean squared singular value of the centred source states, or "auto":
    validation) and ``rank`` are as in :func:`fit_map_from_states`.
    """
    corpus = texts if isinstance(texts, MapCorpus) else None
    texts = validate.texts("texts", list(corpus.texts) if corpus else texts, what="corpus texts")
    _estimator_args(estimator, ridge, rank, int(source.cfg.d_model), int(target.cfg.d_model))
    validate.fraction("holdout", holdout)
    validate.choice("alignment", alignment, ["auto", "words", "tokens"])
    validate.integer("batch_size", batch_size, low=1)
    n_src, n_tgt = int(source.cfg.n_layers), int(target.cfg.n_layers)
    pairs = validate.layer_pairs("layers", layers) if layers is not None else default_layer_pairs(n_src, n_tgt)
    src_layers = check_layers(source, sorted({s for s, _ in pairs}))
    tgt_layers = check_layers(target, sorted({t for _, t in pairs}))
    xs, ys = capture_pair(source, target, texts, src_layers, tgt_layers,
                          alignment=alignment, batch_size=batch_size, progress=progress)
    return fit_map_from_states(xs, ys, layers=pairs, estimator=estimator, ridge=ridge, rank=rank, holdout=holdout,
                               bias=bias, seed=seed, outlier_factor=outlier_factor, corpus=corpus)
