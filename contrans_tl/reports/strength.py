"""Steering strength in norm units, and an automatic sweep guarded by KL on neutral text.

Norm units (``transplant(..., unit="norm")``): the offset at layer l is
``alpha · mean‖resid_post[l]‖ · v[l] / ‖v[l]‖`` — alpha is a fraction of the layer's typical
residual norm, read from ``ConceptVector.layer_norms``. Refined vectors record the norms on
their own prompts and mapped vectors the target's norms on the alignment corpus;
:func:`calibrate_norms` re-measures them on one common neutral text, so the same alpha means the
same thing for every vector of every model.

:func:`guarded_sweep` picks alpha automatically: for an increasing grid it measures how far the
steered next-token distribution drifts from the unsteered one on neutral sentences,
``KL(steered ‖ base)`` at the last position averaged over the sentences, and keeps the largest
alpha before the first one whose KL exceeds a budget (in nats). Why this guard: one forward pass
per sentence with ``logits_to_keep=1`` (no per-position vocabulary projection, affordable for a
262k vocabulary), no labels needed, and it measures damage to ordinary text — the thing a
strength setting must not cause. Perplexity over whole sentences would need per-position
logits for every alpha; KL at one position over ~32 sentences is the cheap stand-in. Each
sentence is cut before its last word so the next token is a content word, not the end of the
text.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl import validate
from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import capture, next_token_logits
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import ContransError, EmptyPromptsError, InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.transplant import Unit, steering_offsets, transplant

__all__ = [
    "DEFAULT_ALPHAS",
    "neutral_prompts",
    "calibrate_norms",
    "relative_strength",
    "raw_alpha",
    "kl_divergence",
    "StrengthSweep",
    "guarded_sweep",
]

DEFAULT_ALPHAS: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
"""Default grid in norm units (fractions of the layer's mean residual norm). Steering every
layer at once adds up: on gemma-3-270m all 18 layers at 0.02 already cost ~1 nat of KL."""


def neutral_prompts(n: int = 32, *, texts: Sequence[str] | None = None, min_words: int = 4) -> list[str]:
    """``n`` neutral sentences (evenly spread over the built-in set), each minus its last word."""
    pool = list(texts) if texts is not None else neutral_sentences()
    pool = [t for t in pool if len(t.split()) >= min_words]
    if not pool:
        raise EmptyPromptsError(f"no neutral text with at least {min_words} words")
    step = max(1, len(pool) // max(1, n))
    chosen = pool[::step][:n]
    return [t.rsplit(" ", 1)[0] for t in chosen]


def calibrate_norms(
    vector: ConceptVector, model: ModelHandle, texts: Sequence[str] | None = None, *, batch_size: int = 16
) -> ConceptVector:
    """The same vector with ``layer_norms`` measured on ``model`` over neutral ``texts``.

    Mean ‖resid_post[l]‖ at the last token of each text (default: :func:`neutral_prompts`),
    so norm units refer to one common text for every vector and model.
    """
    vector.check_model(model)
    prompts = list(texts) if texts is not None else neutral_prompts(64)
    states = capture(model, prompts, batch_size=batch_size)
    norms = states.norm(dim=-1).mean(0)
    return dataclasses.replace(vector, layer_norms=norms)


def relative_strength(vector: ConceptVector, alpha: float, *, unit: Unit = "raw") -> dict[int, float]:
    """Offset norm as a fraction of the layer's mean residual norm, per steered layer."""
    if vector.layer_norms is None:
        raise ContransError("the vector records no layer norms; use calibrate_norms first")
    offsets = steering_offsets([vector], [alpha], unit=unit)
    return {layer: float(off.norm() / vector.layer_norms[layer]) for layer, off in sorted(offsets.items())}


def raw_alpha(vector: ConceptVector, alpha_norm: float, layer: int) -> float:
    """The raw alpha whose offset at ``layer`` equals ``alpha_norm`` in norm units."""
    if vector.layer_norms is None:
        raise ContransError("the vector records no layer norms; use calibrate_norms first")
    length = float(vector.vectors[layer].norm())
    if length == 0:
        raise ContransError(f"the vector is zero at layer {layer}")
    return float(alpha_norm) * float(vector.layer_norms[layer]) / length


def kl_divergence(
    steered_logits: Float[Tensor, "batch vocab"], base_logits: Float[Tensor, "batch vocab"]
) -> Float[Tensor, "batch"]:
    """KL(steered ‖ base) per row, in nats (float64)."""
    log_p = torch.log_softmax(steered_logits.double(), dim=-1)
    log_q = torch.log_softmax(base_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)


@dataclass(frozen=True)
class StrengthSweep:
    """Result of :func:`guarded_sweep`: KL (and an optional metric) per alpha, and the choice."""

    alphas: list[float]
    kl_mean: list[float]
    """Mean KL(steered ‖ base) over the neutral prompts, nats."""
    kl_max: list[float]
    budget: float
    chosen: float | None
    """Largest alpha before the first one over budget (None: even the smallest is over)."""
    unit: str
    layers: list[int]
    n_prompts: int
    metric: list[float] | None = None
    """``metric(model)`` under each alpha, when a metric was given (``metric_base`` without)."""
    metric_base: float | None = None
    stopped_early: bool = False
    """True when the sweep stopped at the first alpha over budget (``stop_early``)."""
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _steered_step(
    model: ModelHandle,
    vector: ConceptVector,
    alpha: float,
    *,
    layers: Sequence[int] | None,
    unit: Unit,
    texts: Sequence[str],
    base: Float[Tensor, "batch vocab"],
    metric: Callable[[ModelHandle], float] | None,
    batch_size: int,
) -> tuple[Float[Tensor, "batch"], list[int], float | None]:
    """One alpha of the sweep: KL per text against ``base``, the layers steered, and the metric if given."""
    with transplant(model, vector, alpha=alpha, layers=layers, unit=unit) as offsets:
        kl = kl_divergence(next_token_logits(model, texts, batch_size=batch_size), base)
        score = float(metric(model)) if metric is not None else None
    return kl, sorted(offsets), score


def guarded_sweep(
    model: ModelHandle,
    vector: ConceptVector,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    budget: float = 0.1,
    unit: Unit = "norm",
    layers: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    n_prompts: int = 32,
    metric: Callable[[ModelHandle], float] | None = None,
    stop_early: bool = True,
    batch_size: int = 16,
) -> StrengthSweep:
    """Sweep alpha upwards and keep the largest one whose neutral-text KL stays within ``budget``.

    ``alphas`` are magnitudes, sorted ascending (a negative sign on every entry steers the
    other way); ``budget`` is in nats of mean KL(steered ‖ base) at the last position of
    ``prompts`` (default :func:`neutral_prompts` ``(n_prompts)``). With ``stop_early`` the
    sweep ends at the first alpha over budget (larger ones are not run). ``metric`` (e.g. a
    concept score) is evaluated under every alpha too, to show what the budget buys.
    """
    grid = sorted({validate.real(f"alphas[{i}]", a) for i, a in enumerate(alphas)}, key=abs)
    if not grid:
        raise InvalidArgumentError("alphas", alphas, "at least one strength to sweep")
    budget = validate.real("budget", budget, low=0.0, low_open=True)
    vector.check_model(model)
    texts = list(prompts) if prompts is not None else neutral_prompts(n_prompts)
    base = next_token_logits(model, texts, batch_size=batch_size)
    metric_base = float(metric(model)) if metric is not None else None
    kl_mean: list[float] = []
    kl_max: list[float] = []
    scores: list[float] = []
    chosen: float | None = None
    over = False
    steered_layers: list[int] = []
    for alpha in grid:
        kl, steered_layers, score = _steered_step(model, vector, alpha, layers=layers, unit=unit, texts=texts,
                                                  base=base, metric=metric, batch_size=batch_size)
        if score is not None:
            scores.append(score)
        kl_mean.append(float(kl.mean()))
        kl_max.append(float(kl.max()))
        if not math.isfinite(kl_mean[-1]) or kl_mean[-1] > budget:
            over = True
            if stop_early:
                break
        elif not over:
            chosen = alpha
    return StrengthSweep(
        alphas=grid[: len(kl_mean)],
        kl_mean=kl_mean,
        kl_max=kl_max,
        budget=float(budget),
        chosen=chosen,
        unit=unit,
        layers=steered_layers,
        n_prompts=len(texts),
        metric=scores if metric is not None else None,
        metric_base=metric_base,
        stopped_early=stop_early and over and len(kl_mean) < len(grid),
        notes={"guard": "mean KL(steered || base) of the next token, last position, neutral text"},
    )
