"""Helpers shared by the emotion analyses (demo, size matrix, checkpoint sweep, token shift).

The emotion task itself (prompts, splits, negatives, refinement, scoring) is
:class:`contrans_tl.tasks.emotion.EmotionTask`; this module only adds what the analyses share
around it: :class:`RunLog` (every model load and an estimate of the forward batches run), the
steering layer by depth, the identity carry of a vector between checkpoints, and the
command-line plumbing.

Conventions the analyses share:

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

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.artifacts import ConceptVector
from contrans_tl.corpus import MapCorpus, corpus_digest, resolve_corpus
from contrans_tl.entry import CommandParser, run_reporting_errors, split_debug
from contrans_tl.errors import InvalidArgumentError, WidthMismatchError
from contrans_tl.handle import ModelHandle
from contrans_tl.models import identity, load_model
from contrans_tl.sweep import input_path, run_option
from contrans_tl.tasks.emotion import EmotionTask
from contrans_tl.transplant import Unit

__all__ = [
    "RunSettings",
    "layer_at_depth",
    "free_memory",
    "RunLog",
    "refine_emotions",
    "evaluate",
    "is_score_cell",
    "with_norms",
    "relabel",
    "slug",
    "PhaseTimes",
    "batches",
    "script_main",
    "DTYPES",
    "add_run_args",
    "add_size_args",
    "check_shared_fields",
    "config_from_args",
]


@dataclass
class RunSettings:
    """The settings every emotion analysis's Config shares (the flags of :func:`add_run_args`)."""

    batch_size: int = run_option(16)
    """Prompts per forward batch."""
    device: str | None = run_option(None)
    """Device of the models (None: the library's default)."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16."""
    seed: int = 0
    """Seed of the scenario split, the contrast negatives and the maps' held-out split."""
    data_dir: str | None = input_path(None)
    """Directory of {emotion}.json scenario lists (default: the built-in set); its content is fingerprinted."""
    progress: bool = run_option(False)
    """Report each model load and show progress bars."""

    def __post_init__(self) -> None:
        validate.choice("dtype", self.dtype, tuple(DTYPES))
        validate.integer("batch_size", self.batch_size, low=1)
        validate.integer("seed", self.seed, low=0)
        validate.device("device", self.device)
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise InvalidArgumentError("data_dir", self.data_dir, "a folder of <emotion>.json scenario lists")
        validate.out_dir("out", getattr(self, "out", "."))


def check_shared_fields(cfg: Any) -> None:
    """The fields most emotion analyses' Configs share, checked by their ``__post_init__``:
    sizes ``n_refine`` / ``n_eval`` / ``n_texts`` (None or >= 1), ``depth`` in (0, 1], ``alphas``
    finite (made a tuple of floats) and ``emotions`` known."""
    from contrans_tl.tasks.emotion import EMOTIONS

    for name in ("n_refine", "n_eval", "n_texts"):
        if getattr(cfg, name, None) is not None:
            validate.integer(name, getattr(cfg, name), low=1)
    if hasattr(cfg, "depth"):
        validate.real("depth", cfg.depth, low=0.0, high=1.0, low_open=True)
    if hasattr(cfg, "alphas"):
        cfg.alphas = tuple(validate.real(f"alphas[{i}]", a) for i, a in enumerate(cfg.alphas))
    if hasattr(cfg, "emotions"):
        cfg.emotions = tuple(cfg.emotions)
        for i, e in enumerate(cfg.emotions):
            validate.choice(f"emotions[{i}]", e, EMOTIONS)
        if not cfg.emotions or len(set(cfg.emotions)) != len(cfg.emotions):
            raise InvalidArgumentError("emotions", cfg.emotions, "one or more distinct emotions")


@dataclass
class PhaseTimes:
    """Wall and CPU seconds of each phase of a run, plus the recorded cost of the work it reused.

    A resumed run does not recompute finished cells or artifacts; their recorded compute time
    (:meth:`contrans_tl.sweep.CellStore.reused`) is added to the phase that reused them, so the
    table describes the whole result, not only this process.
    """

    store: Any = None
    """The run's CellStore (its ``reused_*_s`` counters), or None."""
    rows: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (a repeated name adds up)."""
        wall, cpu = time.perf_counter(), time.process_time()
        reused = (self.store.reused_wall_s, self.store.reused_cpu_s) if self.store is not None else (0.0, 0.0)
        try:
            yield
        finally:
            row = self.rows.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "reused_wall_s": 0.0, "reused_cpu_s": 0.0})
            row["wall_s"] += time.perf_counter() - wall
            row["cpu_s"] += time.process_time() - cpu
            if self.store is not None:
                row["reused_wall_s"] += self.store.reused_wall_s - reused[0]
                row["reused_cpu_s"] += self.store.reused_cpu_s - reused[1]

    @contextlib.contextmanager
    def record(self, key: str) -> Iterator[None]:
        """Record what the block cost under ``key`` in the store, so a resumed run can count it as reused."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.store.record_time(key, time.perf_counter() - wall, time.process_time() - cpu)

    @classmethod
    def from_dict(cls, rows: dict[str, dict[str, float]]) -> "PhaseTimes":
        """The phases of a result's ``phases`` entry, to add more (figures, say)."""
        keep = ("wall_s", "cpu_s", "reused_wall_s", "reused_cpu_s")
        return cls(rows={name: {k: float(row[k]) for k in keep} for name, row in rows.items()})

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Rounded rows, each with ``total_wall_s`` = this run + reused work."""
        out = {name: {k: round(v, 4) for k, v in row.items()} for name, row in self.rows.items()}
        for row in out.values():
            row["total_wall_s"] = round(row["wall_s"] + row["reused_wall_s"], 4)
        return out

    def table(self) -> str:
        """The phases as a markdown table (seconds)."""
        rows = self.as_dict()
        lines = ["| phase | wall (this run) | CPU (this run) | reused work (recorded wall) | total wall |",
                 "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['reused_wall_s']:.1f} | {r['total_wall_s']:.1f} |"
                  for name, r in rows.items()]
        total = {k: sum(r[k] for r in rows.values()) for k in ("wall_s", "cpu_s", "reused_wall_s", "total_wall_s")}
        lines.append(f"| **all** | {total['wall_s']:.1f} | {total['cpu_s']:.1f} | {total['reused_wall_s']:.1f} | "
                     f"{total['total_wall_s']:.1f} |")
        return "\n".join(lines)


def layer_at_depth(n_layers: int, depth: float) -> int:
    """The block at relative ``depth`` (0..1]: ``round(depth * n) - 1``, clipped to the model."""
    validate.real("depth", depth, low=0.0, high=1.0, low_open=True)
    return min(n_layers - 1, max(0, round(depth * n_layers) - 1))


def free_memory() -> None:
    """Return a dropped model's memory (call after the last reference to it is gone)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batches(n: int, batch_size: int) -> int:
    """Forward batches needed for ``n`` prompts."""
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

    def load(self, name: str, purpose: str, **kwargs: Any) -> ModelHandle:
        """:func:`contrans_tl.load_model` with the load recorded as (model, purpose)."""
        start = time.perf_counter()
        model = load_model(name, **kwargs)
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
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run may be cut short: skip it
                continue
        return [r for r in rows if isinstance(r, dict) and r.get("event") == "load"]


# ---- the task's steps, with the forward batches recorded -------------------------------------------
def refine_emotions(
    model: ModelHandle, task: EmotionTask, *, batch_size: int = 16, log: RunLog | None = None, name: str = ""
) -> dict[str, ConceptVector]:
    """:meth:`EmotionTask.refine_all`, with its forward batches recorded in ``log``."""
    vectors = task.refine_all(model, batch_size=batch_size)
    if log is not None:
        for emotion in task.emotions:
            pos, neg = task.contrast(emotion)
            log.forward(name, "refine", batches(len(pos), batch_size) + batches(len(neg), batch_size))
    return vectors


def evaluate(
    model: ModelHandle,
    task: EmotionTask,
    emotion: str,
    *,
    vector: ConceptVector | None = None,
    alpha: float = 0.0,
    layer: int | None = None,
    unit: Unit = "norm",
    batch_size: int = 16,
    log: RunLog | None = None,
    name: str = "",
) -> dict[str, Any]:
    """:meth:`EmotionTask.score` on ``emotion``'s negatives at one ``layer``, recorded in ``log``."""
    out = task.score(model, emotion, vector=vector, alpha=alpha, layers=None if layer is None else [layer],
                     unit=unit, batch_size=batch_size)
    if log is not None:
        log.forward(name, "evaluate_emotion", 1 + batches(len(task.negatives(emotion)), batch_size))
    return out


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def is_score_cell(value: Any) -> bool:
    """Whether a stored cell holds one :meth:`EmotionTask.score` result (``logit_acc``, ``token_acc``, ``n``):
    the ``valid`` check of the emotion analyses' cell stores, so ``{}`` or a wrong-typed cell is recomputed."""
    return (isinstance(value, dict) and _number_or_none(value.get("logit_acc", "")) and
            _number_or_none(value.get("token_acc", "")) and isinstance(value.get("n"), int))


def with_norms(vector: ConceptVector, norms: Float[Tensor, "n_layers"] | None, reference: str) -> ConceptVector:
    """``vector`` with alpha's norm unit taken from ``norms`` (the target's own, per layer); the
    vector's provenance records where the unit came from (``norm_reference``)."""
    if norms is None:
        return vector
    return dataclasses.replace(vector, layer_norms=norms.clone(),
                               provenance={**vector.provenance, "norm_reference": reference})


def relabel(vector: ConceptVector, model: ModelHandle, norms: Float[Tensor, "n_layers"] | None = None,
            reference: str = "the checkpoint's mean resid_post norm") -> ConceptVector:
    """A vector of one checkpoint used in another of the same architecture (identity map).

    Raises :class:`~contrans_tl.WidthMismatchError` when the shapes differ: then a map is needed.
    """
    ident = identity(model)
    if (vector.model.n_layers, vector.d_model) != (ident.n_layers, ident.d_model):
        raise WidthMismatchError(
            f"identity map needs equal shapes: {vector.model.name} is {vector.model.n_layers}x{vector.d_model}, "
            f"{ident.name} is {ident.n_layers}x{ident.d_model}; use a fitted map"
        )
    out = dataclasses.replace(
        vector, model=ident, method="identity", provenance={**vector.provenance, "refined_in": dataclasses.asdict(vector.model)}
    )
    return with_norms(out, norms, reference)


# ---- names, flags and the command line ----------------------------------------------------------------
def slug(name: str) -> str:
    """A filename-safe name for a model (hub id, offline name or local path)."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in str(name).strip("/")).strip("-") or "model"


def script_main(
    prog: str,
    description: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run_cli: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """The ``python -m contrans_tl.analyses.<name>`` entry: the same one-line errors and exit codes as ``contrans``."""
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    parser = CommandParser(prog=f"python -m contrans_tl.analyses.{prog}", description=description)
    add_args(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag already reported in one line
        return int(stop.code or 0)
    return run_reporting_errors(lambda: run_cli(args), debug=debug)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The ``--dtype`` choices of the analyses, by name."""


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags every emotion analysis shares: batching, device and dtype, seed, data, output."""
    p.add_argument("--batch-size", type=flags.positive_int_flag)
    p.add_argument("--device", type=flags.device_flag)
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--seed", type=flags.nonnegative_int_flag)
    p.add_argument("--data-dir", type=flags.existing_dir_flag, help="folder of <emotion>.json scenario files (default: built-in)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")


def add_size_args(p: argparse.ArgumentParser, *, texts_help: str | None = None) -> None:
    """``--emotions``, ``--n-refine``, ``--n-eval``, ``--n-texts``, ``--depth`` (see :func:`check_shared_fields`)."""
    p.add_argument("--emotions", type=flags.name_list_flag, help="comma-separated emotions (default: all six)")
    p.add_argument("--n-refine", type=flags.positive_int_flag, help="refinement prompts per side")
    p.add_argument("--n-eval", type=flags.positive_int_flag, help="evaluation scenarios per other emotion")
    p.add_argument("--n-texts", type=flags.positive_int_flag, help=texts_help or "neutral sentences for the map")
    p.add_argument("--depth", type=flags.depth_flag, help="relative depth of the steering layer, in (0, 1]")


def config_from_args(config_cls: Any, quick: dict[str, Any], args: argparse.Namespace) -> Any:
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


def add_map_args(p: argparse.ArgumentParser, *, default_corpus: str) -> None:
    """``--map-corpus`` and ``--map-estimator``: what an analysis's maps are fitted on, and how (``default_corpus``:
    the analysis's ``Config.map_corpus``, shown in the help)."""
    p.add_argument("--map-corpus", type=flags.corpus_flag,
                   help=f"what the maps are fitted on (default {default_corpus}): neutral, neutral:N, file:PATH, "
                        "wikisplit:PATH[:N], concept (the emotions' contrast prompts) or a union such as concept+neutral")
    p.add_argument("--map-estimator", type=flags.estimator_flag,
                   help=f"how the maps are fitted: {', '.join(validate.MAP_ESTIMATORS)} (default ridge)")


def check_neutral_count(cfg: Any, *, default: int | None) -> None:
    """``cfg.n_texts`` counts built-in neutral sentences, so beside another ``cfg.map_corpus`` (where it would be
    ignored) it is refused by name; with the neutral corpus an unset count becomes ``default`` (None: all 400)."""
    if cfg.map_corpus != "neutral":
        if cfg.n_texts is not None:
            raise InvalidArgumentError("n_texts", cfg.n_texts, f"a value only with map_corpus 'neutral' (it counts "
                                       f"neutral sentences; map_corpus is {cfg.map_corpus!r}: write neutral:N there)")
        return
    if cfg.n_texts is None:
        cfg.n_texts = default
    if cfg.n_texts is not None:
        validate.integer("n_texts", cfg.n_texts, low=1)


def map_corpus(spec: str, neutral: Sequence[str], task: EmotionTask | None = None) -> MapCorpus:
    """The texts an analysis fits its maps on: ``neutral`` (its own selection of the built-in sentences) for the
    default spec "neutral", else the spec's texts (:func:`contrans_tl.corpus.resolve_corpus`), where "concept"
    stands for the emotions' contrast prompts (never an evaluation scenario)."""
    if spec == "neutral":
        texts = tuple(neutral)
        return MapCorpus(texts, spec, {"spec": spec, "n_texts": len(texts), "sha256": corpus_digest(texts),
                                       "parts": [{"spec": "neutral", "n_texts": len(texts)}]})
    concept = None
    if task is not None:
        concept = list(dict.fromkeys(p for e in task.emotions for p in sum(task.contrast(e), [])))
    return resolve_corpus(spec, concept_texts=concept)
