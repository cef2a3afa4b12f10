"""STEP 2 — reformulate: fit affine maps source → target on aligned hidden states.

For each (source layer, target layer) pair, F minimises ||X F − Y||² (+ ridge ||F||²) over
aligned samples of the same text (the paper's eq. 2), with an optional bias. All pairs are
solved at once in float64 from the centred normal equations: one batched eigendecomposition
(the SVD's right factors and singular values) serves every ridge strength of the search. The ridge is chosen per pair on a validation
split of the training texts; R² is reported on held-out texts that neither saw.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.pairing import PairedStates, capture_paired
from contrans_tl.artifacts import AffineMap
from contrans_tl.capture import check_layers
from contrans_tl import validate
from contrans_tl.errors import InvalidArgumentError, WidthMismatchError
from contrans_tl.handle import ModelHandle

__all__ = [
    "drop_outlier_samples",
    "default_layer_pairs",
    "Moments",
    "NormalEquations",
    "ridge_solve",
    "r2_score",
    "RIDGE_GRID",
    "fit_map_from_states",
    "capture_pair",
    "fit_map",
]

RIDGE_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
"""Ridge strengths searched by ``ridge="auto"``, in units of the mean squared singular value."""


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

    @classmethod
    def of(cls, x: Float[Tensor, "pair n_samples d_src"], y: Float[Tensor, "pair n_samples d_tgt"]) -> "Moments":
        """One batched GEMM pass over the samples."""
        x, y = x.double(), y.double()
        return cls(
            n=x.shape[1],
            sx=x.sum(1),
            sy=y.sum(1),
            sxx=x.transpose(1, 2) @ x,
            sxy=x.transpose(1, 2) @ y,
            syy=torch.linalg.vector_norm(y, dim=(1, 2)) ** 2,
        )

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.sx + other.sx, self.sy + other.sy,
                       self.sxx + other.sxx, self.sxy + other.sxy, self.syy + other.syy)


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
        self.rank_scale = max(n, self.gram.shape[-1])
        self._eig: tuple[Tensor, Tensor, Tensor] | None = None

    def _eigen(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._eig is None:
            eig, v = torch.linalg.eigh(self.gram)  # one batched call for all pairs
            eig = eig.clamp_min(0)
            self._eig = (eig, v, v.transpose(1, 2) @ self.cross)
        return self._eig

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
                return weight, (self.y_mean - self.x_mean @ weight)[:, 0]
        _, v, proj = self._eigen()
        weight = v @ (self._shrink(lam)[:, :, None] * proj)
        return weight, (self.y_mean - self.x_mean @ weight)[:, 0]

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


def fit_map_from_states(
    source: PairedStates,
    target: PairedStates,
    *,
    layers: Sequence[tuple[int, int]] | None = None,
    ridge: float | Literal["auto"] = "auto",
    holdout: float = 0.2,
    bias: bool = True,
    seed: int = 0,
    outlier_factor: float = 0.0,
) -> AffineMap:
    """Fit the per-pair affine maps from two models' aligned captures of the same corpus.

    ``layers`` lists (source layer, target layer) pairs (default: :func:`default_layer_pairs`).
    ``holdout`` of the texts is set aside for the reported R²; with ``ridge="auto"`` another
    fifth of the remaining texts picks each pair's ridge from :data:`RIDGE_GRID`, and the
    final maps are refitted on all training texts. With ``outlier_factor > 0`` samples with massive
    activations (norm above ``outlier_factor`` × the layer's median, :func:`drop_outlier_samples`)
    are left out first: one such token can dominate a least-squares fit (the demo uses 10; the
    default 0 keeps every sample).
    """
    if not isinstance(source, PairedStates) or not isinstance(target, PairedStates):
        raise InvalidArgumentError("source/target", (type(source).__name__, type(target).__name__),
                                   "PairedStates from capture_paired (use fit_map for models)")
    ridge = _ridge_arg(ridge)
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
    if ridge == "auto":
        train_texts = (~held_text).nonzero()[:, 0]
        val_text = torch.zeros(n_texts, dtype=torch.bool)
        val_text[train_texts[_split_texts(len(train_texts), 0.2, gen)]] = True
        val = val_text[source.text_index]
        fit_idx, val_idx = (~val & ~held).nonzero()[:, 0], val.nonzero()[:, 0]
        fit_moments = Moments.of(x[:, fit_idx], y[:, fit_idx])
        factors = NormalEquations(fit_moments, bias=bias)
        best = factors.validation_r2(x[:, val_idx], y[:, val_idx], RIDGE_GRID).argmax(0)
        ridge_per_pair = torch.tensor(RIDGE_GRID, dtype=torch.float64)[best]
        train_moments = fit_moments + Moments.of(x[:, val_idx], y[:, val_idx])
    else:
        ridge_per_pair = torch.full((len(pairs),), float(ridge), dtype=torch.float64)
        train_moments = Moments.of(x[:, train_idx], y[:, train_idx])
    factors = NormalEquations(train_moments, bias=bias)
    weight, bias_vec = factors.solve(ridge_per_pair)
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
    texts: Sequence[str],
    *,
    layers: Sequence[tuple[int, int]] | None = None,
    ridge: float | Literal["auto"] = "auto",
    holdout: float = 0.2,
    bias: bool = True,
    alignment: Literal["auto", "words", "tokens"] = "auto",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    outlier_factor: float = 0.0,
) -> AffineMap:
    """Reformulate: capture both models on ``texts`` and fit per-layer-pair affine maps.

    ``alignment="auto"`` uses every token when the two tokenizers split every text
    identically and word boundaries otherwise. ``ridge`` is a fixed strength (relative to
    the mean squared singular value of the centred source states) or "auto" (validation).
    """
    texts = validate.texts("texts", texts, what="corpus texts")
    _ridge_arg(ridge)
    validate.fraction("holdout", holdout)
    validate.choice("alignment", alignment, ["auto", "words", "tokens"])
    validate.integer("batch_size", batch_size, low=1)
    n_src, n_tgt = int(source.cfg.n_layers), int(target.cfg.n_layers)
    pairs = validate.layer_pairs("layers", layers) if layers is not None else default_layer_pairs(n_src, n_tgt)
    src_layers = check_layers(source, sorted({s for s, _ in pairs}))
    tgt_layers = check_layers(target, sorted({t for _, t in pairs}))
    xs, ys = capture_pair(source, target, texts, src_layers, tgt_layers,
                          alignment=alignment, batch_size=batch_size, progress=progress)
    return fit_map_from_states(xs, ys, layers=pairs, ridge=ridge, holdout=holdout, bias=bias, seed=seed,
                               outlier_factor=outlier_factor)
