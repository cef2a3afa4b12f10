"""The size matrix's settings, cell keys and shared run state (the steps live in :mod:`size_matrix`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contrans_tl import validate
from contrans_tl.analyses import _common as cm
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.sweep import CellStore, cell_key, grid_axis, run_option
from contrans_tl.tasks.emotion import EMOTIONS, EmotionTask
from contrans_tl.transplant import Unit

__all__ = ["Config", "DEFAULT_MODELS", "QUICK"]

DEFAULT_MODELS: tuple[str, ...] = tuple(f"EleutherAI/pythia-{size}" for size in ("14m", "70m", "410m", "1.4b", "6.9b"))
"""The paper's list (needs the hub); offline use the PyPI models (see docs/analyses.md)."""

QUICK: dict[str, Any] = {"emotions": ("happiness", "sadness"), "n_refine": 8, "n_eval": 4}
"""``--quick``: two emotions, 8 refinement prompts per side, 4 negatives per other emotion."""


@dataclass
class Config(cm.RunSettings):
    """Settings of one size matrix (each field is a command-line flag; shared ones in :class:`RunSettings`)."""

    models: tuple[str, ...] = grid_axis(DEFAULT_MODELS)
    """Models compared (each is a source and a target): names, hub ids or local directories."""
    out: str = run_option("runs/size_matrix")
    """Output directory: cells/, models/, maps/, matrix.json, figures (resumable)."""
    emotions: tuple[str, ...] = grid_axis(EMOTIONS)
    """Emotions transplanted (the label set is always all six)."""
    n_refine: int | None = None
    """Refinement prompts per side (None: the whole refinement half, 35)."""
    n_eval: int | None = None
    """Evaluation scenarios per other emotion (None: all 35, so 175 negatives per emotion)."""
    alphas: tuple[float, ...] = grid_axis((0.3,))
    """Strengths in norm units; one matrix per alpha."""
    depth: float = 2 / 3
    """Relative depth of each model's steering layer."""
    unit: Unit = "norm"
    """"norm" (alpha is a fraction of the target's residual norm) or "raw"."""
    metric: str = "logit_acc"
    """"logit_acc" or "token_acc": the accuracy the matrices report (both are stored)."""
    n_texts: int | None = None
    """With ``map_corpus="neutral"``: how many built-in neutral sentences the maps are fitted on (None: all 400)."""
    ridge: str = "auto"
    """Ridge of the maps: "auto" (validation split) or a number."""
    map_corpus: str = "concept"
    """What the maps are fitted on: "concept" (the emotions' contrast prompts, never an evaluation scenario; the
    default: against the paper's neutral sentences it raised 9 of Fig 4's 12 off-diagonal cells measurably and
    lowered one, by 0.027, docs/analyses.md), "neutral" (the first ``n_texts`` built-in sentences) or any
    map-corpus spec (:mod:`contrans_tl.corpus`)."""
    map_estimator: str = "ridge"
    """How the maps are fitted (:mod:`contrans_tl.estimators`)."""
    keep_loaded: bool = run_option(False)
    """Hold every model from phase 1 to phase 2: N loads instead of 2N − 1, all N models in memory at once."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.models = tuple(self.models)
        self.emotions = tuple(self.emotions)
        self.alphas = tuple(float(a) for a in self.alphas)
        if len(set(cm.slug(m) for m in self.models)) != len(self.models):
            raise InvalidArgumentError("models", self.models, "distinct model names")
        validate.choice("metric", self.metric, ("logit_acc", "token_acc"))
        validate.choice("unit", self.unit, ("norm", "raw"))
        if not self.models:
            raise InvalidArgumentError("models", self.models, "at least one model")
        if not self.alphas:
            raise InvalidArgumentError("alphas", self.alphas, "at least one strength")
        cm.check_shared_fields(self)
        validate.corpus_spec("map_corpus", self.map_corpus)
        cm.check_neutral_count(self, default=None)
        validate.choice("map_estimator", self.map_estimator, validate.MAP_ESTIMATORS)
        if self.ridge != "auto":
            validate.real("ridge", float(self.ridge) if isinstance(self.ridge, str) and _is_number(self.ridge)
                          else self.ridge, low=0.0)
        same = _same_models(self.models)
        if same:
            raise InvalidArgumentError("models", self.models, f"distinct models ({' and '.join(same)} are one model)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _same_models(models: tuple[str, ...]) -> list[str]:
    """Two entries of ``models`` that name one model however they are spelled (empty if none)."""
    from contrans_tl.offline import model_key

    seen: dict[str, str] = {}
    for name in models:
        key = model_key(name)
        if key in seen:
            return [seen[key], name]
        seen[key] = name
    return []


def _base_key(target: str, emotion: str) -> str:
    return cell_key(kind="base", target=cm.slug(target), emotion=emotion)


def _steer_key(source: str, target: str, emotion: str, alpha: float) -> str:
    return cell_key(kind="steer", source=cm.slug(source), target=cm.slug(target), emotion=emotion, alpha=f"{alpha:g}")


@dataclass
class _Run:
    """What the phases of one run share: settings, files, cells, the load log and the task."""

    cfg: Config
    store: CellStore
    log: cm.RunLog
    task: EmotionTask
    timings: dict[str, float] = field(default_factory=dict)

    def model_dir(self, name: str) -> Path:
        """Where ``name``'s vectors, aligned states and info.json are kept."""
        return Path(self.cfg.out) / "models" / cm.slug(name)

    def vector_path(self, name: str, emotion: str) -> Path:
        return self.model_dir(name) / "vectors" / f"{emotion}.safetensors"

    def states_path(self, name: str) -> Path:
        return self.model_dir(name) / "aligned.safetensors"

    def info_path(self, name: str) -> Path:
        return self.model_dir(name) / "info.json"

    def map_path(self, source: str, target: str) -> Path:
        return Path(self.cfg.out) / "maps" / f"{cm.slug(source)}__{cm.slug(target)}.safetensors"

    def load(self, name: str, purpose: str) -> ModelHandle:
        start = time.perf_counter()
        model = self.log.load(name, purpose, device=self.cfg.device, dtype=cm.DTYPES[self.cfg.dtype])
        self.tick("load", start)
        return model

    def tick(self, name: str, start: float) -> None:
        """Add the seconds since ``start`` to timing ``name``."""
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 2)

    def steer_cells(self, source: str, target: str) -> list[tuple[str, str, float]]:
        return [(_steer_key(source, target, e, a), e, a) for e in self.cfg.emotions for a in self.cfg.alphas]

    def base_cell(self, model: ModelHandle, name: str, emotion: str) -> dict[str, Any]:
        """The untransplanted baseline of ``model`` (named ``name``) on ``emotion``: one cell's value."""
        res = cm.evaluate(model, self.task, emotion, batch_size=self.cfg.batch_size, log=self.log, name=name)
        return {"target": name, "emotion": emotion, **res}

    def steer_cell(self, model: ModelHandle, name: str, source: str, emotion: str, alpha: float,
                   vector: ConceptVector, layer: int) -> dict[str, Any]:
        """``source``'s ``vector`` transplanted into ``model`` (named ``name``) at ``alpha``: one cell's value."""
        res = cm.evaluate(model, self.task, emotion, vector=vector, alpha=alpha, layer=layer, unit=self.cfg.unit,
                          batch_size=self.cfg.batch_size, log=self.log, name=name)
        return {"source": source, "target": name, "emotion": emotion, "alpha": alpha, **res}

    def incoming(self, amap: AffineMap, source: str, emotion: str, native: ConceptVector) -> ConceptVector:
        """``source``'s vector mapped into a target, read in the unit of the target's ``native`` vector."""
        return cm.with_norms(amap.apply(ConceptVector.load(self.vector_path(source, emotion))), native.layer_norms,
                            "the target's native vector of the same emotion")

    def evaluate_into(self, model: ModelHandle, name: str, source: str, vectors: dict[str, ConceptVector],
                      layer: int) -> None:
        """Score ``source``'s vectors transplanted into ``model`` (named ``name``): the missing cells."""
        for key, emotion, alpha in self.steer_cells(source, name):
            if not self.store.has(key):
                self.store.put(key, self.steer_cell(model, name, source, emotion, alpha, vectors[emotion], layer))
