"""Steering strength in norm units, and an automatic sweep guarded by the fluency instrument.

Norm units (``transplant(..., unit="norm")``): the offset at layer l is
``alpha · mean‖resid_post[l]‖ · v[l] / ‖v[l]‖`` — alpha is a fraction of the layer's typical
residual norm, read from ``ConceptVector.layer_norms``. Refined vectors record the norms on
their own prompts and mapped vectors the target's norms on the alignment corpus;
:func:`calibrate_norms` re-measures them on one common neutral text, so the same alpha means the
same thing for every vector of every model.

:func:`guarded_sweep` picks alpha automatically: for an increasing grid it measures, with the
fluency instrument (:func:`contrans_tl.fluency.measure_fluency`: KL(unsteered ‖ steered) per
token of the built-in generic text, every position, whole vocabulary), what each alpha costs
ordinary text, and keeps the largest alpha before the first one whose KL exceeds a budget
(nats/token) — the same measure, on the same text, that every analysis that chooses a strength uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from contrans_tl import validate
from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import capture
from contrans_tl.datasets import generic_texts, neutral_sentences
from contrans_tl.errors import ContransError, EmptyPromptsError, InvalidArgumentError
from contrans_tl.files import json_ready
from contrans_tl.fluency import measure_fluency
from contrans_tl.handle import ModelHandle
from contrans_tl.transplant import Steering, Unit, steering_offsets

__all__ = [
    "DEFAULT_ALPHAS",
    "neutral_prompts",
    "calibrate_norms",
    "relative_strength",
    "raw_alpha",
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


@dataclass(frozen=True)
class StrengthSweep:
    """Result of :func:`guarded_sweep`: KL (and an optional metric) per alpha, and the choice."""

    alphas: list[float]
    kl: list[float]
    """KL(unsteered ‖ steered) per token of the generic text, nats (inf: the steered model broke down)."""
    kl_ci95: list[tuple[float, float]]
    dce: list[float]
    """Change of cross-entropy on the generic text's own tokens, nats/token."""
    budget: float
    chosen: float | None
    """Largest alpha before the first one over budget (None: even the smallest is over)."""
    unit: str
    layers: list[int]
    n_tokens: int
    metric: list[float] | None = None
    """``metric(model)`` under each alpha, when a metric was given (``metric_base`` without)."""
    metric_base: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_ready(dataclasses.asdict(self))


def guarded_sweep(
    model: ModelHandle,
    vector: ConceptVector,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    budget: float = 0.1,
    unit: Unit = "norm",
    layers: Sequence[int] | None = None,
    texts: Sequence[str] | None = None,
    n_texts: int = 19,
    metric: Callable[[ModelHandle], float] | None = None,
) -> StrengthSweep:
    """Sweep alpha upwards and keep the largest one whose KL on generic text stays within ``budget``.

    ``alphas`` are magnitudes, sorted ascending (a negative sign on every entry steers the other
    way); ``budget`` is in nats per token of KL(unsteered ‖ steered) on ``texts`` (default: the first
    ``n_texts`` paragraphs of the built-in generic text), measured for every alpha in one call of
    the fluency instrument. ``metric`` (e.g. a concept score) is evaluated under every alpha too,
    to show what the budget buys.
    """
    grid = sorted({validate.real(f"alphas[{i}]", a) for i, a in enumerate(alphas)}, key=abs)
    if not grid:
        raise InvalidArgumentError("alphas", alphas, "at least one strength to sweep")
    budget = validate.real("budget", budget, low=0.0, low_open=True)
    vector.check_model(model)
    chosen_texts = list(texts) if texts is not None else generic_texts()[: validate.integer("n_texts", n_texts, low=1)]
    steered = [Steering.single(vector, a, layers, unit) for a in grid]
    fluency = measure_fluency(model, chosen_texts, dict(enumerate(steered)))
    scores: list[float] = []
    if metric is not None:
        for s, f in zip(steered, fluency.values()):
            if f.broken:  # the model broke down at this alpha: nothing to score
                scores.append(float("nan"))
                continue
            with s.apply(model):
                scores.append(float(metric(model)))
    chosen: float | None = None
    for alpha, f in zip(grid, fluency.values()):
        if not f.kl <= budget:
            break
        chosen = alpha
    offsets = steering_offsets([vector], [grid[-1]], layers=layers, unit=unit) if grid[-1] != 0 else {}
    return StrengthSweep(
        alphas=grid, kl=[f.kl for f in fluency.values()], kl_ci95=[f.kl_ci95 for f in fluency.values()],
        dce=[f.dce for f in fluency.values()], budget=float(budget), chosen=chosen, unit=unit,
        layers=sorted(offsets) if layers is None else sorted(layers), n_tokens=next(iter(fluency.values())).n_tokens,
        metric=scores if metric is not None else None, metric_base=float(metric(model)) if metric is not None else None,
        notes={"texts": "built-in generic text" if texts is None else f"{len(chosen_texts)} given texts"},
    )
