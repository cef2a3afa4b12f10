"""Size matrix (paper §6.3, Fig 4): every model's emotion vectors transplanted into every model.

For each (source, target) pair — the diagonal included — the emotion vectors refined in the
source are mapped into the target and transplanted at the target's steering layer; the matrix
reports the mean emotion accuracy over the steered emotions as an **improvement ratio**
(transplanted / untransplanted baseline of the target) and an **absolute improvement**
(transplanted − baseline), in Logit Acc (or Token Acc) on each emotion's negatives.

Cost grows with N model loads, not N²: **phase 1** loads each model once for its emotion
vectors, its word-aligned hidden states on the neutral corpus (its steering layer only, saved),
its untransplanted baseline and the diagonal (its own vectors, identity map); all N·(N−1)
**maps** are then fitted from the saved states without a model; **phase 2** loads each target
once more for its incoming vectors, except the last model of phase 1, still loaded: 2N − 1
loads at most, N with ``keep_loaded`` (every model held between the phases). Every vector
going into a target is read in the target's own alpha unit (its mean residual norm at the
steering layer), so the cells of one column differ only in the direction.

Every result is a cell of a :class:`~contrans_tl.sweep.CellStore`, written atomically: a
killed run resumes, reloading only the models whose cells are missing. ``matrix.json`` records
the loads of this invocation (``model_loads``, ``load_log``) and of all resumed invocations.

With ``run(cfg, executor=...)`` (Dask, Ray, submitit, ...) phase 1 makes only the files here, and
**every** evaluation cell goes to the executor: :func:`run_cell` loads its target itself (kept for
the worker's next cell; cells go grouped by target), so workers need ``out`` on a shared file
system, and their loads are not in ``load_log`` (loaded models cannot travel to workers).

Run: ``python -m contrans_tl.analyses.size_matrix --models A,B,C --out DIR [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import contrans_tl as ct
from contrans_tl import flags
from contrans_tl.analyses import _common as cm
from contrans_tl.analyses._checkpoints import cell_executor
from contrans_tl.analyses._matrix_setup import DEFAULT_MODELS, QUICK, Config, _base_key, _Run, _steer_key
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.corpus import MapCorpus
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import ArtifactError
from contrans_tl.files import write_json
from contrans_tl.handle import ModelHandle
from contrans_tl.metrics import accuracy_interval
from contrans_tl.pairing import PairedStates
from contrans_tl.sweep import CellStore, settings_fingerprint
from contrans_tl.tasks.emotion import EmotionTask, emotion_task

__all__ = ["Config", "CellArgs", "DEFAULT_MODELS", "QUICK", "HELP", "run", "run_cell", "plot", "summary_table",
           "add_args", "config_from_args", "run_cli", "main"]

HELP = "size matrix: every model's emotion vectors into every model (paper §6.3, Fig 4)"


# ---- phase 1: one load per model for vectors, aligned states, baseline and the diagonal -------------
def _read_info(path: Path) -> dict[str, Any] | None:
    """A model's ``info.json`` (layer count, width, steering layer), or None if missing, cut short or wrong-shaped."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(info, dict) and all(isinstance(info.get(k), int) and not isinstance(info.get(k), bool)
                                        for k in ("n_layers", "d_model", "layer"))
    return info if ok else None


def _info(path: Path) -> dict[str, Any]:
    """:func:`_read_info`, where phase 1 must have written it: a damaged one is a named error."""
    info = _read_info(path)
    if info is None:
        raise ArtifactError(f"{path} is missing or damaged (expected n_layers, d_model, layer): delete it and "
                            "rerun to have it rewritten")
    return info


def _model_done(r: _Run, name: str, *, evaluate: bool = True) -> bool:
    """Whether phase 1 has everything of ``name`` on disk (its files; with ``evaluate`` its cells too);
    a damaged ``info.json`` counts as missing, so phase 1 writes it again."""
    info_ok = _read_info(r.info_path(name)) is not None and r.states_path(name).is_file()
    vectors_ok = all(r.vector_path(name, e).is_file() for e in r.cfg.emotions)
    cells_ok = not evaluate or (all(r.store.has(_base_key(name, e)) for e in r.cfg.emotions) and all(
        r.store.has(k) for k, _, _ in r.steer_cells(name, name)))
    return info_ok and vectors_ok and cells_ok


def _vectors_of(r: _Run, model: ModelHandle, name: str) -> dict[str, ConceptVector]:
    """``name``'s emotion vectors: those not on disk refined now and saved, then all read from disk."""
    todo = tuple(e for e in r.cfg.emotions if not r.vector_path(name, e).is_file())
    if todo:
        refined = cm.refine_emotions(model, dataclasses.replace(r.task, emotions=todo), batch_size=r.cfg.batch_size,
                                     log=r.log, name=name)
        for e, vector in refined.items():
            vector.save(r.vector_path(name, e))
    return {e: ConceptVector.load(r.vector_path(name, e)) for e in r.cfg.emotions}


def _phase1_model(r: _Run, name: str, texts: list[str], *, evaluate: bool = True) -> ModelHandle:
    """Load ``name`` once: aligned states, vectors, info and (``evaluate``) its baseline and its own vectors into itself."""
    model = r.load(name, "capture (vectors, aligned states, baseline, diagonal)" if evaluate
                   else "capture (vectors, aligned states)")
    n_layers = int(model.cfg.n_layers)
    layer = cm.layer_at_depth(n_layers, r.cfg.depth)
    start = time.perf_counter()
    if not r.states_path(name).is_file():
        states = ct.capture_paired(model, texts, layers=[layer], scheme="words", batch_size=8,
                                    progress=f"{name} aligned" if r.cfg.progress else None)
        r.log.forward(name, "capture_paired", cm.batches(len(texts), 8))
        states.save(r.states_path(name))
    r.tick("aligned_states", start)
    start = time.perf_counter()
    vectors = _vectors_of(r, model, name)
    r.tick("refine", start)
    write_json(r.info_path(name), {"name": name, "n_layers": n_layers, "d_model": int(model.cfg.d_model),
                                   "layer": layer, "identity": dataclasses.asdict(ct.identity(model))})
    if not evaluate:
        return model
    start = time.perf_counter()
    for e in r.cfg.emotions:
        key = _base_key(name, e)
        if not r.store.has(key):
            r.store.put(key, r.base_cell(model, name, e))
    r.evaluate_into(model, name, name, vectors, layer)  # the diagonal: own vector, identity map
    r.tick("evaluate", start)
    return model


def _phase1(r: _Run, texts: list[str], *, evaluate: bool = True) -> dict[str, ModelHandle]:
    """Every model whose phase-1 files are missing, loaded once; returns the models kept for phase 2.

    Without ``evaluate`` (cells on an executor) only the files are made and no model is kept.
    """
    held: dict[str, ModelHandle] = {}
    models = list(r.cfg.models)
    for i, name in enumerate(models):
        if _model_done(r, name, evaluate=evaluate):
            continue
        model = _phase1_model(r, name, texts, evaluate=evaluate)
        if evaluate and (r.cfg.keep_loaded or i == len(models) - 1):
            held[name] = model  # the last model (or, with keep_loaded, every model) stays for phase 2
        del model
        cm.free_memory()
    return held


# ---- maps: all N(N-1) fitted from the saved states, no model needed -----------------------------------
def _fit_maps(r: _Run, layers: dict[str, int], corpus: MapCorpus) -> dict[tuple[str, str], AffineMap]:
    """Every map source steering layer → target steering layer, loaded or fitted from the saved states."""
    start = time.perf_counter()
    states_cache: dict[str, PairedStates] = {}

    def states_of(name: str) -> PairedStates:
        if name not in states_cache:
            states_cache[name] = PairedStates.load(r.states_path(name))
        return states_cache[name]

    maps: dict[tuple[str, str], AffineMap] = {}
    ridge: Any = r.cfg.ridge if r.cfg.ridge == "auto" else float(r.cfg.ridge)
    for src in r.cfg.models:
        for tgt in r.cfg.models:
            if src == tgt:
                continue
            path = r.map_path(src, tgt)
            if path.is_file():
                maps[src, tgt] = AffineMap.load(path)
                continue
            amap = ct.fit_map_from_states(states_of(src), states_of(tgt), layers=[(layers[src], layers[tgt])],
                                          ridge=ridge, seed=r.cfg.seed, estimator=r.cfg.map_estimator, corpus=corpus)
            amap.save(path)
            maps[src, tgt] = amap
    r.tick("fit_maps", start)
    return maps


# ---- phase 2: each target loaded once more (held ones not at all) for incoming vectors ----------------
def _phase2(r: _Run, held: dict[str, ModelHandle], maps: dict[tuple[str, str], AffineMap],
            layers: dict[str, int]) -> None:
    """Score every other model's mapped vectors in each target, reading them in the target's norm unit."""
    models, emotions = list(r.cfg.models), list(r.cfg.emotions)
    order = [m for m in models if m in held] + [m for m in models if m not in held]
    for tgt in order:
        sources = [s for s in models if s != tgt]
        if all(r.store.has(k) for s in sources for k, _, _ in r.steer_cells(s, tgt)):
            held.pop(tgt, None)
            continue
        model = held.pop(tgt, None)
        if model is None:
            held.clear()  # never two models of phase 2 in memory at once
            cm.free_memory()
            model = r.load(tgt, "evaluate incoming vectors")
        start = time.perf_counter()
        native = {e: ConceptVector.load(r.vector_path(tgt, e)) for e in emotions}
        for src in sources:
            incoming = {e: r.incoming(maps[src, tgt], src, e, native[e]) for e in emotions}
            r.evaluate_into(model, tgt, src, incoming, layers[tgt])
        r.tick("evaluate", start)
        del model
        cm.free_memory()
    held.clear()
    cm.free_memory()


# ---- on an executor: every evaluation cell loads its own target --------------------------------------
@dataclass(frozen=True)
class CellArgs:
    """One evaluation cell, picklable for any executor: ``target``'s baseline (no ``source``) or source → target."""

    cfg: Config
    target: str
    emotion: str
    source: str | None = None
    alpha: float = 0.0


_SLOT: dict[str, Any] = {}
"""This process's last target (model, steering layer, native vectors, maps), reused by its next cells."""


def _target_slot(cfg: Config, target: str) -> dict[str, Any]:
    """``target`` loaded with what its cells need, once per target per process."""
    key = (cfg.out, target, cfg.device, cfg.dtype)
    if _SLOT.get("key") != key:
        _SLOT.clear()
        cm.free_memory()
        r = _Run(cfg, CellStore(Path(cfg.out) / "cells", valid=cm.is_score_cell), cm.RunLog(), _task(cfg))
        model = r.load(target, "evaluate cells")
        native = {e: ConceptVector.load(r.vector_path(target, e)) for e in cfg.emotions}
        layer = int(_info(r.info_path(target))["layer"])
        _SLOT.update(key=key, run=r, model=model, native=native, layer=layer, maps={})
    return _SLOT


def run_cell(cell: CellArgs) -> dict[str, Any]:
    """Score one cell from the files of phase 1 and the maps; module-level, so executors can pickle it."""
    slot = _target_slot(cell.cfg, cell.target)
    r, model, native = slot["run"], slot["model"], slot["native"]
    if cell.source is None:
        return r.base_cell(model, cell.target, cell.emotion)
    if cell.source == cell.target:  # the diagonal: own vector, identity map
        vector = native[cell.emotion]
    else:
        if cell.source not in slot["maps"]:
            slot["maps"][cell.source] = AffineMap.load(r.map_path(cell.source, cell.target))
        vector = r.incoming(slot["maps"][cell.source], cell.source, cell.emotion, native[cell.emotion])
    return r.steer_cell(model, cell.target, cell.source, cell.emotion, cell.alpha, vector, slot["layer"])


def _evaluate_on(r: _Run, executor: Any) -> str:
    """Every missing cell through ``executor``, grouped by target; returns the executor's name."""
    cells: dict[str, CellArgs] = {}
    for tgt in r.cfg.models:
        cells.update({_base_key(tgt, e): CellArgs(r.cfg, tgt, e) for e in r.cfg.emotions})
        for src in r.cfg.models:
            cells.update({k: CellArgs(r.cfg, tgt, e, src, a) for k, e, a in r.steer_cells(src, tgt)})
    start = time.perf_counter()
    with cell_executor(executor) as (pool, name):
        try:
            r.store.run(cells, run_cell, executor=pool, desc="cells" if r.cfg.progress else None)
        finally:
            _SLOT.clear()  # an executor running cells in this process (threads) leaves no model behind
            cm.free_memory()
    r.tick("evaluate", start)
    return name


def _task(cfg: Config) -> EmotionTask:
    return emotion_task(cfg.emotions, n_refine=cfg.n_refine, n_eval=cfg.n_eval, seed=cfg.seed, data_dir=cfg.data_dir)


def run(cfg: Config, *, executor: Any = None) -> dict[str, Any]:
    """Compute (or resume) the matrix; writes ``matrix.json`` under ``cfg.out`` and returns it.

    ``executor``: run the evaluation cells on it (any ``concurrent.futures.Executor``, or a
    submitit-style one, wrapped in a ``JobExecutor``); None: the two phases in this process.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task = _task(cfg)
    r = _Run(cfg, CellStore(out / "cells", settings=settings_fingerprint(cfg), valid=cm.is_score_cell),
             cm.RunLog(out / "run_log.jsonl", verbose=cfg.progress), task)
    corpus = cm.map_corpus(cfg.map_corpus, neutral_sentences()[: cfg.n_texts], _task(cfg))
    held = _phase1(r, list(corpus.texts), evaluate=executor is None)
    infos = {m: _info(r.info_path(m)) for m in cfg.models}
    layers = {m: int(infos[m]["layer"]) for m in cfg.models}
    maps = _fit_maps(r, layers, corpus)
    if executor is None:
        _phase2(r, held, maps, layers)
    executor_name = "serial (this process)" if executor is None else _evaluate_on(r, executor)

    result = _assemble(cfg, r.store, maps, layers, infos, task)
    result["executor"] = executor_name
    result.update(r.log.summary())
    every = r.log.all_runs()
    result["model_loads_all_runs"] = len(every)
    result["loads_all_runs"] = [[e["model"], e["purpose"]] for e in every]
    n = len(cfg.models)
    result["load_bound"] = (f"<= {n} here (files only); each worker loads the targets of its cells" if executor is not None
                            else f"<= {n} (N, keep_loaded)" if cfg.keep_loaded else f"<= 2N - 1 = {2 * n - 1} per complete run")
    r.timings["total"] = round(time.perf_counter() - t0, 2)
    result["timings_s"] = r.timings
    result["config"] = dataclasses.asdict(cfg)
    write_json(out / "matrix.json", result)
    return json.loads((out / "matrix.json").read_text())


def _assemble(cfg: Config, store: CellStore, maps: dict[tuple[str, str], AffineMap], layers: dict[str, int],
              infos: dict[str, Any], task: EmotionTask) -> dict[str, Any]:
    models, emotions = list(cfg.models), list(cfg.emotions)
    base = {t: {e: store.get(_base_key(t, e)) for e in emotions} for t in models}
    baseline = {t: {"mean_logit_acc": float(np.mean([base[t][e]["logit_acc"] for e in emotions])),
                    "mean_token_acc": float(np.mean([base[t][e]["token_acc"] for e in emotions])),
                    "per_emotion": base[t]} for t in models}
    matrices: dict[str, Any] = {}
    for alpha in cfg.alphas:
        steered = np.full((len(models), len(models)), np.nan)
        interval = [[None] * len(models) for _ in models]
        per_cell: dict[str, Any] = {}
        for i, s in enumerate(models):
            for j, t in enumerate(models):
                cells = {e: store.get(_steer_key(s, t, e, alpha)) for e in emotions}
                steered[i, j] = np.mean([cells[e][cfg.metric] for e in emotions])
                # 95% interval, the emotions' negatives pooled (equal counts: around the mean)
                interval[i][j] = list(accuracy_interval((c[cfg.metric], c["n"]) for c in cells.values()))
                per_cell[f"{s} -> {t}"] = cells
        base_row = np.array([baseline[t][f"mean_{cfg.metric}"] for t in models])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(base_row[None, :] > 0, steered / base_row[None, :], np.nan)
        matrices[f"{alpha:g}"] = {
            "alpha": alpha,
            "transplanted": steered.tolist(),
            "transplanted_ci95": interval,
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
    p.add_argument("--models", type=flags.model_list_flag, help="comma-separated model names (default: the Pythia list)")
    p.add_argument("--out", type=flags.out_dir_flag, help=f"output directory (cells, states, matrix.json, figures; default {Config.out})")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (flags below override)")
    cm.add_size_args(p, texts_help="with --map-corpus neutral: how many of the built-in neutral sentences (default all 400)")
    p.add_argument("--alphas", type=flags.float_list_flag, help="comma-separated strengths (norm units)")
    p.add_argument("--unit", choices=["norm", "raw"])
    p.add_argument("--metric", choices=["logit_acc", "token_acc"])
    p.add_argument("--keep-loaded", action="store_true",
                   help="hold all models in memory between the phases: N loads instead of 2N - 1")
    cm.add_map_args(p, default_corpus=Config.map_corpus)
    cm.add_run_args(p)


def config_from_args(args: argparse.Namespace) -> Config:
    return cm.config_from_args(Config, QUICK, args)


def summary_table(result: dict[str, Any]) -> str:
    """Markdown: per alpha, transplanted accuracy with ratio and absolute gain per cell."""
    models = result["models"]
    labels = [_short(m) for m in models]
    lines = []
    for tag, mat in result["matrices"].items():
        lines += [f"**alpha {tag}** — {result['metric']}: transplanted [95% interval] (ratio, absolute); rows source, "
                  "columns target", "",
                  "| source \\ target | " + " | ".join(labels) + " |", "|---|" + "---|" * len(models)]
        for i, lab in enumerate(labels):
            cells = []
            for j in range(len(models)):
                v, r, a = (mat[k][i][j] for k in ("transplanted", "improvement_ratio", "absolute_improvement"))
                ci = mat.get("transplanted_ci95", [[None] * len(models)] * len(models))[i][j]
                span = "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
                cells.append(f"{v:.3f}{span} ({'–' if r is None else f'{r:.2f}x'}, {a:+.3f})")
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
    raise SystemExit(main())
