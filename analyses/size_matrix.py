"""Size matrix (paper §6.3, Fig 4): every model's emotion vectors transplanted into every model.

For each (source, target) pair — the diagonal included — the emotion vectors refined in the
source are mapped into the target and transplanted at the target's steering layer; the matrix
reports the mean emotion accuracy over the steered emotions as an **improvement ratio**
(transplanted / untransplanted baseline of the target) and an **absolute improvement**
(transplanted − baseline). Accuracy is Logit Acc (or Token Acc) on each emotion's negatives
(see :mod:`analyses._common`).

Cost grows with N model loads, not N²:

* **Phase 1** loads each model once: its emotion vectors (all layers), its aligned hidden
  states on the neutral corpus (word-aligned, only its steering layer, saved to disk), its
  untransplanted baseline and its own vectors transplanted into itself (the diagonal).
* **Maps.** All N·(N−1) affine maps are fitted from the saved states (no model needed):
  source steering layer → target steering layer (:func:`contrans_tl.fit_map_from_states`).
* **Phase 2** loads each target once more to evaluate every incoming vector; the last model of
  phase 1 is still loaded, so it is not loaded again: 2N − 1 loads in all, at most. With
  ``keep_loaded`` every model stays in memory between the phases: N loads.

Diagonal cells (A → A) transplant A's own vector with the identity map. Every vector going
into a target is read in the same alpha unit — a fraction of the target's own mean residual
norm at its steering layer — so the cells of one column differ only in the direction.

Every result is a cell of a :class:`~contrans_tl.sweep.CellStore`, written atomically: a
killed run resumes, reloading only the models whose cells are missing. ``matrix.json`` records
the loads of this invocation (``model_loads``, ``load_log``) and of all resumed invocations.

Run: ``python -m contrans_tl.analyses.size_matrix --models A,B,C --out DIR [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import contrans_tl as ct
from contrans_tl.analyses import _common as cm
from contrans_tl.pairing import PairedStates
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.datasets import neutral_sentences
from contrans_tl.tasks.emotion import EMOTIONS
from contrans_tl.sweep import CellStore, cell_key

__all__ = ["Config", "DEFAULT_MODELS", "QUICK", "run", "plot", "add_args", "run_cli", "main", "HELP"]

HELP = "size matrix: every model's emotion vectors into every model (paper §6.3, Fig 4)"

DEFAULT_MODELS: tuple[str, ...] = (
    "EleutherAI/pythia-14m",
    "EleutherAI/pythia-70m",
    "EleutherAI/pythia-410m",
    "EleutherAI/pythia-1.4b",
    "EleutherAI/pythia-6.9b",
)
"""The paper's list (needs the hub); offline use the PyPI models (see docs/analyses.md)."""

QUICK: dict[str, Any] = {"emotions": ("happiness", "sadness"), "n_refine": 8, "n_eval": 4, "n_texts": 120}
"""``--quick``: two emotions, 8 refinement prompts per side, 4 negatives per other emotion."""


@dataclass
class Config:
    models: tuple[str, ...] = DEFAULT_MODELS
    out: str = "runs/size_matrix"
    emotions: tuple[str, ...] = EMOTIONS
    """Emotions transplanted (the label set is always all six)."""
    n_refine: int | None = None
    """Refinement prompts per side (None: the whole refinement half, 35)."""
    n_eval: int | None = None
    """Evaluation scenarios per other emotion (None: all 35, so 175 negatives per emotion)."""
    alphas: tuple[float, ...] = (0.3,)
    """Strengths in norm units; one matrix per alpha."""
    depth: float = 2 / 3
    """Relative depth of each model's steering layer."""
    unit: str = "norm"
    metric: str = "logit_acc"
    """"logit_acc" or "token_acc": the accuracy the matrices report (both are stored)."""
    n_texts: int | None = None
    """Neutral sentences for the alignment states (None: all 400)."""
    ridge: str = "auto"
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    seed: int = 0
    data_dir: str | None = None
    keep_loaded: bool = False
    """Keep every model in memory from phase 1 to phase 2: N loads instead of 2N − 1, at the
    price of holding all N models at once (fine for the small offline models)."""
    progress: bool = False

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        self.emotions = tuple(self.emotions)
        self.alphas = tuple(float(a) for a in self.alphas)
        if len(set(cm.slug(m) for m in self.models)) != len(self.models):
            raise ValueError(f"model names must be distinct: {self.models}")
        if self.metric not in ("logit_acc", "token_acc"):
            raise ValueError("metric must be 'logit_acc' or 'token_acc'")
        if self.unit not in ("norm", "raw"):
            raise ValueError("unit must be 'norm' or 'raw'")
        if not self.alphas or not self.models:
            raise ValueError("need at least one model and one alpha")

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change cell values: a rerun into the same ``out`` must match them."""
        keys = ("n_refine", "n_eval", "depth", "unit", "n_texts", "ridge", "dtype", "seed", "data_dir")
        return {k: getattr(self, k) for k in keys}


class _Paths:
    def __init__(self, out: Path) -> None:
        self.out = out

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / cm.slug(name)

    def vector(self, name: str, emotion: str) -> Path:
        return self.model_dir(name) / "vectors" / f"{emotion}.safetensors"

    def states(self, name: str) -> Path:
        return self.model_dir(name) / "aligned.safetensors"

    def info(self, name: str) -> Path:
        return self.model_dir(name) / "info.json"

    def map(self, source: str, target: str) -> Path:
        return self.out / "maps" / f"{cm.slug(source)}__{cm.slug(target)}.safetensors"


def _base_key(target: str, emotion: str) -> str:
    return cell_key(kind="base", target=cm.slug(target), emotion=emotion)


def _steer_key(source: str, target: str, emotion: str, alpha: float) -> str:
    return cell_key(kind="steer", source=cm.slug(source), target=cm.slug(target), emotion=emotion, alpha=f"{alpha:g}")


def _collect() -> None:
    """Return a dropped model's memory (call after the last reference is gone)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: Config) -> dict[str, Any]:
    """Compute (or resume) the matrix; writes ``matrix.json`` under ``cfg.out`` and returns it."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _Paths(out)
    store = CellStore(out / "cells", settings=cm.json_ready(cfg.fingerprint()))
    log = cm.RunLog(out / "run_log.jsonl", verbose=cfg.progress)
    task = cm.emotion_task(cfg.emotions, n_refine=cfg.n_refine, n_eval=cfg.n_eval, seed=cfg.seed, data_dir=cfg.data_dir)
    texts = neutral_sentences()[: cfg.n_texts]
    load_kw = {"device": cfg.device, "dtype": cm.DTYPES[cfg.dtype]}
    timings: dict[str, float] = {}
    models, emotions = list(cfg.models), list(cfg.emotions)

    def tick(name: str, start: float) -> None:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 2)

    def steer_cells(source: str, target: str) -> list[tuple[str, str, float]]:
        return [(_steer_key(source, target, e, a), e, a) for e in emotions for a in cfg.alphas]

    def evaluate_into(model: Any, name: str, source: str, vectors: dict[str, ConceptVector], layer: int) -> None:
        for key, emotion, alpha in steer_cells(source, name):
            if not store.has(key):
                res = cm.evaluate(model, task, emotion, vector=vectors[emotion], alpha=alpha, layer=layer,
                                  unit=cfg.unit, batch_size=cfg.batch_size, log=log, name=name)  # type: ignore[arg-type]
                store.put(key, {"source": source, "target": name, "emotion": emotion, "alpha": alpha, **res})

    # ---- phase 1: one load per model for vectors, aligned states, baseline and the diagonal ----
    held: dict[str, Any] = {}  # models kept in memory for phase 2
    for i, name in enumerate(models):
        info_ok = paths.info(name).is_file() and paths.states(name).is_file()
        vectors_ok = all(paths.vector(name, e).is_file() for e in emotions)
        cells_ok = all(store.has(_base_key(name, e)) for e in emotions) and all(
            store.has(k) for k, _, _ in steer_cells(name, name))
        if info_ok and vectors_ok and cells_ok:
            continue
        start = time.perf_counter()
        model = log.load(name, "capture (vectors, aligned states, baseline, diagonal)", **load_kw)
        tick("load", start)
        n_layers = int(model.cfg.n_layers)
        layer = cm.layer_at_depth(n_layers, cfg.depth)
        start = time.perf_counter()
        if not paths.states(name).is_file():
            states = ct.capture_paired(model, texts, layers=[layer], scheme="words", batch_size=8,
                                        progress=f"{name} aligned" if cfg.progress else None)
            log.forward(name, "capture_paired", cm.batches(len(texts), 8))
            states.save(paths.states(name))
        tick("aligned_states", start)
        start = time.perf_counter()
        vectors: dict[str, ConceptVector] = {}
        todo = [e for e in emotions if not paths.vector(name, e).is_file()]
        refined = cm.refine_emotions(model, dataclasses.replace(task, emotions=tuple(todo)), batch_size=cfg.batch_size,
                                     log=log, name=name) if todo else {}
        for e in emotions:
            if e in refined:
                refined[e].save(paths.vector(name, e))
            vectors[e] = refined[e] if e in refined else ConceptVector.load(paths.vector(name, e))
        tick("refine", start)
        cm.write_json(paths.info(name), {"name": name, "n_layers": n_layers, "d_model": int(model.cfg.d_model),
                                         "layer": layer, "identity": dataclasses.asdict(ct.identity(model))})
        start = time.perf_counter()
        for e in emotions:
            key = _base_key(name, e)
            if not store.has(key):
                res = cm.evaluate(model, task, e, batch_size=cfg.batch_size, log=log, name=name)
                store.put(key, {"target": name, "emotion": e, **res})
        evaluate_into(model, name, name, vectors, layer)  # the diagonal: own vector, identity map
        tick("evaluate", start)
        if cfg.keep_loaded or i == len(models) - 1:
            held[name] = model  # the last model (or, with keep_loaded, every model) stays for phase 2
        model = None
        _collect()

    infos = {m: json.loads(paths.info(m).read_text()) for m in models}
    layers = {m: int(infos[m]["layer"]) for m in models}

    # ---- maps: all N(N-1) fitted from the saved states, no model needed ----
    start = time.perf_counter()
    states_cache: dict[str, PairedStates] = {}

    def states_of(name: str) -> PairedStates:
        if name not in states_cache:
            states_cache[name] = PairedStates.load(paths.states(name))
        return states_cache[name]

    maps: dict[tuple[str, str], AffineMap] = {}
    for src in models:
        for tgt in models:
            if src == tgt:
                continue
            path = paths.map(src, tgt)
            if path.is_file():
                maps[src, tgt] = AffineMap.load(path)
                continue
            ridge: Any = cfg.ridge if cfg.ridge == "auto" else float(cfg.ridge)
            amap = ct.fit_map_from_states(states_of(src), states_of(tgt), layers=[(layers[src], layers[tgt])], ridge=ridge,
                                          seed=cfg.seed)
            amap.save(path)
            maps[src, tgt] = amap
    states_cache.clear()
    tick("fit_maps", start)

    # ---- phase 2: each target loaded once more (held ones not at all) for incoming vectors ----
    order = [m for m in models if m in held] + [m for m in models if m not in held]
    for tgt in order:
        sources = [s for s in models if s != tgt]
        if all(store.has(k) for s in sources for k, _, _ in steer_cells(s, tgt)):
            held.pop(tgt, None)
            continue
        model = held.pop(tgt, None)
        if model is None:
            held.clear()  # never two models of phase 2 in memory at once
            _collect()
            start = time.perf_counter()
            model = log.load(tgt, "evaluate incoming vectors", **load_kw)
            tick("load", start)
        start = time.perf_counter()
        native = {e: ConceptVector.load(paths.vector(tgt, e)) for e in emotions}
        for src in sources:
            incoming = {}
            for e in emotions:
                mapped = maps[src, tgt].apply(ConceptVector.load(paths.vector(src, e)))
                incoming[e] = cm.with_norms(mapped, native[e].layer_norms)
            evaluate_into(model, tgt, src, incoming, layers[tgt])
        tick("evaluate", start)
        model = None
        _collect()
    held.clear()
    _collect()

    result = _assemble(cfg, store, maps, layers, infos, task)
    result.update(log.summary())
    every = log.all_runs()
    result["model_loads_all_runs"] = len(every)
    result["loads_all_runs"] = [[e["model"], e["purpose"]] for e in every]
    n = len(models)
    result["load_bound"] = f"<= {n} (N, keep_loaded)" if cfg.keep_loaded else f"<= 2N - 1 = {2 * n - 1} per complete run"
    timings["total"] = round(time.perf_counter() - t0, 2)
    result["timings_s"] = timings
    result["config"] = dataclasses.asdict(cfg)
    cm.write_json(out / "matrix.json", result)
    return json.loads((out / "matrix.json").read_text())


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _assemble(cfg: Config, store: CellStore, maps: dict[tuple[str, str], AffineMap], layers: dict[str, int],
              infos: dict[str, Any], task: cm.EmotionTask) -> dict[str, Any]:
    models, emotions = list(cfg.models), list(cfg.emotions)
    base = {t: {e: store.get(_base_key(t, e)) for e in emotions} for t in models}
    baseline = {t: {"mean_logit_acc": _mean([base[t][e]["logit_acc"] for e in emotions]),
                    "mean_token_acc": _mean([base[t][e]["token_acc"] for e in emotions]),
                    "per_emotion": base[t]} for t in models}
    matrices: dict[str, Any] = {}
    for alpha in cfg.alphas:
        steered = np.full((len(models), len(models)), np.nan)
        per_cell: dict[str, Any] = {}
        for i, s in enumerate(models):
            for j, t in enumerate(models):
                cells = {e: store.get(_steer_key(s, t, e, alpha)) for e in emotions}
                steered[i, j] = _mean([cells[e][cfg.metric] for e in emotions])
                per_cell[f"{s} -> {t}"] = cells
        base_row = np.array([baseline[t][f"mean_{cfg.metric}"] for t in models])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(base_row[None, :] > 0, steered / base_row[None, :], np.nan)
        matrices[f"{alpha:g}"] = {
            "alpha": alpha,
            "transplanted": steered.tolist(),
            "improvement_ratio": ratio.tolist(),
            "absolute_improvement": (steered - base_row[None, :]).tolist(),
            "cells": per_cell,
        }
    r2 = {s: {t: (None if s == t else float(maps[s, t].r2_heldout[0])) for t in models} for s in models}
    return {
        "analysis": "size_matrix",
        "models": models,
        "rows": "source",
        "columns": "target",
        "metric": cfg.metric,
        "alphas": list(cfg.alphas),
        "unit": cfg.unit,
        "steering_layers": layers,
        "model_shapes": {m: [infos[m]["n_layers"], infos[m]["d_model"]] for m in models},
        "task": task.describe(),
        "baseline": baseline,
        "matrices": matrices,
        "map_r2_heldout": r2,
        "diagonal": "own vector, identity map",
        "improvement_ratio": "mean transplanted accuracy / mean baseline accuracy of the target (null if the baseline is 0)",
        "absolute_improvement": "mean transplanted accuracy - mean baseline accuracy of the target",
    }


def _short(name: str) -> str:
    return Path(name).name if "/" in name else name


def plot(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Two heatmaps per alpha (improvement ratio, absolute improvement); PNG + PDF each."""
    from contrans_tl.plotting import heatmap, save_figure

    out = Path(out)
    labels = [_short(m) for m in result["models"]]
    metric = {"logit_acc": "Logit Acc", "token_acc": "Token Acc"}[result["metric"]]
    written: list[Path] = []
    for tag, mat in result["matrices"].items():
        for kind, title, fmt, cmap in (
            ("improvement_ratio", f"{metric} improvement ratio (alpha {tag})", "{:.2f}", "viridis"),
            ("absolute_improvement", f"{metric} absolute improvement (alpha {tag})", "{:+.2f}", "RdBu"),
        ):
            values = np.array([[np.nan if v is None else v for v in row] for row in mat[kind]], dtype=float)
            fig = heatmap(values, labels, labels, title=title, xlabel="target", ylabel="source", fmt=fmt, cmap=cmap)
            # no dot in the stem: save_figure swaps the suffix
            written += save_figure(fig, out / f"size_matrix_{kind}_alpha{tag.replace('.', 'p')}")
    return written


# ---- command line ---------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=cm.names, help="comma-separated model names (default: the Pythia list)")
    p.add_argument("--out", default=Config.out, help="output directory (cells, states, matrix.json, figures)")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (flags below override)")
    p.add_argument("--emotions", type=cm.names)
    p.add_argument("--n-refine", type=int)
    p.add_argument("--n-eval", type=int)
    p.add_argument("--n-texts", type=int)
    p.add_argument("--alphas", type=cm.floats, help="comma-separated strengths (norm units)")
    p.add_argument("--depth", type=float)
    p.add_argument("--unit", choices=["norm", "raw"])
    p.add_argument("--metric", choices=["logit_acc", "token_acc"])
    p.add_argument("--keep-loaded", action="store_true",
                   help="hold all models in memory between the phases: N loads instead of 2N - 1")
    cm.add_run_args(p)


def config_from_args(args: argparse.Namespace) -> Config:
    return cm.config_from_args(Config, QUICK, args)


def summary_table(result: dict[str, Any]) -> str:
    """Markdown: per alpha, transplanted accuracy with ratio and absolute gain per cell."""
    models = result["models"]
    labels = [_short(m) for m in models]
    lines = []
    for tag, mat in result["matrices"].items():
        lines += [f"**alpha {tag}** — {result['metric']}: transplanted (ratio, absolute); rows source, columns target", "",
                  "| source \\ target | " + " | ".join(labels) + " |", "|---|" + "---|" * len(models)]
        for i, lab in enumerate(labels):
            cells = []
            for j in range(len(models)):
                v, r, a = (mat[k][i][j] for k in ("transplanted", "improvement_ratio", "absolute_improvement"))
                cells.append(f"{v:.3f} ({'–' if r is None else f'{r:.2f}x'}, {a:+.3f})")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        base = [f"{result['baseline'][m]['mean_' + result['metric']]:.3f}" for m in models]
        lines += ["| *baseline* | " + " | ".join(base) + " |", ""]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run(cfg)
    if not args.no_plot:
        plot(result, cfg.out)
    print(summary_table(result))
    print(f"model loads this run: {result['model_loads']} ({', '.join(f'{m}: {p}' for m, p in result['loads'])})")
    print(f"wrote {Path(cfg.out) / 'matrix.json'} ({result['timings_s']['total']:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cm.script_main("size_matrix", HELP, add_args, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
