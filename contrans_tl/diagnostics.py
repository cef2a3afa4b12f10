"""Does a transplanted concept transfer? A transfer report, and a search over layer pairs.

**Transfer report** (:func:`transfer_report`) for an :class:`~contrans_tl.AffineMap`, a source
concept vector and the same concept refined natively in the target:

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

**Layer-pair search** (:func:`layer_pair_search`): a source-layer × target-layer grid (with a
stride) fitted from one aligned capture of each model, scored by held-out R² and by a cheap
concept-effect proxy, the logit lens: ``proxy = cos(v̂[t], r)`` with the readout direction
``r = g ⊙ (W_U[:, concept tokens].mean − W_U[:, other label tokens].mean)`` (``g``: the final
norm's elementwise gain, read off the model). It ignores everything the layers after t do, so
it is a ranking aid, not a measurement; the causal ratio is the measurement.
:func:`auto_layers` turns either result into the target layers to steer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.pairing import PairedStates
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.capture import check_layers
from contrans_tl.errors import ContransError, EmptyPromptsError, ModelMismatchError
from contrans_tl.metrics import layer_cosine
from contrans_tl.reformulate import capture_pair, fit_map_from_states
from contrans_tl.transplant import Unit, steering_offsets, transplant
from contrans_tl.handle import ModelHandle

__all__ = [
    "final_norm_gain",
    "concept_readout",
    "TransferReport",
    "transfer_report",
    "LayerPairSearch",
    "layer_pair_search_from_states",
    "layer_pair_search",
    "strided_layers",
    "drop_outlier_samples",
    "auto_layers",
]

Metric = Callable[[ModelHandle], float]
"""A concept score of the model as it is (hooks included): ``metric(model) -> float``."""


# ---- logit-lens readout ------------------------------------------------------------------------
@torch.no_grad()
def final_norm_gain(model: ModelHandle) -> Float[Tensor, "d_model"]:
    """Elementwise gain of the final norm (RMSNorm or LayerNorm), measured through the model.

    The norm is applied to ``±1`` alternating (mean 0, RMS 1) and to zeros; the difference
    divided by the input is the gain, whatever the parametrisation (Gemma's ``1 + w`` included).
    Ones when the model has no ``ln_final``.
    """
    d = int(model.cfg.d_model)  # type: ignore[attr-defined]
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return torch.ones(d)
    device = model.W_U.device  # type: ignore[attr-defined]
    dtype = model.W_U.dtype  # type: ignore[attr-defined]
    alt = torch.ones(d, device=device, dtype=dtype)
    alt[1::2] = -1
    if d % 2:
        alt[-1] = 0  # keep the mean at zero
    out = ln(alt[None, None]) - ln(torch.zeros_like(alt)[None, None])
    gain = torch.where(alt != 0, out[0, 0] / torch.where(alt != 0, alt, torch.ones_like(alt)), torch.ones_like(alt))
    return gain.float().cpu()


def concept_readout(
    model: ModelHandle,
    concept_tokens: Sequence[int] | Tensor,
    other_tokens: Sequence[int] | Tensor | None = None,
    *,
    fold_norm: bool = True,
) -> Float[Tensor, "d_model"]:
    """Residual direction whose logit-lens readout raises the concept tokens over the others.

    ``W_U[:, concept].mean − W_U[:, others].mean`` (others omitted: the vocabulary mean),
    times the final norm's gain when ``fold_norm``. Float32 on the CPU.
    """
    w_u = model.W_U.detach().float().cpu()  # type: ignore[attr-defined]  # [d_model, d_vocab]
    pos = torch.as_tensor(list(concept_tokens) if not isinstance(concept_tokens, Tensor) else concept_tokens)
    if pos.numel() == 0:
        raise EmptyPromptsError("no concept tokens for the readout")
    direction = w_u[:, pos.long()].mean(1)
    if other_tokens is None:
        direction = direction - w_u.mean(1)
    else:
        neg = torch.as_tensor(list(other_tokens) if not isinstance(other_tokens, Tensor) else other_tokens)
        if neg.numel():
            direction = direction - w_u[:, neg.long()].mean(1)
    if fold_norm:
        direction = direction * final_norm_gain(model)
    return direction


def _jsonable(value: Any) -> Any:
    """NaN/inf → None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


# ---- transfer report ---------------------------------------------------------------------------
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(self.to_dict()), indent=1, allow_nan=False))
        return path


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
        "cosine": _cos(
            torch.stack([mapped.vectors[l] for l in sorted(offsets)]),
            torch.stack([native.vectors[l] for l in sorted(offsets)]),
        ),
    }


def _flag(row: dict[str, Any], where: str, cos_threshold: float, ratio_threshold: float) -> str | None:
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
    cos = layer_cosine(mapped.vectors, native_vector.vectors)
    pairs = []
    for i, (s, t) in enumerate(amap.pairs):
        pairs.append(
            {
                "source_layer": s,
                "target_layer": t,
                "r2_heldout": float(amap.r2_heldout[i]),
                "r2_train": float(amap.r2_train[i]),
                "ridge": float(amap.ridge[i]),
                "cosine": float(cos[t]),
                "mapped_norm": float(mapped.vectors[t].norm()),
                "native_norm": float(native_vector.vectors[t].norm()),
                "steered": t in steered,
            }
        )
    steered_cos = [row["cosine"] for row in pairs if row["steered"]]
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
            "per_layer_alpha": float(alpha if per_layer_alpha is None else per_layer_alpha),
            "cos_threshold": cos_threshold,
            "ratio_threshold": ratio_threshold,
            "matched_norm": "native rows rescaled to the transplanted offset's norm, layer by layer",
            "map_provenance": amap.provenance,
        },
    )
    if metric is None:
        return report
    base = float(metric(model))
    report.metric_base = base
    kw = dict(alpha=alpha, unit=unit, min_effect=min_effect)
    report.combined = _causal(model, mapped, native_vector, metric, base, layers=steered, **kw)
    one_alpha = float(alpha if per_layer_alpha is None else per_layer_alpha)
    for layer in per_layer:
        row = _causal(model, mapped, native_vector, metric, base, layers=[int(layer)], alpha=one_alpha,
                      unit=unit, min_effect=min_effect)
        report.per_layer.append({"target_layer": int(layer), "alpha": one_alpha, **row})
    note = _flag(report.combined, "all steered layers", cos_threshold, ratio_threshold)
    if note:
        report.warnings.append(note)
    for row in report.per_layer:
        note = _flag(row, f"target layer {row['target_layer']}", cos_threshold, ratio_threshold)
        if note:
            report.warnings.append(note)
    return report


# ---- layer-pair search -------------------------------------------------------------------------
@dataclass
class LayerPairSearch:
    """Scores of a source × target layer grid (rows: source layers, columns: target layers)."""

    source: str
    target: str
    source_layers: list[int]
    target_layers: list[int]
    r2: list[list[float]]
    """Held-out R² of the map fitted for each pair."""
    proxy: list[list[float]] | None = None
    """cos(mapped source vector at t, concept readout) per pair (logit-lens proxy)."""
    native_cosine: list[list[float]] | None = None
    """cos(mapped source vector at t, native target vector at t) per pair."""
    native_proxy: list[float] | None = None
    """cos(native vector at t, readout) per target layer: the proxy's reference level."""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> list[list[float]]:
        """max(R², 0) · max(proxy, 0) with a proxy, else the held-out R²."""
        if self.proxy is None:
            return [list(row) for row in self.r2]
        return [
            [max(r, 0.0) * max(p, 0.0) for r, p in zip(r_row, p_row)]
            for r_row, p_row in zip(self.r2, self.proxy)
        ]

    def best_pairs(self, top_k: int = 5) -> list[dict[str, Any]]:
        """The ``top_k`` pairs by :attr:`score`, best first."""
        cells = []
        score = self.score
        for i, s in enumerate(self.source_layers):
            for j, t in enumerate(self.target_layers):
                cell = {"source_layer": s, "target_layer": t, "score": score[i][j], "r2_heldout": self.r2[i][j]}
                if self.proxy is not None:
                    cell["proxy"] = self.proxy[i][j]
                if self.native_cosine is not None:
                    cell["native_cosine"] = self.native_cosine[i][j]
                cells.append(cell)
        cells.sort(key=lambda c: -c["score"] if math.isfinite(c["score"]) else math.inf)
        return cells[:top_k]

    def best_source_for_target(self) -> list[tuple[int, int]]:
        """For every target layer, the (source, target) pair with the best score."""
        score = self.score
        out = []
        for j, t in enumerate(self.target_layers):
            col = [score[i][j] for i in range(len(self.source_layers))]
            i = max(range(len(col)), key=lambda k: col[k] if math.isfinite(col[k]) else -math.inf)
            out.append((self.source_layers[i], t))
        return out

    def target_ranking(self) -> list[int]:
        """Target layers ordered by their best score over source layers, best first."""
        score = self.score
        best = {t: max(score[i][j] for i in range(len(self.source_layers))) for j, t in enumerate(self.target_layers)}
        return sorted(best, key=lambda t: -best[t] if math.isfinite(best[t]) else math.inf)

    def to_dict(self, top_k: int = 5) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["score"] = self.score
        out["best_pairs"] = self.best_pairs(top_k)
        out["best_source_for_target"] = self.best_source_for_target()
        return out

    def save(self, path: str | Path, top_k: int = 5) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(self.to_dict(top_k)), indent=1, allow_nan=False))
        return path


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
        raise EmptyPromptsError("the two captures are not aligned sample by sample")

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


def strided_layers(n: int, stride: int) -> list[int]:
    """Every ``stride``-th of ``n`` layers from 0, the last layer always included."""
    if stride < 1:
        raise ContransError(f"stride must be >= 1, not {stride}")
    layers = list(range(0, n, stride))
    if layers[-1] != n - 1:
        layers.append(n - 1)  # the last layer is always part of the grid
    return layers


def layer_pair_search_from_states(
    source: PairedStates,
    target: PairedStates,
    *,
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | None = None,
    source_vector: ConceptVector | None = None,
    readout: Tensor | None = None,
    native_vector: ConceptVector | None = None,
    ridge: float | Literal["auto"] = "auto",
    holdout: float = 0.2,
    seed: int = 0,
) -> LayerPairSearch:
    """Fit and score every (source, target) pair of the given layers from existing captures.

    One :func:`~contrans_tl.reformulate.fit_map_from_states` per source layer (all target
    layers of the grid in one batched solve), so memory stays at one row of the grid; the
    held-out texts are the same for every pair (same ``seed``). With ``source_vector`` the
    mapped vector is scored against ``readout`` (proxy) and ``native_vector`` (cosine).
    """
    src_layers = list(source_layers) if source_layers is not None else list(source.layers)
    tgt_layers = list(target_layers) if target_layers is not None else list(target.layers)
    if not src_layers or not tgt_layers:
        raise EmptyPromptsError("the layer grid is empty")
    r2: list[list[float]] = []
    proxy: list[list[float]] | None = [] if source_vector is not None and readout is not None else None
    native_cos: list[list[float]] | None = [] if source_vector is not None and native_vector is not None else None
    for s in src_layers:
        amap = fit_map_from_states(
            source, target, layers=[(s, t) for t in tgt_layers], ridge=ridge, holdout=holdout, seed=seed
        )
        r2.append([float(x) for x in amap.r2_heldout])
        if source_vector is not None and (proxy is not None or native_cos is not None):
            mapped = amap.apply(source_vector)
            if proxy is not None:
                proxy.append([_cos(mapped.vectors[t], readout) for t in tgt_layers])  # type: ignore[arg-type]
            if native_cos is not None:
                native_cos.append([_cos(mapped.vectors[t], native_vector.vectors[t]) for t in tgt_layers])  # type: ignore[union-attr]
    native_proxy = None
    if native_vector is not None and readout is not None:
        native_proxy = [_cos(native_vector.vectors[t], readout) for t in tgt_layers]
    return LayerPairSearch(
        source=source.model.name,
        target=target.model.name,
        source_layers=src_layers,
        target_layers=tgt_layers,
        r2=r2,
        proxy=proxy,
        native_cosine=native_cos,
        native_proxy=native_proxy,
        settings={
            "ridge": ridge,
            "holdout": holdout,
            "seed": seed,
            "corpus_hash": source.corpus,
            "alignment": source.scheme,
            "n_samples": int(source.states.shape[0]),
            "proxy": "cos(mapped vector at t, g * (W_U[:, concept] - mean W_U[:, other labels]))",
            "score": "max(R2, 0) * max(proxy, 0)" if proxy is not None else "held-out R2",
        },
    )


def layer_pair_search(
    source: ModelHandle,
    target: ModelHandle,
    texts: Sequence[str],
    *,
    source_stride: int = 3,
    target_stride: int = 1,
    source_vector: ConceptVector | None = None,
    readout: Tensor | None = None,
    native_vector: ConceptVector | None = None,
    ridge: float | Literal["auto"] = "auto",
    holdout: float = 0.2,
    alignment: Literal["auto", "words", "tokens"] = "auto",
    batch_size: int = 8,
    seed: int = 0,
    outlier_factor: float = 0.0,
    progress: bool = False,
) -> LayerPairSearch:
    """Capture both models once on ``texts`` and score the strided layer grid.

    Every ``source_stride``-th source layer and ``target_stride``-th target layer (the last of
    each always included). ``readout`` defaults to nothing (R² only); build one with
    :func:`concept_readout` on the target to get the logit-lens proxy.
    """
    src_layers = strided_layers(int(source.cfg.n_layers), source_stride)  # type: ignore[union-attr]
    tgt_layers = strided_layers(int(target.cfg.n_layers), target_stride)  # type: ignore[union-attr]
    xs, ys = capture_pair(source, target, texts, src_layers, tgt_layers,
                          alignment=alignment, batch_size=batch_size, progress=progress)
    xs, ys, n_dropped = drop_outlier_samples(xs, ys, factor=outlier_factor)
    search = layer_pair_search_from_states(
        xs, ys, source_vector=source_vector, readout=readout, native_vector=native_vector,
        ridge=ridge, holdout=holdout, seed=seed,
    )
    search.settings["outliers_dropped"] = n_dropped
    return search


# ---- automatic layer choice --------------------------------------------------------------------
def auto_layers(
    vector: ConceptVector | Sequence[ConceptVector],
    *,
    search: LayerPairSearch | None = None,
    top_k: int | None = None,
    min_r2: float = 0.5,
) -> list[int]:
    """Target layers to steer, chosen from a layer search or from the map's held-out R².

    * With ``search``: the ``top_k`` target layers by best pair score (default: a third of the
      grid's target layers, at least one), kept only where the vector has a row.
    * Otherwise, for a mapped vector (its provenance records pairs and held-out R²): the layers
      whose pair has R² ≥ ``min_r2`` (the ``top_k`` best of them if given); the single best
      pair's layer when none reaches ``min_r2``.
    * A vector without map provenance (refined natively): its own layers.

    Several vectors: the union of their choices. This is what ``transplant(..., layers="auto")``
    uses.
    """
    if not isinstance(vector, ConceptVector):
        return sorted({layer for v in vector for layer in auto_layers(v, search=search, top_k=top_k, min_r2=min_r2)})
    own = set(vector.layers)
    if search is not None:
        if search.target != vector.model.name:
            raise ModelMismatchError(f"the search is for {search.target}, the vector for {vector.model.name}")
        k = top_k if top_k is not None else max(1, len(search.target_layers) // 3)
        ranked = [t for t in search.target_ranking() if t in own]
        if not ranked:
            raise ContransError("none of the searched target layers carries the vector")
        return sorted(ranked[:k])
    prov = vector.provenance or {}
    pairs, r2 = prov.get("pairs"), prov.get("r2_heldout")
    if not pairs or not r2 or len(pairs) != len(r2):
        return sorted(own)
    scored = sorted(
        ((float(r), int(p[1])) for p, r in zip(pairs, r2) if int(p[1]) in own and math.isfinite(float(r))),
        reverse=True,
    )
    if not scored:
        return sorted(own)
    keep = [t for r, t in scored if r >= min_r2]
    if top_k is not None:
        keep = keep[:top_k]
    return sorted(set(keep)) if keep else [scored[0][1]]
