"""Which layer pairs to map and steer: a search over source × target layers, and auto layers.

:func:`layer_pair_search` fits a source-layer × target-layer grid (with a stride) from one
aligned capture of each model, scored by held-out R² and by a cheap concept-effect proxy, the
logit lens: ``proxy = cos(v̂[t], r)`` with the readout direction
``r = g ⊙ (W_U[:, concept tokens].mean − W_U[:, other label tokens].mean)``
(:func:`contrans_tl.lens.concept_readout`; ``g`` is the final norm's elementwise gain, read off
the model). It ignores everything the layers after t do, so it is a ranking aid, not a
measurement; the transfer report's causal ratio is the measurement.

:func:`drop_outlier_samples` removes samples with massive activations before fitting, and
:func:`auto_layers` turns a search, or a mapped vector's own held-out R², into the target layers
to steer: pass its result as ``transplant(..., layers=...)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from contrans_tl import validate
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.errors import ContransError, InvalidArgumentError, ModelMismatchError
from contrans_tl.files import write_json
from contrans_tl.handle import ModelHandle
from contrans_tl.pairing import PairedStates
from contrans_tl.reformulate import capture_pair, drop_outlier_samples, fit_map_from_states
from contrans_tl.metrics import cosine

__all__ = [
    "LayerPairSearch",
    "drop_outlier_samples",
    "strided_layers",
    "layer_pair_search_from_states",
    "layer_pair_search",
    "auto_layers",
]


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
        """Write :meth:`to_dict` as strict JSON (NaN → null), atomically."""
        return write_json(path, self.to_dict(top_k))


def strided_layers(n: int, stride: int) -> list[int]:
    """Every ``stride``-th of ``n`` layers from 0, the last layer always included."""
    stride = validate.integer("stride", stride, low=1)
    layers = list(range(0, n, stride))
    if layers[-1] != n - 1:
        layers.append(n - 1)  # the last layer is always part of the grid
    return layers


def _concept_rows(
    amap: AffineMap,
    source_vector: ConceptVector,
    readout: Tensor | None,
    native_vector: ConceptVector | None,
    target_layers: Sequence[int],
) -> tuple[list[float] | None, list[float] | None]:
    """One grid row of the mapped vector's cosines: to the readout (proxy) and to the native vector."""
    mapped = amap.apply(source_vector)
    proxy = [cosine(mapped.vectors[t], readout) for t in target_layers] if readout is not None else None
    native = (
        [cosine(mapped.vectors[t], native_vector.vectors[t]) for t in target_layers]
        if native_vector is not None
        else None
    )
    return proxy, native


def _search_settings(
    source: PairedStates, ridge: float | str, holdout: float, seed: int, with_proxy: bool
) -> dict[str, Any]:
    return {
        "ridge": ridge,
        "holdout": holdout,
        "seed": seed,
        "corpus_hash": source.corpus,
        "alignment": source.scheme,
        "n_samples": int(source.states.shape[0]),
        "proxy": "cos(mapped vector at t, g * (W_U[:, concept] - mean W_U[:, other labels]))",
        "score": "max(R2, 0) * max(proxy, 0)" if with_proxy else "held-out R2",
    }


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
    if not src_layers:
        raise InvalidArgumentError("source_layers", source_layers, "at least one source layer")
    if not tgt_layers:
        raise InvalidArgumentError("target_layers", target_layers, "at least one target layer")
    scored = source_vector is not None
    r2: list[list[float]] = []
    proxy: list[list[float]] | None = [] if scored and readout is not None else None
    native_cos: list[list[float]] | None = [] if scored and native_vector is not None else None
    for s in src_layers:
        amap = fit_map_from_states(
            source, target, layers=[(s, t) for t in tgt_layers], ridge=ridge, holdout=holdout, seed=seed
        )
        r2.append([float(x) for x in amap.r2_heldout])
        if source_vector is not None and (proxy is not None or native_cos is not None):
            proxy_row, native_row = _concept_rows(amap, source_vector, readout, native_vector, tgt_layers)
            if proxy is not None and proxy_row is not None:
                proxy.append(proxy_row)
            if native_cos is not None and native_row is not None:
                native_cos.append(native_row)
    native_proxy = None
    if native_vector is not None and readout is not None:
        native_proxy = [cosine(native_vector.vectors[t], readout) for t in tgt_layers]
    return LayerPairSearch(
        source=source.model.name,
        target=target.model.name,
        source_layers=src_layers,
        target_layers=tgt_layers,
        r2=r2,
        proxy=proxy,
        native_cosine=native_cos,
        native_proxy=native_proxy,
        settings=_search_settings(source, ridge, holdout, seed, with_proxy=proxy is not None),
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
    :func:`contrans_tl.lens.concept_readout` on the target to get the logit-lens proxy.
    """
    src_layers = strided_layers(int(source.cfg.n_layers), source_stride)
    tgt_layers = strided_layers(int(target.cfg.n_layers), target_stride)
    xs, ys = capture_pair(source, target, texts, src_layers, tgt_layers,
                          alignment=alignment, batch_size=batch_size, progress=progress)
    xs, ys, n_dropped = drop_outlier_samples(xs, ys, factor=outlier_factor)
    search = layer_pair_search_from_states(
        xs, ys, source_vector=source_vector, readout=readout, native_vector=native_vector,
        ridge=ridge, holdout=holdout, seed=seed,
    )
    search.settings["outliers_dropped"] = n_dropped
    return search


def _layers_from_search(vector: ConceptVector, search: LayerPairSearch, top_k: int | None) -> list[int]:
    """The ``top_k`` best-ranked target layers of ``search`` that carry ``vector``."""
    if search.target != vector.model.name:
        raise ModelMismatchError(f"the search is for {search.target}, the vector for {vector.model.name}")
    k = top_k if top_k is not None else max(1, len(search.target_layers) // 3)
    ranked = [t for t in search.target_ranking() if t in set(vector.layers)]
    if not ranked:
        raise ContransError("none of the searched target layers carries the vector")
    return sorted(ranked[:k])


def _layers_from_map_fit(vector: ConceptVector, top_k: int | None, min_r2: float) -> list[int]:
    """Target layers whose map pair reached ``min_r2`` (from the vector's provenance), else the best one."""
    own = set(vector.layers)
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

    Several vectors: the union of their choices. Pass the result to
    ``transplant(..., layers=auto_layers(vector))``.
    """
    if not isinstance(vector, ConceptVector):
        return sorted({layer for v in vector for layer in auto_layers(v, search=search, top_k=top_k, min_r2=min_r2)})
    if search is not None:
        return _layers_from_search(vector, search, top_k)
    return _layers_from_map_fit(vector, top_k, min_r2)
