"""Checkpoint sweep (paper §6.1, Fig 3): a final model's concept transplanted into its checkpoints.

The emotion vectors are refined **once**, in the final model, and saved. Each (checkpoint,
alpha) cell loads one training checkpoint, carries the vectors into it and scores the emotion
task (Token/Logit Acc on each emotion's negatives, see :mod:`analyses._common`); alpha 0 is the
checkpoint's untransplanted baseline and is always part of the grid. The figure plots baseline
and transplanted accuracy against training tokens.

Checkpoints are ``ckpt_000`` … ``ckpt_359`` (hub revisions of ``LLM360/Amber``; any other
non-``step`` name is a revision too), ``step1000`` (a Pythia training step) or a local HF
directory; see :mod:`analyses._checkpoints` for how each is loaded and placed in training.

Carrying the vector: ``mapping="identity"`` transplants the final model's vector as it is (the
paper's choice within one family: same architecture, same basis up to training drift);
``"fit"`` fits an affine map final → checkpoint on token-aligned neutral text (same tokenizer,
so every token is a sample); ``"auto"`` (default) is identity when the shapes match and fit
otherwise. Alpha is read in norm units of the *checkpoint's* own residual norm at its steering
layer (early checkpoints have much smaller norms than the final model).

One cell's work (load, carry, score) is in :mod:`analyses._sweep_cell`.

Resumability: each cell is a JSON file of a :class:`~contrans_tl.sweep.CellStore`, written
atomically from the calling process when the cell finishes. A sweep killed at any moment
loses only the cells in flight; rerunning the same command recomputes only the missing cells
(finished files are not touched) and skips refining if the vectors are on disk.

Executors: cells run through a :class:`concurrent.futures.Executor`: ``executor="process"``
(default, a local spawn process pool of ``max_workers``), ``"serial"`` (this process), or any
executor passed to :func:`run` (submitit, Dask, Ray: see :mod:`analyses._checkpoints` and
docs/analyses.md); cells read the saved vectors from ``out``, and the caller writes the results.

Run: ``python -m contrans_tl.analyses.checkpoint_sweep --model LLM360/Amber --checkpoints ckpt_000,ckpt_100,ckpt_359``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import contrans_tl as ct
from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.analyses import _common as cm
from contrans_tl.analyses._sweep_cell import CellArgs, clear_slot, run_cell
from contrans_tl.analyses._checkpoints import (
    AMBER_CHECKPOINTS,
    AMBER_TOTAL_TOKENS,
    PYTHIA_TOKENS_PER_STEP,
    JobExecutor,
    RayExecutor,
    cell_executor,
    check_checkpoint,
    make_tiny_checkpoints,
    resolve_checkpoint,
    training_tokens,
)
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.files import write_json
from contrans_tl.sweep import CellStore, cell_key, grid_axis, run_option, settings_fingerprint
from contrans_tl.tasks.emotion import EMOTIONS, emotion_task
from contrans_tl.transplant import Unit

__all__ = [
    "Config", "CellArgs", "QUICK", "HELP", "run", "run_cell", "plot", "summary_table",
    "add_args", "config_from_args", "run_cli", "main",
    # re-exported from analyses._checkpoints: the sweep's public API
    "PYTHIA_TOKENS_PER_STEP", "AMBER_TOTAL_TOKENS", "AMBER_CHECKPOINTS", "resolve_checkpoint", "training_tokens",
    "JobExecutor", "RayExecutor", "make_tiny_checkpoints",
]

HELP = "checkpoint sweep: a final model's concept transplanted into its training checkpoints (paper §6.1, Fig 3)"

QUICK: dict[str, Any] = {"emotions": ("happiness", "sadness"), "n_refine": 8, "n_eval": 4}
"""``--quick``: two emotions, 8 refinement prompts per side, 4 negatives per other emotion."""


@dataclass
class Config(cm.RunSettings):
    """Settings of one sweep (each field is a command-line flag; shared ones in :class:`RunSettings`)."""

    model: str = "LLM360/Amber"
    """The final model (hub id, offline name or directory); its vectors are carried back."""
    checkpoints: tuple[str, ...] = grid_axis(("ckpt_000", "ckpt_050", "ckpt_100", "ckpt_200", "ckpt_300", "ckpt_359"))
    """Checkpoints swept: ``ckpt_k`` revisions, Pythia ``stepN`` or local directories."""
    final_revision: str | None = None
    """Revision of the final model (None: the hub's main branch; Amber's main is ckpt_359)."""
    out: str = run_option("runs/checkpoint_sweep")
    """Output directory: final/ (vectors, states), cells/, sweep.json, the figure (resumable)."""
    alphas: tuple[float, ...] = grid_axis((0.0, 0.3))
    """Strengths (alpha 0, the baseline, is always added)."""
    emotions: tuple[str, ...] = EMOTIONS
    """Emotions transplanted (the label set is always all six)."""
    n_refine: int | None = None
    """Refinement prompts per side (None: the whole refinement half, 35)."""
    n_eval: int | None = None
    """Evaluation scenarios per other emotion (None: all 35)."""
    depth: float = 2 / 3
    """Relative depth of each checkpoint's steering layer."""
    unit: Unit = "norm"
    """"norm" (alpha is a fraction of the checkpoint's own residual norm) or "raw"."""
    metric: str = "logit_acc"
    """"logit_acc" or "token_acc": the accuracy the table reports (both are stored)."""
    mapping: str = "auto"
    """"identity", "fit" (affine map on token-aligned neutral text) or "auto"."""
    n_texts: int | None = None
    """With ``map_corpus="neutral"``: how many built-in neutral sentences ``mapping="fit"`` fits on (None: 200)."""
    map_corpus: str = "neutral"
    """What ``mapping="fit"`` fits on: "neutral" (the first ``n_texts`` built-in sentences) or a map-corpus spec
    (:mod:`contrans_tl.corpus`; "concept" = the emotions' contrast prompts)."""
    map_estimator: str = "ridge"
    """How ``mapping="fit"`` fits (:mod:`contrans_tl.estimators`)."""
    executor: str = run_option("process")
    """"process" (local ProcessPoolExecutor) or "serial"; or pass an Executor to run()."""
    max_workers: int = run_option(1)
    """Processes of the local pool (each holds one model)."""
    threads: int | None = run_option(None)
    """torch threads per cell process (None: torch's default)."""
    tokens_per_step: float | None = None
    """Tokens per ``stepN`` (default: Pythia's 2,097,152)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.checkpoints = tuple(str(c) for c in self.checkpoints)
        self.emotions = tuple(self.emotions)
        self.alphas = tuple(sorted({0.0, *(float(a) for a in self.alphas)}))
        validate.choice("mapping", self.mapping, ("auto", "identity", "fit"))
        validate.corpus_spec("map_corpus", self.map_corpus)
        cm.check_neutral_count(self, default=200)
        validate.choice("map_estimator", self.map_estimator, validate.MAP_ESTIMATORS)
        validate.choice("executor", self.executor, ("process", "serial"))
        validate.choice("metric", self.metric, ("logit_acc", "token_acc"))
        validate.choice("unit", self.unit, ("norm", "raw"))
        if not self.checkpoints:
            raise InvalidArgumentError("checkpoints", self.checkpoints, "at least one checkpoint")
        if len({cm.slug(c) for c in self.checkpoints}) != len(self.checkpoints):
            raise InvalidArgumentError("checkpoints", self.checkpoints, "distinct checkpoint names")
        for i, spec in enumerate(self.checkpoints):
            check_checkpoint(f"checkpoints[{i}]", spec)
        cm.check_shared_fields(self)
        self.alphas = tuple(sorted(set(self.alphas)))
        validate.integer("max_workers", self.max_workers, low=1)
        if self.threads is not None:
            validate.integer("threads", self.threads, low=1)
        if self.tokens_per_step is not None:
            validate.real("tokens_per_step", self.tokens_per_step, low=0.0, low_open=True)
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidArgumentError("model", self.model, "the final model: a name, hub id, folder or .gguf file")


# ---- the sweep ------------------------------------------------------------------------------------
def _final_artifacts(cfg: Config, out: Path, log: cm.RunLog) -> tuple[Path, Path | None]:
    """Refine the vectors in the final model (and capture its aligned states) unless on disk."""
    vec_dir = out / "final" / "vectors"
    states_path = out / "final" / "aligned_tokens.safetensors" if cfg.mapping != "identity" else None
    missing = [e for e in cfg.emotions if not (vec_dir / f"{e}.safetensors").is_file()]
    need_states = states_path is not None and not states_path.is_file()
    if not missing and not need_states:
        return vec_dir, states_path
    kwargs: dict[str, Any] = {"device": cfg.device, "dtype": cm.DTYPES[cfg.dtype]}
    if cfg.final_revision:
        kwargs["revision"] = cfg.final_revision
    model = log.load(cfg.model, "refine in the final model", **kwargs)
    task = emotion_task(tuple(missing or cfg.emotions[:1]), n_refine=cfg.n_refine, n_eval=cfg.n_eval,
                        seed=cfg.seed, data_dir=cfg.data_dir)
    layer = cm.layer_at_depth(int(model.cfg.n_layers), cfg.depth)
    if missing:
        for e, v in cm.refine_emotions(model, task, batch_size=cfg.batch_size, log=log, name=cfg.model).items():
            v.save(vec_dir / f"{e}.safetensors")
    if states_path is not None and need_states:
        every = emotion_task(cfg.emotions, n_refine=cfg.n_refine, n_eval=cfg.n_eval, seed=cfg.seed, data_dir=cfg.data_dir)
        texts = list(cm.map_corpus(cfg.map_corpus, neutral_sentences()[: cfg.n_texts], every).texts)  # as every cell
        ct.capture_paired(model, texts, layers=[layer], scheme="tokens", batch_size=8).save(states_path)
        log.forward(cfg.model, "capture_paired", cm.batches(len(texts), 8))
    del model
    cm.free_memory()
    return vec_dir, states_path


def _is_sweep_cell(value: Any) -> bool:
    """Whether a stored cell holds a whole :func:`run_cell` result (else it is recomputed)."""
    return (isinstance(value, dict) and isinstance(value.get("per_emotion"), dict)
            and all(cm.is_score_cell(v) for v in value["per_emotion"].values())
            and all(isinstance(value.get(k), (int, float)) and not isinstance(value.get(k), bool)
                    for k in ("mean_logit_acc", "mean_token_acc", "layer"))
            and isinstance(value.get("mapping"), str) and "tokens" in value)


def cell_name(checkpoint: str, alpha: float) -> str:
    return cell_key(ckpt=cm.slug(checkpoint), alpha=f"{alpha:g}")


def _cells(cfg: Config, vec_dir: Path, states_path: Path | None) -> dict[str, CellArgs]:
    """Every (checkpoint, alpha) cell, grouped by checkpoint so that a worker reuses its loaded model."""
    return {
        cell_name(ckpt, alpha): CellArgs(
            model=cfg.model, checkpoint=ckpt, alpha=alpha, vectors_dir=str(vec_dir.resolve()),
            final_states=None if states_path is None else str(states_path.resolve()),
            emotions=cfg.emotions, n_refine=cfg.n_refine, n_eval=cfg.n_eval, seed=cfg.seed,
            data_dir=cfg.data_dir, depth=cfg.depth, unit=cfg.unit, mapping=cfg.mapping, n_texts=cfg.n_texts,
            map_corpus=cfg.map_corpus, map_estimator=cfg.map_estimator,
            batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads,
            tokens_per_step=cfg.tokens_per_step)
        for ckpt in cfg.checkpoints
        for alpha in cfg.alphas
    }


def run(cfg: Config, *, executor: Any = None) -> dict[str, Any]:
    """Run (or resume) the sweep; writes ``sweep.json`` under ``cfg.out`` and returns it.

    ``executor`` overrides ``cfg.executor``: any ``concurrent.futures.Executor`` (a Dask
    ``Client.get_executor()``, a thread pool, ...) or an executor whose ``submit`` returns job
    handles with a blocking ``result()`` — submitit's ``AutoExecutor`` — which is wrapped in a
    :class:`JobExecutor`. The caller owns it (it is not shut down here).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = cm.RunLog(out / "run_log.jsonl", verbose=cfg.progress)
    store = CellStore(out / "cells", settings=settings_fingerprint(cfg), valid=_is_sweep_cell)
    cells = _cells(cfg, *_final_artifacts(cfg, out, log))
    done_before = sum(store.has(k) for k in cells)
    with cell_executor(executor, cfg.executor, max_workers=cfg.max_workers, threads=cfg.threads,
                       needed=done_before < len(cells)) as (pool, pool_name):
        try:
            results = store.run(cells, run_cell, executor=pool, desc="cells" if cfg.progress else None)
        finally:
            clear_slot()
    result = _assemble(cfg, results)
    result.update(log.summary())
    result["cells_before_this_run"] = done_before
    result["cells_computed_this_run"] = len(cells) - done_before
    result["executor"] = pool_name
    result["timings_s"] = {"total": round(time.perf_counter() - t0, 2)}
    result["config"] = dataclasses.asdict(cfg)
    write_json(out / "sweep.json", result)
    return json.loads((out / "sweep.json").read_text())


def _assemble(cfg: Config, results: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for ckpt in cfg.checkpoints:
        cells = {f"{a:g}": results[cell_name(ckpt, a)] for a in cfg.alphas}
        base = cells["0"]
        rows.append({
            "checkpoint": ckpt,
            "tokens": base["tokens"],
            "layer": base["layer"],
            "mapping": next((c["mapping"] for c in cells.values()), None),
            "baseline": {"mean_logit_acc": base["mean_logit_acc"], "mean_token_acc": base["mean_token_acc"]},
            "transplanted": {a: {"mean_logit_acc": c["mean_logit_acc"], "mean_token_acc": c["mean_token_acc"]}
                             for a, c in cells.items() if a != "0"},
            "cells": cells,
        })
    return {
        "analysis": "checkpoint_sweep",
        "model": cfg.model,
        "checkpoints": list(cfg.checkpoints),
        "alphas": list(cfg.alphas),
        "metric": cfg.metric,
        "unit": cfg.unit,
        "emotions": list(cfg.emotions),
        "rows": rows,
    }


def plot(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Baseline and transplanted mean accuracy against training tokens (Logit and Token Acc)."""
    from contrans_tl import plotting

    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    known = all(t is not None for t in tokens)
    metrics = {"Logit Acc": "mean_logit_acc", "Token Acc": "mean_token_acc"}
    alphas = [f"{a:g}" for a in result["alphas"] if a != 0]
    fig = plotting.accuracy_vs_training(
        tokens if known else range(len(rows)),
        {name: [r["baseline"][m] for r in rows] for name, m in metrics.items()},
        {name: {a: [r["transplanted"][a][m] for r in rows] for a in alphas} for name, m in metrics.items()},
        xlabel="training tokens" if known else "checkpoint",
        tick_labels=None if known else [Path(r["checkpoint"]).name for r in rows],
        title=f"{result['model']}: final-model vectors into checkpoints",
    )
    return plotting.save_figure(fig, Path(out) / "checkpoint_sweep")


# ---- command line ---------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=flags.model_flag, help="final model (default LLM360/Amber)")
    p.add_argument("--final-revision", type=flags.text_flag, help="hub revision of the final model")
    p.add_argument("--checkpoints", type=flags.name_list_flag,
                   help="comma-separated: ckpt_000 (revision), step1000 (Pythia), DIR (an existing folder)")
    p.add_argument("--out", type=flags.out_dir_flag, help=f"output directory (default {Config.out})")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (flags below override)")
    p.add_argument("--alphas", type=flags.float_list_flag)
    cm.add_size_args(p, texts_help="with --map-corpus neutral: built-in neutral sentences for mapping='fit' (default 200)")
    p.add_argument("--unit", choices=["norm", "raw"])
    p.add_argument("--metric", choices=["logit_acc", "token_acc"])
    p.add_argument("--mapping", choices=["auto", "identity", "fit"])
    p.add_argument("--executor", choices=["process", "serial"])
    p.add_argument("--max-workers", type=flags.positive_int_flag, help="processes of the local pool")
    p.add_argument("--threads", type=flags.positive_int_flag, help="torch threads per cell process")
    p.add_argument("--tokens-per-step", type=flags.positive_float_flag, help="tokens per stepN checkpoint")
    cm.add_map_args(p, default_corpus=Config.map_corpus)
    cm.add_run_args(p)


def config_from_args(args: argparse.Namespace) -> Config:
    return cm.config_from_args(Config, QUICK, args)


def summary_table(result: dict[str, Any]) -> str:
    metric = result["metric"]
    alphas = [f"{a:g}" for a in result["alphas"] if a != 0]
    lines = [f"| checkpoint | tokens | baseline {metric} | " + " | ".join(f"alpha {a}" for a in alphas) + " |",
             "|---|---|---|" + "---|" * len(alphas)]
    for r in result["rows"]:
        tok = "–" if r["tokens"] is None else f"{r['tokens']:.3g}"
        cells = [f"{r['transplanted'][a]['mean_' + metric]:.3f}" for a in alphas]
        lines.append(f"| {Path(r['checkpoint']).name} | {tok} | {r['baseline']['mean_' + metric]:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run(cfg)
    if not args.no_plot:
        plot(result, cfg.out)
    print(summary_table(result))
    print(f"cells computed now: {result['cells_computed_this_run']} (already done: {result['cells_before_this_run']})")
    print(f"wrote {Path(cfg.out) / 'sweep.json'} ({result['timings_s']['total']:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cm.script_main("checkpoint_sweep", HELP, add_args, run_cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
