"""Settings and shared machinery of the alignment evaluation (see :mod:`.alignment_eval`).

:class:`Config` holds every setting; :class:`AlignmentRun` the loaded models, the fitted map,
the perplexity texts, the timings and the store of finished MC1 scores of one run. The helpers
here are what the honesty and fairness sections share: steering several vectors at once, the
alpha/layer grid, refining the ConTrans and Self-Align vectors, and the perplexity rows.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import contrans_tl as ct
from contrans_tl import validate
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.datasets import generic_texts
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.fluency import Fluency, measure_fluency
from contrans_tl.handle import ModelHandle
from contrans_tl.sweep import CellStore, cell_key, input_path, run_option
from contrans_tl.tasks.perplexity import PerplexityResult, perplexity, perplexity_interval
from contrans_tl.tasks.selection import choose_within_bound
from contrans_tl.transplant import Steering, Unit, steer

from contrans_tl.analyses._common import relabel

__all__ = [
    "TASKS",
    "CONDITIONS",
    "METHOD_NAMES",
    "Config",
    "AlignmentRun",
    "Steer",
    "steered",
    "candidates",
    "weakest",
    "data_path",
    "default_layers",
    "concept_vectors",
    "choose_under_bound",
    "perplexity_rows",
]

TASKS = ("honesty", "fairness", "multi")
CONDITIONS = ("base", "transplant", "self-align", "inst-align", "align-training")
METHOD_NAMES = {
    "base": "Base",
    "align-training": "Align-Training",
    "inst-align": "Inst-Align",
    "self-align": "Self-Align",
    "transplant": "ConTrans",
}


@dataclass
class Config:
    """Settings of one alignment evaluation. Defaults: the offline pair, honesty only."""

    source: str = "smollm2-135m-instruct"
    target: str = "gemma-3-270m"
    tasks: tuple[str, ...] = ("honesty",)
    """Any of "honesty", "fairness", "multi" (honesty + fairness transplanted together; runs both)."""
    conditions: tuple[str, ...] = CONDITIONS
    honesty_concept: str = "truthfulqa"
    """"truthfulqa" (in-distribution questions) or "facts" (true/false statements, honesty-fact)."""
    data_dir: str | None = input_path(None)
    """Folder holding truthfulqa/, facts/, toxigen/prompts/, wikisplit/ (the public layout)."""
    truthfulqa: str | None = input_path(None)
    """TruthfulQA file or folder; "hub" for HF datasets. Default: data_dir/truthfulqa, else hub."""
    facts: str | None = input_path(None)
    toxigen: str | None = input_path(None)
    wikisplit: str | None = input_path(None)
    n_questions: int | None = None
    """Use only the first N TruthfulQA questions (development); None = all 817."""
    n_val: int = 50
    """Validation questions per fold (alpha is chosen on these, never on test questions)."""
    folds: int = 2
    """1: one validation/test split. k >= 2: cross-fitting, every question tested once."""
    n_concept: int = 200
    """Contrast prompts per side for refining honesty (drawn from non-test questions / facts)."""
    seed: int = 0
    alphas: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    """Grid searched on the validation split (0 = no intervention); points over the perplexity
    bound are not scored, so a fine grid costs little."""
    unit: Unit = "norm"
    """"norm": alpha is a fraction of the layer's mean residual norm; "raw": alpha · v (the paper)."""
    layers: tuple[int, ...] | None = None
    """Target layers steered (default: the layer at ~2/3 depth)."""
    layer_search: bool = False
    """Search each of ``layers`` alone as a grid point (else all of them are steered together)."""
    reduction: str = "sum"
    prompt_style: str = "qa"
    """"qa" (zero-shot "Q: …\\nA:") or "primer" (TruthfulQA's six-shot QA primer)."""
    target_chat: str = "auto"
    """Use the target's chat template for MC1 prompts: "auto" (when it has one), "chat", "plain"."""
    self_align_model: str | None = None
    """Refine Self-Align's vector here (the target's instruct sibling); default: the target."""
    instruct_model: str | None = None
    """The instruct model scored as Align-Training; None skips that row."""
    n_toxigen_test: int = 50
    n_toxigen_val: int = 20
    n_toxigen_concept: int = 100
    max_new_tokens: int = 20
    toxicity_scorer: str = "auto"
    """"auto" (ToxiGen RoBERTa if reachable, else alt-profanity-check), "roberta", "profanity-check",
    "stand-in" (circular: built from the refinement prompts; plumbing tests only), a hub id of another
    classifier, or "module:function" (a callable text -> probability)."""
    kl_bound: float = 0.1
    """The fluency bound of every alpha search (honesty and fairness), nats/token: a grid point is eligible
    only if its KL to the unsteered model on the built-in generic text (the fluency instrument,
    :mod:`contrans_tl.fluency`) stays within it — the demo's bound, the low end of ITI's mild regime."""
    n_fluency_texts: int = 19
    """Paragraphs of the built-in generic text the fluency instrument scores (about 2,000 tokens)."""
    n_ppl: int = 100
    """WikiSplit sentences for the reported perplexity."""
    map_texts: int | None = None
    """Fit the map on the first N built-in neutral sentences (default: all 400)."""
    batch_size: int = run_option(8)
    """Sequences per scoring batch."""
    gen_batch_size: int = run_option(4)
    """Prompts per generation batch."""
    device: str = run_option("cpu")
    dtype: str = "float32"
    out: str = run_option("runs/alignment_eval")
    """Output folder: alignment_eval.json, alignment_eval.md, cells/ (resumable)."""
    progress: bool = run_option(False)

    def __post_init__(self) -> None:
        validate.device("device", self.device)
        validate.out_dir("out", self.out)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise InvalidArgumentError("tasks", self.tasks, "any of " + ", ".join(TASKS))
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise InvalidArgumentError("conditions", self.conditions, "any of " + ", ".join(CONDITIONS))
        if "multi" in self.tasks and "transplant" not in self.conditions:
            raise InvalidArgumentError("conditions", self.conditions, "a list with 'transplant' for the multi task")
        if self.honesty_concept not in ("truthfulqa", "facts"):
            raise InvalidArgumentError("honesty_concept", self.honesty_concept, "'truthfulqa' or 'facts'")
        if self.unit not in ("norm", "raw"):
            raise InvalidArgumentError("unit", self.unit, "'norm' or 'raw'")
        if not self.alphas:
            raise InvalidArgumentError("alphas", self.alphas, "a grid of at least one alpha")
        validate.real("kl_bound", self.kl_bound, low=0.0, low_open=True)
        validate.integer("n_fluency_texts", self.n_fluency_texts, low=1, high=len(generic_texts()))


# ---- the state of one run ---------------------------------------------------------------------------
@dataclass
class AlignmentRun:
    """The models, map, texts, timings and score store of one evaluation, shared by its sections."""

    cfg: Config
    target: ModelHandle
    layers: tuple[int, ...]
    source: ModelHandle | None = None
    amap: AffineMap | None = None
    self_model: ModelHandle | None = None
    instruct: ModelHandle | None = None
    ppl_texts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    store: CellStore | None = None
    """Finished MC1 scores, one cell per (model, condition, question): a killed run resumes."""

    def progress(self, what: str) -> str | None:
        return what if self.cfg.progress else None

    def log(self, msg: str) -> None:
        if self.cfg.progress:
            print(msg, file=sys.stderr, flush=True)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's wall time to ``timings[name]`` (and log it with ``progress``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.timings[name] = round(self.timings.get(name, 0.0) + spent, 2)
            self.log(f"[{time.strftime('%H:%M:%S')}] {name}: {spent:.1f} s")

    def fluency_record(self) -> dict[str, Any]:
        """What the fluency bound was measured on, for the JSON."""
        texts = generic_texts()[: self.cfg.n_fluency_texts]
        return {"instrument": "KL(unsteered || steered) per token on the built-in generic text (contrans_tl.fluency)",
                "n_texts": len(texts), "kl_bound": self.cfg.kl_bound}

    def fluency(self, settings: dict[Any, Sequence["Steer"]]) -> dict[Any, Fluency]:
        """The fluency of each setting (its steers applied together) by the instrument, one unsteered pass for all;
        each kept in the store under its key (a digest of its parts' names), so a resume measures nothing twice."""
        cells = {key: cell_key(fluency=key) for key in settings}
        out = {key: Fluency.from_dict(self.store.get(cell)) for key, cell in cells.items()
               if self.store is not None and self.store.has(cell)}
        todo = {key: [Steering.single(v, a, layers, self.cfg.unit) for v, a, layers in steers]
                for key, steers in settings.items() if key not in out}
        if todo:
            measured = measure_fluency(self.target, generic_texts()[: self.cfg.n_fluency_texts], todo,
                                       check_model=False, seed=self.cfg.seed)
            for key, result in measured.items():
                if self.store is not None:
                    self.store.put(cells[key], result.to_dict())
                out[key] = result
        return out


Steer = tuple[ConceptVector, float, tuple[int, ...]]
"""One vector, its alpha and the target layers it is added at."""

Candidate = tuple[tuple[int, ...], float]
"""One grid point: the target layers steered and alpha."""


def steered(model: ModelHandle, steers: Sequence[Steer], unit: Unit) -> ContextManager[None]:
    """Every (vector, alpha, layers) transplanted at once (contexts add up); none for alpha 0."""
    return steer(model, [Steering.single(v, a, layers, unit) for v, a, layers in steers], check_model=False)


def candidates(cfg: Config, layers: tuple[int, ...]) -> list[Candidate]:
    """The grid: every alpha at the steered layers (each layer alone with ``layer_search``);
    alpha 0 once, as it steers nothing."""
    sets = [(layer,) for layer in layers] if cfg.layer_search else [layers]
    out: list[Candidate] = []
    for alpha in cfg.alphas:
        for s in sets if alpha != 0 else sets[:1]:
            out.append((s, float(alpha)))
    return out


def choose_under_bound(run: AlignmentRun, vec: ConceptVector, score: Callable[[Candidate], float], *,
                       key: Any, maximize: bool = True) -> tuple[Steer, dict[str, Any]]:
    """The best validation score among grid points within the fluency bound (ties: the weakest).

    Every point's KL to the unsteered model on generic text is measured first, in one call of the
    instrument (:meth:`AlignmentRun.fluency`, stored under ``key`` and the point); a point over
    ``kl_bound`` is never a candidate (:func:`~contrans_tl.tasks.selection.choose_within_bound`).
    After the choice every point whose model did not break down is scored on validation data too,
    so the record holds the frontier (validation score against KL).
    """
    cfg = run.cfg
    grid = candidates(cfg, run.layers)
    fluency = dict(zip(grid, run.fluency({(key, layers, alpha): [(vec, alpha, layers)] for layers, alpha in grid}).values()))
    (layers, alpha), points = choose_within_bound(grid, lambda point: fluency[point].kl, score, maximize=maximize,
                                                  limit=cfg.kl_bound, cost=weakest)
    frontier = [{"alpha": a, "layers": list(ls), "kl": _finite(fluency[(ls, a)].kl), "dce": _finite(fluency[(ls, a)].dce),
                 "allowed": p["allowed"], "validation_score": p["score"] if "score" in p
                 else (None if fluency[(ls, a)].broken else float(score((ls, a))))}
                for (ls, a), p in points.items()]
    chosen = fluency[(layers, alpha)]
    record = {"alpha": alpha, "layers": list(layers), "kl": _finite(chosen.kl), "kl_ci95": [_finite(x) for x in chosen.kl_ci95],
              "dce": _finite(chosen.dce), "kl_bound": cfg.kl_bound, "frontier": frontier}
    return (vec, alpha, layers), record


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def weakest(cand: Candidate) -> float:
    """Tie-break cost of a grid point: |alpha|, so equal scores go to the weakest intervention."""
    return abs(cand[1])


def data_path(cfg: Config, explicit: str | None, sub: str) -> str | None:
    """The path given for a data set, else ``data_dir/sub`` when it exists, else None."""
    if explicit:
        return explicit
    if cfg.data_dir and (Path(cfg.data_dir) / sub).exists():
        return str(Path(cfg.data_dir) / sub)
    return None


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The target layer at about two thirds of the depth."""
    return (min(n_layers - 1, max(0, round(2 * n_layers / 3) - 1)),)


def concept_vectors(
    run: AlignmentRun, contrast: Callable[[ModelHandle], tuple[list[str], list[str]]]
) -> dict[str, ConceptVector]:
    """The concept's vector per steered condition: ConTrans (refined in the source, mapped) and
    Self-Align (refined in the target or its sibling); ``contrast(model)`` gives the prompts."""
    cfg = run.cfg
    out: dict[str, ConceptVector] = {}
    if "transplant" in cfg.conditions and run.source is not None and run.amap is not None:
        with run.timed("refine_source"):
            vec = ct.refine(run.source, *contrast(run.source), batch_size=cfg.batch_size)
        out["transplant"] = run.amap.apply(vec)
    if "self-align" in cfg.conditions and run.self_model is not None:
        with run.timed("refine_self"):
            vec = ct.refine(run.self_model, *contrast(run.self_model), batch_size=cfg.batch_size)
        # a sibling's vector is carried over unchanged (same shape, checked); the target's own is kept as is
        out["self-align"] = vec if vec.model == ct.identity(run.target) else relabel(vec, run.target)
    return out


def perplexity_rows(run: AlignmentRun, rows: dict[str, Any], chosen: dict[str, list[Steer]], instruction: str) -> None:
    """WikiSplit perplexity of the target under each row's intervention (fold by fold: their
    mean), with a 95 % bootstrap interval over the sentences."""
    if not run.ppl_texts:
        return
    cfg = run.cfg

    def ppl(steers: Sequence[Steer] = (), prefix: str | None = None) -> PerplexityResult:
        with steered(run.target, steers, cfg.unit):
            return perplexity(run.target, run.ppl_texts, prefix=prefix, batch_size=cfg.batch_size,
                              progress=run.progress("perplexity"))

    def put(row: dict[str, Any], results: list[PerplexityResult]) -> None:
        row["ppl"] = sum(r.perplexity for r in results) / len(results)
        row["ppl_ci95"] = list(perplexity_interval(results, seed=cfg.seed))
        if len(results) > 1:
            row["ppl_per_fold"] = [r.perplexity for r in results]

    with run.timed("perplexity"):
        if "base" in rows:
            put(rows["base"], [ppl()])
        for cond, steers in chosen.items():
            put(rows[cond], [ppl([s]) for s in steers])
        if "inst-align" in rows:
            put(rows["inst-align"], [ppl(prefix=instruction)])
            rows["inst-align"]["ppl_note"] = "conditional on the instruction"
