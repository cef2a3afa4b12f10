"""STEP 1 — refine: contrast prompts → one concept direction per layer of the source model.

``refine`` = :func:`~contrans_tl.capture.capture` on positives and negatives (resid_post at the
last real token, every layer) followed by an :data:`Aggregator` — the paper's mean difference,
or the first principal component of paired differences (RepE).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import capture
from contrans_tl import validate
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.models import identity
from contrans_tl.handle import ModelHandle

__all__ = ["Aggregator", "mean_difference", "pca_difference", "AGGREGATORS", "refine", "concept_from_states"]

Aggregator = Callable[
    [Float[Tensor, "batch layer d_model"], Float[Tensor, "batch layer d_model"]],
    Float[Tensor, "layer d_model"],
]
"""Turns positive and negative activations into one direction per layer."""


def mean_difference(
    positive: Float[Tensor, "batch layer d_model"], negative: Float[Tensor, "batch layer d_model"]
) -> Float[Tensor, "layer d_model"]:
    """mean(positive) − mean(negative), per layer (the paper's eq. 1)."""
    return positive.double().mean(0).float() - negative.double().mean(0).float()


def pca_difference(
    positive: Float[Tensor, "batch layer d_model"], negative: Float[Tensor, "batch layer d_model"]
) -> Float[Tensor, "layer d_model"]:
    """First principal component of paired differences, signed and scaled like the mean difference.

    Requires equally many positives and negatives (pair i is positive[i] − negative[i]). The
    component is unit-norm, so it is rescaled to the mean difference's projection on it.
    """
    if positive.shape[0] != negative.shape[0] or positive.shape[0] < 2:
        raise InvalidArgumentError(
            "method", "pca",
            f"at least 2 positive/negative pairs of equal count for PCA (got {positive.shape[0]} positives "
            f"and {negative.shape[0]} negatives); use method='mean_diff'",
        )
    diffs = (positive - negative).double()  # [pair, layer, d]
    centered = diffs - diffs.mean(0, keepdim=True)
    # batched over layers: [layer, pair, d]
    _, _, vh = torch.linalg.svd(centered.transpose(0, 1), full_matrices=False)
    direction = vh[:, 0, :]  # [layer, d]
    mean_diff = diffs.mean(0)
    scale = (mean_diff * direction).sum(-1, keepdim=True)  # signed: points along the mean difference
    return (direction * scale).float()


AGGREGATORS: dict[str, Aggregator] = {"mean_diff": mean_difference, "pca": pca_difference}


def _aggregator(method: Literal["mean_diff", "pca"] | Aggregator, n_pos: int, n_neg: int) -> Aggregator:
    """The aggregator ``method`` names, checked against the counts it needs (PCA pairs them)."""
    aggregate = method if callable(method) else AGGREGATORS[validate.choice("method", method, list(AGGREGATORS))]
    if aggregate is pca_difference and n_pos != n_neg:
        raise InvalidArgumentError(
            "method", "pca", f"as many positives as negatives (got {n_pos} positives and {n_neg} negatives)"
        )
    return aggregate


def refine(
    model: ModelHandle,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    method: Literal["mean_diff", "pca"] | Aggregator = "mean_diff",
    batch_size: int = 16,
    progress: bool = False,
) -> ConceptVector:
    """Refine a concept in ``model`` from contrast prompts (all layers, last real token).

    ``method`` is "mean_diff" (the paper), "pca" (paired differences, needs equal list
    lengths), or any :data:`Aggregator`. The result records the model's mean resid_post norm
    per layer, so alpha can later be given in norm units.
    """
    positive = validate.texts("positive", positive)
    negative = validate.texts("negative", negative)
    if sorted(positive) == sorted(negative):
        raise InvalidArgumentError("negative", negative, "prompts that differ from the positives (the same prompts "
                                   "on both sides give a zero vector)")
    _aggregator(method, len(positive), len(negative))  # a bad method fails before any forward pass
    batch_size = validate.integer("batch_size", batch_size, low=1)
    pos = capture(model, positive, batch_size=batch_size, progress="positives" if progress else None)
    neg = capture(model, negative, batch_size=batch_size, progress="negatives" if progress else None)
    return concept_from_states(model, pos, neg, method=method)


def concept_from_states(
    model: ModelHandle,
    positive: Float[Tensor, "n_pos layer d_model"],
    negative: Float[Tensor, "n_neg layer d_model"],
    *,
    method: Literal["mean_diff", "pca"] | Aggregator = "mean_diff",
) -> ConceptVector:
    """The concept vector of captured states (every layer of ``model``, as :func:`refine` returns them).

    For callers that capture each prompt once and refine many concepts from the same states
    (the demo's six emotions and its refinement sizes share one capture per model).
    """
    aggregate = _aggregator(method, len(positive), len(negative))
    ident = identity(model)
    if positive.shape[1:] != (ident.n_layers, ident.d_model) or negative.shape[1:] != positive.shape[1:]:
        raise InvalidArgumentError("positive/negative", (tuple(positive.shape), tuple(negative.shape)),
                                   f"states of every layer: [n, {ident.n_layers}, {ident.d_model}] each")
    if len(positive) == 0 or len(negative) == 0:
        raise InvalidArgumentError("positive/negative", (len(positive), len(negative)), "at least one state each")
    norms = torch.cat([positive, negative]).norm(dim=-1).mean(0)
    return ConceptVector(
        vectors=aggregate(positive, negative),
        model=ident,
        layers=tuple(range(ident.n_layers)),
        method=method if isinstance(method, str) else getattr(method, "__name__", "custom"),
        layer_norms=norms,
        n_prompts=len(positive) + len(negative),
    )
