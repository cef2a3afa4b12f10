"""STEP 2 — reformulate: fit affine maps source → target on aligned hidden states.

Both models read the same texts (:mod:`contrans_tl.pairing` pairs their states at word boundaries);
per (source layer, target layer) pair an affine map is fitted by the chosen estimator
(:mod:`contrans_tl.estimators`: least squares with a validation-chosen ridge by default, plain least
squares as in the paper, Procrustes, reduced-rank, whitened), with the ridge chosen per pair on a
validation split of the training texts and R² reported on held-out texts that neither saw.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.estimators import (ESTIMATORS, RIDGE_GRID, SOLVERS, Moments, NormalEquations, Solver, estimator_args,
                                    r2_score, ridge_solve, solve_map)
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



def default_layer_pairs(n_source: int, n_target: int) -> list[tuple[int, int]]:
    """Pair every target layer j with the source layer at the same relative depth.

    j ↔ round((j+1)·L_src/L_tgt) − 1, so the last layers pair with each other.
    """
    return [(max(0, math.floor((j + 1) * n_source / n_target + 0.5) - 1), j) for j in range(n_target)]


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
    estimator, ridge, rank = estimator_args(estimator, ridge, rank, source.model.d_model, target.model.d_model)
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
    estimator_args(estimator, ridge, rank, int(source.cfg.d_model), int(target.cfg.d_model))
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
