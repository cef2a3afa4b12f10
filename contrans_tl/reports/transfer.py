"""Does a transplanted concept transfer? The transfer report.

:func:`transfer_report` for an :class:`~contrans_tl.AffineMap`, a source concept vector and the
same concept refined natively in the target:

* per layer pair, the map's held-out R² (how well it predicts target states on unseen text);
* per pair, the cosine between the mapped vector v̂[t] and the native vector u[t];
* the *causal ratio*: the effect of the transplanted vector on a concept metric divided by the
  effect of the native vector at matched norm. Effect = metric(steered) − metric(unsteered).
  Matched norm: the native vector is rescaled, layer by layer, to the norm of the transplanted
  offset, so the two differ in direction only. Computed for all steered layers together and,
  on request, one layer at a time.

A high cosine with a causal ratio near zero is flagged: the mapped vector points the native way
in the measured geometry, yet moves the model little — the cosine is then not evidence of
transfer (e.g. the agreeing component is one the model does not read).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.capture import check_layers
from contrans_tl.errors import ContransError, ModelMismatchError
from contrans_tl.files import write_json
from contrans_tl.handle import ModelHandle
from contrans_tl.metrics import layer_cosine
from contrans_tl.metrics import cosine
from contrans_tl.transplant import Unit, steering_offsets, transplant

__all__ = ["Metric", "TransferReport", "transfer_report"]

Metric = Callable[[ModelHandle], float]
"""A concept score of the model as it is (hooks included): ``metric(model) -> float``."""


@dataclass
class TransferReport:
    """What :func:`transfer_report` measured; ``to_dict`` is the JSON written by ``contrans report``."""

    source: str
    target: str
    concept: str
    alpha: float
    unit: str
    metric_name: str | None
    metric_base: float | None
    pairs: list[dict[str, Any]]
    """One row per map pair: source/target layer, held-out and train R², ridge, cosine, norms."""
    cosine_mean: float
    """Mean of the per-pair cosines over the steered layers."""
    combined: dict[str, Any] | None = None
    """All steered layers at once: metric and effect of mapped and native, causal ratio."""
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    """The same, one target layer at a time (layers asked for with ``per_layer``)."""
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as strict JSON (NaN → null), atomically."""
        return write_json(path, self.to_dict())


def _offset_vector(template: ConceptVector, offsets: dict[int, Tensor]) -> ConceptVector:
    """A vector whose rows are the given offsets (to be applied raw with alpha 1)."""
    rows = torch.zeros_like(template.vectors)
    for layer, off in offsets.items():
        rows[layer] = off.to(rows.dtype)
    return dataclasses.replace(template, vectors=rows, layers=tuple(sorted(offsets)), method="offsets")


def _matched(native: ConceptVector, offsets: dict[int, Tensor]) -> dict[int, Tensor]:
    """Native rows rescaled to each offset's norm (zero where the native row is zero)."""
    out = {}
    for layer, off in offsets.items():
        u = native.vectors[layer].double()
        n = u.norm()
        out[layer] = (u / n * off.double().norm()).float() if n > 0 else torch.zeros_like(off)
    return out


def _causal(
    model: ModelHandle,
    mapped: ConceptVector,
    native: ConceptVector,
    metric: Metric,
    base: float,
    *,
    alpha: float,
    unit: Unit,
    layers: Sequence[int],
    min_effect: float,
) -> dict[str, Any]:
    """Effects of the mapped vector and the norm-matched native vector at ``layers``, and their ratio."""
    offsets = steering_offsets([mapped], [alpha], layers=layers, unit=unit)
    if not offsets:
        raise ContransError(f"the mapped vector is zero at layers {list(layers)}")
    native_offsets = _matched(native, offsets)
    with transplant(model, _offset_vector(mapped, offsets), alpha=1.0):
        m_mapped = float(metric(model))
    with transplant(model, _offset_vector(native, native_offsets), alpha=1.0):
        m_native = float(metric(model))
    e_mapped, e_native = m_mapped - base, m_native - base
    ratio = e_mapped / e_native if abs(e_native) > min_effect else float("nan")
    return {
        "layers": sorted(offsets),
        "offset_norm": {int(k): float(v.norm()) for k, v in sorted(offsets.items())},
        "metric_mapped": m_mapped,
        "metric_native": m_native,
        "effect_mapped": e_mapped,
        "effect_native": e_native,
        "causal_ratio": ratio,
        "cosine": cosine(
            torch.stack([mapped.vectors[l] for l in sorted(offsets)]),
            torch.stack([native.vectors[l] for l in sorted(offsets)]),
        ),
    }


def _flag(row: dict[str, Any], where: str, cos_threshold: float, ratio_threshold: float) -> str | None:
    """A warning when the ratio is undefined, or the cosine is high while the ratio is near zero."""
    ratio = row.get("causal_ratio")
    if ratio is None:
        return None
    if not math.isfinite(ratio):
        return f"{where}: the native vector has no measurable effect at this alpha; the causal ratio is undefined (raise alpha)"
    if row["cosine"] >= cos_threshold and abs(ratio) <= ratio_threshold:
        return (
            f"{where}: cosine to the native vector is high ({row['cosine']:.2f}) but the causal ratio is "
            f"near zero ({ratio:.2f}): the mapped vector agrees in direction yet barely moves the concept"
        )
    return None


def _pair_rows(
    amap: AffineMap, mapped: ConceptVector, native: ConceptVector, steered: Sequence[int]
) -> list[dict[str, Any]]:
    """The geometric part: one row per map pair (R², ridge, cosine to the native vector, norms)."""
    cos = layer_cosine(mapped.vectors, native.vectors)
    rows = []
    for i, (s, t) in enumerate(amap.pairs):
        rows.append(
            {
                "source_layer": s,
                "target_layer": t,
                "r2_heldout": float(amap.r2_heldout[i]),
                "r2_train": float(amap.r2_train[i]),
                "ridge": float(amap.ridge[i]),
                "cosine": float(cos[t]),
                "mapped_norm": float(mapped.vectors[t].norm()),
                "native_norm": float(native.vectors[t].norm()),
                "steered": t in steered,
            }
        )
    return rows


def _measure_causal(
    report: TransferReport,
    model: ModelHandle,
    mapped: ConceptVector,
    native: ConceptVector,
    metric: Metric,
    *,
    alpha: float,
    unit: Unit,
    steered: Sequence[int],
    per_layer: Sequence[int],
    per_layer_alpha: float,
    min_effect: float,
    cos_threshold: float,
    ratio_threshold: float,
) -> None:
    """Fill in the report's causal part: base metric, all steered layers together, each per-layer run, warnings."""
    base = float(metric(model))
    report.metric_base = base
    report.combined = _causal(model, mapped, native, metric, base, layers=steered, alpha=alpha,
                              unit=unit, min_effect=min_effect)
    for layer in per_layer:
        row = _causal(model, mapped, native, metric, base, layers=[int(layer)], alpha=per_layer_alpha,
                      unit=unit, min_effect=min_effect)
        report.per_layer.append({"target_layer": int(layer), "alpha": per_layer_alpha, **row})
    notes = [_flag(report.combined, "all steered layers", cos_threshold, ratio_threshold)]
    notes += [_flag(row, f"target layer {row['target_layer']}", cos_threshold, ratio_threshold)
              for row in report.per_layer]
    report.warnings.extend(note for note in notes if note)


def transfer_report(
    model: ModelHandle,
    amap: AffineMap,
    source_vector: ConceptVector,
    native_vector: ConceptVector,
    *,
    metric: Metric | None = None,
    metric_name: str | None = None,
    concept: str = "",
    alpha: float = 0.1,
    unit: Unit = "norm",
    layers: Sequence[int] | None = None,
    per_layer: Sequence[int] = (),
    per_layer_alpha: float | None = None,
    cos_threshold: float = 0.5,
    ratio_threshold: float = 0.2,
    min_effect: float = 1e-6,
) -> TransferReport:
    """Held-out R² and cosine per layer pair, and the causal ratio of mapped vs native vector.

    ``model`` is the target. ``layers`` are the target layers steered together (default: all
    layers of the map); ``per_layer`` lists target layers also steered one at a time.
    ``alpha``/``unit`` set the transplanted vector's strength as in
    :func:`~contrans_tl.transplant.transplant`; the native vector gets the same offset norm per
    layer; ``per_layer_alpha`` (default ``alpha``) is the strength of the one-layer runs, since
    one layer at the all-layer strength often moves nothing. Without ``metric`` only the
    geometric part is computed.
    """
    if native_vector.model != amap.target:
        raise ModelMismatchError(
            f"the native vector belongs to {native_vector.model.name}, the map targets {amap.target.name}"
        )
    native_vector.check_model(model)
    mapped = amap.apply(source_vector)
    steered = sorted(set(check_layers(model, layers if layers is not None else amap.target_layers)))
    pairs = _pair_rows(amap, mapped, native_vector, steered)
    steered_cos = [row["cosine"] for row in pairs if row["steered"]]
    one_alpha = float(alpha if per_layer_alpha is None else per_layer_alpha)
    report = TransferReport(
        source=amap.source.name,
        target=amap.target.name,
        concept=concept,
        alpha=float(alpha),
        unit=unit,
        metric_name=metric_name if metric is not None else None,
        metric_base=None,
        pairs=pairs,
        cosine_mean=float(sum(steered_cos) / len(steered_cos)) if steered_cos else float("nan"),
        settings={
            "steered_layers": steered,
            "per_layer_alpha": one_alpha,
            "cos_threshold": cos_threshold,
            "ratio_threshold": ratio_threshold,
            "matched_norm": "native rows rescaled to the transplanted offset's norm, layer by layer",
            "map_provenance": amap.provenance,
        },
    )
    if metric is not None:
        _measure_causal(report, model, mapped, native_vector, metric, alpha=alpha, unit=unit, steered=steered,
                        per_layer=per_layer, per_layer_alpha=one_alpha, min_effect=min_effect,
                        cos_threshold=cos_threshold, ratio_threshold=ratio_threshold)
    return report
