"""Helpers shared by the emotion analyses (size matrix, checkpoint sweep, token shift).

Everything here composes the library: emotion prompts and evaluation come from
:mod:`contrans_tl.tasks.emotion`, vectors from :func:`contrans_tl.refine`, steering from
:func:`contrans_tl.transplant`, and models from :func:`contrans_tl.load_model` (through
:class:`RunLog`, which records every load and an estimate of the forward batches run).

Conventions the three analyses share:

* **Steering layer.** Each model is steered at one layer chosen by relative depth
  (:func:`layer_at_depth`, default 2/3: ``round(2 n / 3) - 1``, as in the alignment analysis).
* **Negatives.** An emotion ``e`` is evaluated on the *evaluation* scenarios of the other five
  emotions (the paper's "negatives"); Token/Logit Acc is the share answered with ``e``'s label,
  so the untransplanted baseline is low and a working transplant raises it. The label set is
  always all six emotions, even when only some are steered.
* **Alpha in norm units.** ``alpha`` is a fraction of the *target's* mean residual norm at the
  steering layer (last token of the emotion prompts). Every vector transplanted into a target,
  native or mapped from any source, is read against that same norm (:func:`with_norms`), so
  two vectors into one target differ only in direction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

import contrans_tl as ct
from contrans_tl.artifacts import ConceptVector
from contrans_tl.files import json_ready, write_json
from contrans_tl.tasks.emotion import EMOTIONS, emotion_scenarios
from contrans_tl.tasks.emotion import QUERY, contrast_prompts, evaluate_emotion, few_shot_prefix, split_scenarios

__all__ = [
    "EmotionTask",
    "emotion_task",
    "layer_at_depth",
    "RunLog",
    "refine_emotions",
    "evaluate",
    "with_norms",
    "relabel",
    "slug",
    "write_json",
    "json_ready",
    "floats",
    "names",
    "batches",
    "DTYPES",
    "add_run_args",
    "config_from_args",
]


# ---- the emotion task ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EmotionTask:
    """Which emotions are steered and the prompts every analysis draws for them (seeded)."""

    emotions: tuple[str, ...]
    """Emotions whose vectors are refined and transplanted (a subset of the six)."""
    refine_scenarios: dict[str, list[str]]
    eval_scenarios: dict[str, list[str]]
    prefix: str
    """Few-shot block (one solved example per emotion, from the refinement half)."""
    n_refine: int | None
    n_eval: int | None
    seed: int

    def contrast(self, emotion: str) -> tuple[list[str], list[str]]:
        """Refinement prompts: ``n_refine`` scenarios of ``emotion`` against as many others."""
        return contrast_prompts(self.refine_scenarios, emotion, n=self.n_refine, seed=self.seed)

    def negatives(self, emotion: str) -> list[str]:
        """Evaluation scenarios of every other emotion (``n_eval`` each), raw (no query)."""
        return [s for e in EMOTIONS if e != emotion for s in self.eval_scenarios[e][: self.n_eval]]

    def negative_prompts(self, emotion: str) -> list[str]:
        """:meth:`negatives` formatted with the refinement query (for lens read-outs)."""
        return [QUERY.format(s) for s in self.negatives(emotion)]

    def describe(self) -> dict[str, Any]:
        return {
            "emotions": list(self.emotions),
            "n_refine_per_side": len(self.contrast(self.emotions[0])[0]),
            "n_eval_per_other_emotion": self.n_eval,
            "n_negatives_per_emotion": len(self.negatives(self.emotions[0])),
            "seed": self.seed,
        }


def emotion_task(
    emotions: Sequence[str] = EMOTIONS,
    *,
    n_refine: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
) -> EmotionTask:
    """Split the scenarios (built-in, or ``data_dir`` in the same format) once for a run."""
    bad = [e for e in emotions if e not in EMOTIONS]
    if bad or not emotions:
        raise ValueError(f"unknown or no emotions {bad or list(emotions)}; choose from {EMOTIONS}")
    split = split_scenarios(emotion_scenarios(data_dir), seed=seed)
    return EmotionTask(
        tuple(emotions), split.refine, split.evaluate, few_shot_prefix(split.refine, seed=seed), n_refine, n_eval, seed
    )


def layer_at_depth(n_layers: int, depth: float) -> int:
    """The block at relative ``depth`` (0..1]: ``round(depth * n) - 1``, clipped to the model."""
    if not 0 < depth <= 1:
        raise ValueError(f"depth must be in (0, 1], not {depth}")
    return min(n_layers - 1, max(0, round(depth * n_layers) - 1))


def batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size) if n else 0


# ---- model loads and a forward-pass estimate -------------------------------------------------------
@dataclass
class RunLog:
    """Every model load of a run with its purpose, and an estimate of the forward batches run.

    ``forward_batches`` is *estimated* from the library calls made (prompt counts divided by
    the batch size, plus one pass per few-shot prefix), not counted by hooks on the model.
    With ``path`` each event is also appended to a JSON-lines file that survives resumes.
    """

    path: Path | None = None
    verbose: bool = False
    loads: list[dict[str, Any]] = field(default_factory=list)
    forward_batches: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def _event(self, event: dict[str, Any]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
        if self.verbose:
            print(" ".join(f"{k}={v}" for k, v in event.items()), file=sys.stderr, flush=True)

    def load(self, name: str, purpose: str, **kwargs: Any) -> Any:
        """:func:`contrans_tl.load_model` with the load recorded as (model, purpose)."""
        start = time.perf_counter()
        model = ct.load_model(name, **kwargs)
        entry = {"event": "load", "model": name, "purpose": purpose,
                 "seconds": round(time.perf_counter() - start, 2), "time": time.time()}
        entry.update({k: str(v) for k, v in kwargs.items() if k in ("revision", "checkpoint") and v is not None})
        self.loads.append(entry)
        self._event(entry)
        return model

    def forward(self, model_name: str, what: str, n_batches: int) -> None:
        """Record ``n_batches`` forward batches of ``what`` run on ``model_name``."""
        self.forward_batches[model_name] = self.forward_batches.get(model_name, 0) + int(n_batches)
        self.calls[what] = self.calls.get(what, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "model_loads": len(self.loads),
            "loads": [[e["model"], e["purpose"]] for e in self.loads],
            "load_log": self.loads,
            "forward_batches_estimated": dict(self.forward_batches),
            "library_calls": dict(self.calls),
        }

    def all_runs(self) -> list[dict[str, Any]]:
        """Load events of every run that wrote to ``path`` (this one and the resumed ones)."""
        if self.path is None or not self.path.is_file():
            return list(self.loads)
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if r.get("event") == "load"]


# ---- vectors and evaluation -----------------------------------------------------------------------
def refine_emotions(
    model: Any, task: EmotionTask, *, batch_size: int = 16, log: RunLog | None = None, name: str = ""
) -> dict[str, ConceptVector]:
    """One mean-difference vector per steered emotion (all layers), refined in ``model``."""
    out = {}
    for emotion in task.emotions:
        pos, neg = task.contrast(emotion)
        out[emotion] = ct.refine(model, pos, neg, batch_size=batch_size)
        if log is not None:
            log.forward(name, "refine", batches(len(pos), batch_size) + batches(len(neg), batch_size))
    return out


def with_norms(vector: ConceptVector, norms: torch.Tensor | None) -> ConceptVector:
    """``vector`` with alpha's norm unit taken from ``norms`` (the target's own, per layer)."""
    return vector if norms is None else dataclasses.replace(vector, layer_norms=norms.clone())


def relabel(vector: ConceptVector, model: Any, norms: torch.Tensor | None = None) -> ConceptVector:
    """A vector of one checkpoint used in another of the same architecture (identity map).

    Raises :class:`~contrans_tl.WidthMismatchError` when the shapes differ: then a map is needed.
    """
    ident = ct.identity(model)
    if (vector.model.n_layers, vector.d_model) != (ident.n_layers, ident.d_model):
        raise ct.WidthMismatchError(
            f"identity map needs equal shapes: {vector.model.name} is {vector.model.n_layers}x{vector.d_model}, "
            f"{ident.name} is {ident.n_layers}x{ident.d_model}; use a fitted map"
        )
    out = dataclasses.replace(
        vector, model=ident, method="identity", provenance={**vector.provenance, "refined_in": dataclasses.asdict(vector.model)}
    )
    return with_norms(out, norms)


def evaluate(
    model: Any,
    task: EmotionTask,
    emotion: str,
    *,
    vector: ConceptVector | None = None,
    alpha: float = 0.0,
    layer: int | None = None,
    unit: str = "norm",
    batch_size: int = 16,
    log: RunLog | None = None,
    name: str = "",
) -> dict[str, float]:
    """Token/Logit Acc of answering ``emotion`` on its negatives, with ``vector`` transplanted.

    No vector or ``alpha == 0`` is the untransplanted baseline.
    """
    scenarios = task.negatives(emotion)
    steer = vector is not None and alpha != 0
    context = (
        ct.transplant(model, vector, alpha=alpha, layers=None if layer is None else [layer], unit=unit)  # type: ignore[arg-type]
        if steer
        else nullcontext()
    )
    with context:
        out = evaluate_emotion(model, scenarios, emotion, prefix=task.prefix, batch_size=batch_size)
    if log is not None:
        log.forward(name, "evaluate_emotion", 1 + batches(len(scenarios), batch_size))
    return out


# ---- files and arguments --------------------------------------------------------------------------
def slug(name: str) -> str:
    """A filename-safe name for a model (hub id, offline name or local path)."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in str(name).strip("/")).strip("-") or "model"


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def script_main(prog: str, description: str, add_args: Any, run_cli: Any, argv: Any = None) -> int:
    """The ``python -m contrans_tl.analyses.<name>`` entry: parse flags, run, report named errors as exit 2."""
    import argparse

    from contrans_tl.errors import ContransError

    parser = argparse.ArgumentParser(prog=f"python -m contrans_tl.analyses.{prog}", description=description)
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        return int(run_cli(args))
    except ContransError as err:
        print(f"{prog}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The ``--dtype`` choices of the analyses, by name."""


def add_run_args(p: Any) -> None:
    """The flags every emotion analysis shares: batching, device and dtype, seed, data, output."""
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", help="folder of <emotion>.json scenario files (default: built-in)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")


def config_from_args(config_cls: Any, quick: dict[str, Any], args: Any) -> Any:
    """A Config from parsed flags: ``quick`` presets first, then every flag the user set.

    Unset flags are None; a False from an unset store_true flag is dropped too, while a
    False that turns off a default-True field (``--no-native``) is kept.
    """
    values: dict[str, Any] = dict(quick) if args.quick else {}
    for f in dataclasses.fields(config_cls):
        v = getattr(args, f.name, None)
        if v is None or (v is False and not f.default):
            continue
        values[f.name] = v
    return config_cls(**values)
