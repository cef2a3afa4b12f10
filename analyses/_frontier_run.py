"""The frontier of one transfer run: every direction's accuracy against the KL it costs on generic text.

Stages, in the order a reviewer checks them:

1. **Validation** (choices only): the mapped vector of every concept at every alpha of the grid and
   every candidate layer, scored on validation items, with its KL measured on generic text
   (:func:`~contrans_tl.fluency.measure_fluency`). Per concept the operating alpha is the best
   validation score within the KL bound; the layer is the one whose operating points score best
   on average. No test item is scored before this choice is made.
2. **Test** (reported numbers), at the chosen layer: mapped and native vectors at every alpha;
   random directions (``n_random`` per concept, seeded by concept and seed, each scored at
   ``random_points`` alphas of a random grid centred where a random direction costs the KL bound)
   on every concept's items; the prompting baseline (the concept named in a preface, unsteered).
3. **Numbers**: frontier rows, transfer efficiency at equal KL with a bootstrap interval, and per
   concept paired tests on the same test items at the operating point (against the unsteered
   model, and against the random directions at the operating point's KL).

Every measurement is a cell (``fl__…``: the fluency of one steering; ``sc__…``: the choice scores
of one item set under one steering), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from contrans_tl.artifacts import ConceptVector
from contrans_tl.fluency import Fluency, measure_fluency
from contrans_tl.metrics import holm, mcnemar_p, paired_permutation_p, wilson_interval
from contrans_tl.sweep import cell_key
from contrans_tl.tasks.concept import ChoiceItem, ItemScores, item_scores, prompted_items
from contrans_tl.tasks.frontier import (Curve, Metric, Point, choose_operating_point, curve_at, geometric_grid,
                                        item_values, random_at, transfer_efficiency)
from contrans_tl.tasks.scoring import ChoiceLogprobs, choice_logprobs
from contrans_tl.transplant import Steering

from contrans_tl.analyses._transfer_run import ConceptRun, TransferRun, log, random_vector

__all__ = ["Direction", "Frontier", "RANDOM_PROBE_ALPHA", "FLUENCY_GROUP"]

RANDOM_PROBE_ALPHA = 0.01
"""Strength of the one random direction whose KL places the random grid (norm units)."""

FLUENCY_GROUP = 6
"""Steerings measured per fluency call (the unsteered pass is shared within a call; a kill loses at most one group)."""

Key = tuple[str, str, tuple[str, ...]]
"""An item as scored: (prefix, prompt, choices)."""


@dataclass(frozen=True)
class Direction:
    """One vector transplanted at some layers: mapped, native or random, made for (or seeded by) one concept."""

    condition: str
    concept: str
    layers: tuple[int, ...]
    vector: ConceptVector = field(compare=False, repr=False)
    seed: int | None = None

    @property
    def name(self) -> str:
        parts = dict(cond=self.condition, c=self.concept, layers="-".join(map(str, self.layers)))
        return cell_key(**parts, **({} if self.seed is None else {"seed": self.seed}))

    def steering(self, alpha: float) -> Steering:
        return Steering.single(self.vector, alpha, self.layers, "norm")


def _entries(c: ConceptRun, split: str) -> list[tuple[str, ChoiceItem]]:
    items = c.split.validation if split == "validation" else c.split.test
    return [(c.concept.prefix, it) for it in items]


def _key(prefix: str, it: ChoiceItem) -> Key:
    return (prefix, it.prompt, it.choices)


class Frontier:
    """The measurements of one run (cells in ``run.store``) and what is computed from them."""

    def __init__(self, run: TransferRun, mapped: dict[str, ConceptVector], native: dict[str, ConceptVector]) -> None:
        self.run, self.mapped, self.native = run, mapped, native
        self.metric: Metric = run.cfg.select_on  # type: ignore[assignment]
        self.concepts = {c.name: c for c in run.concepts}
        self.all_items = [e for c in run.concepts for split in ("validation", "test") for e in _entries(c, split)]
        self._fluency: dict[str, Fluency] = {}
        """Every fluency this run has read or measured, by cell name (each cell is read from disk once)."""
        self.broken: set[tuple[str, float]] = set()
        """(direction, alpha) whose steering made the model non-finite: in no curve, listed in the results."""

    # ---- cells ---------------------------------------------------------------------------------
    def fluency(self, todo: dict[str, Steering]) -> dict[str, Fluency]:
        """The fluency of every steering in ``todo`` (cell name → steering), measuring only the missing ones."""
        store = self.run.store
        done = {k: self._fluency[k] for k in todo if k in self._fluency}
        for k in todo:
            if k in done:
                continue
            try:
                cell = store.get(k)  # one read; a missing or corrupt cell is KeyError
            except KeyError:
                continue
            done[k] = Fluency.from_dict(cell)
            store.reused(k)
        missing = [k for k in todo if k not in done]
        for start in range(0, len(missing), FLUENCY_GROUP):
            group = missing[start : start + FLUENCY_GROUP]
            log(f"  fluency of {len(group)} steerings ({start + len(group)}/{len(missing)})")
            wall, cpu = time.perf_counter(), time.process_time()
            measured = measure_fluency(self.run.target, self.run.fluency_texts, {k: todo[k] for k in group},
                                       seed=self.run.cfg.seed, check_model=False)
            share = (time.perf_counter() - wall) / len(group), (time.process_time() - cpu) / len(group)
            for k, f in measured.items():  # the group's cost, shared evenly, so a resumed run can report it
                store.put(k, f.to_dict())
                store.record_time(k, *share)
                done[k] = f
        self._fluency.update(done)
        return done

    def scores(self, steering: Steering | None, name: str, entries: Sequence[tuple[str, ChoiceItem]]) -> dict[Key, Any]:
        """Choice log-probs and top token of each distinct item of ``entries`` under ``steering`` (one cell)."""
        keys = list(dict.fromkeys(_key(p, it) for p, it in entries))
        digest = hashlib.sha256(repr(keys).encode()).hexdigest()[:12]

        def compute(_: Any) -> dict[str, Any]:
            rows: dict[Key, Any] = {}
            for prefix in dict.fromkeys(k[0] for k in keys):
                group = [k for k in keys if k[0] == prefix]
                ctx = steering.apply(self.run.target, check_model=False) if steering is not None else nullcontext()
                with ctx:
                    got = choice_logprobs(self.run.target, [k[1] for k in group], [list(k[2]) for k in group],
                                          prefix=prefix or None, batch_size=self.run.cfg.batch_size)
                for k, lp, first, top in zip(group, got.logprobs, got.first_tokens, got.top):
                    rows[k] = [list(lp), list(first), top]
            return {"digest": digest, "rows": [rows[k] for k in keys]}

        cell = self.run.store.run({f"sc__{name}": None}, compute)[f"sc__{name}"]
        if cell.get("digest") != digest:  # the items changed under a reused name: recompute
            self.run.store.put(f"sc__{name}", compute(None))
            cell = self.run.store.get(f"sc__{name}")
        return {k: row for k, row in zip(keys, cell["rows"])}

    @staticmethod
    def outcomes(table: dict[Key, Any], entries: Sequence[tuple[str, ChoiceItem]]) -> ItemScores:
        """Each item's Logit and Token outcome from a scores table."""
        rows = [table[_key(p, it)] for p, it in entries]
        scored = ChoiceLogprobs(tuple(tuple(r[0]) for r in rows), tuple(tuple(r[1]) for r in rows),
                                tuple(() for _ in rows), tuple(int(r[2]) for r in rows))
        return item_scores([it for _, it in entries], scored)

    # ---- measuring directions -------------------------------------------------------------------
    def measure(self, plan: Sequence[tuple[Direction, Sequence[float]]], split: str, *,
                item_set: str | None = None) -> list[dict[str, list[Point]]]:
        """Per direction and concept, the direction's points at its alphas on ``split`` items: KL and outcomes.

        Mapped and native directions are scored on their own concept's items; random ones
        (``item_set="all"``) on every concept's validation and test items at once. The fluency of
        every steering is measured first, in shared calls (one unsteered pass per group).
        """
        flu = self.fluency({cell_key(fl=d.name, alpha=a): d.steering(a) for d, alphas in plan for a in alphas})
        out = []
        for direction, alphas in plan:
            concepts = [direction.concept] if item_set is None else list(self.concepts)
            entries = self.all_items if item_set == "all" else _entries(self.concepts[direction.concept], split)
            got: dict[str, list[Point]] = {c: [] for c in concepts}
            for a in alphas:
                if flu[cell_key(fl=direction.name, alpha=a)].broken:  # the model broke down: nothing to score
                    self.broken.add((direction.name, float(a)))
                    continue
                table = self.scores(direction.steering(a), cell_key(d=direction.name, alpha=a, items=item_set or split),
                                    entries)
                for c in concepts:
                    got[c].append(Point(float(a), flu[cell_key(fl=direction.name, alpha=a)].kl,
                                        self.outcomes(table, _entries(self.concepts[c], split))))
            out.append(got)
        return out

    def item_ids(self, split: str) -> dict[str, list[Key]]:
        """Per concept, an id for each of its ``split`` items; concepts that score the same prompt share its id."""
        return {c: [_key(p, it)[:2] for p, it in _entries(cr, split)] for c, cr in self.concepts.items()}

    def baseline(self, split: str) -> dict[str, ItemScores]:
        """The unsteered outcomes of every concept's ``split`` items (one cell per split for all concepts)."""
        table = self.scores(None, f"baseline__items={split}", [e for c in self.concepts.values() for e in _entries(c, split)])
        return {c: self.outcomes(table, _entries(self.concepts[c], split)) for c in self.concepts}

    def direction(self, condition: str, concept: str, layers: tuple[int, ...], seed: int | None = None) -> Direction:
        """The mapped or native vector of ``concept``, or its random direction number ``seed`` (seeded also by the
        run's seed, so another ``--seed`` draws other directions)."""
        if condition == "random":
            vector = random_vector(self.mapped[concept], concept, self.run.cfg.seed * 1_000_003 + (seed or 0))
        else:
            vector = {"mapped": self.mapped, "native": self.native}[condition][concept]
        return Direction(condition, concept, layers, vector, seed)

    # ---- stage 1: validation --------------------------------------------------------------------
    def choose(self) -> dict[str, Any]:
        """The operating point, chosen on validation items only: the layer, and per concept its alpha."""
        cfg, base = self.run.cfg, self.baseline("validation")
        per_layer: dict[str, Any] = {}
        for layers in self.run.layer_sets():
            ops = {}
            measured = self.measure([(self.direction("mapped", c, layers), cfg.alphas) for c in self.concepts], "validation")
            for c, got in zip(self.concepts, measured):
                ops[c] = choose_operating_point(got[c], base[c], kl_bound=cfg.kl_bound, metric=self.metric)
            mean = sum(op["validation_score"] for op in ops.values()) / len(ops)
            per_layer["-".join(map(str, layers))] = {"layers": list(layers), "mean_validation_score": mean, "concepts": ops}
            log(f"  layers {list(layers)}: mean validation {self.metric} {mean:.3f} within KL {cfg.kl_bound}")
        best = max(per_layer.values(), key=lambda r: r["mean_validation_score"])  # ties: the first listed
        return {"how": f"per concept, the alpha with the best validation {self.metric} score among those whose KL on "
                       f"generic text is <= {cfg.kl_bound} nats/token (ties: the weaker alpha); the layer whose "
                       "operating points score best on average. Validation items only.",
                "kl_bound": cfg.kl_bound, "metric": self.metric, "layers": best["layers"], "per_layer": per_layer}

    # ---- stage 2: test --------------------------------------------------------------------------
    def random_grid(self, layers: tuple[int, ...]) -> dict[str, Any]:
        """The random directions' grid: as many alphas as the concept grid, ratio 1.5, centred on the alpha
        where one probe direction's KL reaches the bound (KL grows about as alpha²)."""
        first = next(iter(self.concepts))
        probe = Direction("random-probe", first, layers, random_vector(self.mapped[first], f"{first}-probe", self.run.cfg.seed))
        kl = self.fluency({cell_key(fl=probe.name, alpha=RANDOM_PROBE_ALPHA): probe.steering(RANDOM_PROBE_ALPHA)})
        probe_kl = next(iter(kl.values())).kl
        centre = RANDOM_PROBE_ALPHA * math.sqrt(self.run.cfg.kl_bound / probe_kl) if 0 < probe_kl < math.inf \
            else RANDOM_PROBE_ALPHA
        n = len(self.run.cfg.alphas)
        grid = geometric_grid(centre / 1.5 ** (n // 2), 1.5, n)
        return {"alphas": list(grid), "probe": {"alpha": RANDOM_PROBE_ALPHA, "kl": probe_kl}}

    def random_points(self, layers: tuple[int, ...], grid: Sequence[float], split: str) -> tuple[dict[str, list[Point]], list[dict[str, Any]]]:
        """Every random direction's points on every concept's ``split`` items, and the rows naming them."""
        cfg = self.run.cfg
        pooled: dict[str, list[Point]] = {c: [] for c in self.concepts}
        rows: list[dict[str, Any]] = []
        plan = [(self.direction("random", c, layers, s),
                 [grid[(s + j * len(grid) // cfg.random_points) % len(grid)] for j in range(cfg.random_points)])
                for c in self.concepts for s in range(cfg.n_random)]
        for (d, _), got in zip(plan, self.measure(plan, split, item_set="all")):
            for target, pts in got.items():
                pooled[target] += pts
                rows += [{"direction": f"{d.concept}/{d.seed}", "seeded_by": d.concept, "seed": d.seed, "target": target,
                          "point": p} for p in pts]
        return pooled, rows

    def prompting(self) -> dict[str, ItemScores]:
        """The prompting baseline on test items: the concept's instruction before each prompt, unsteered."""
        out = {}
        for c, cr in self.concepts.items():
            if cr.concept.instruction is None:
                continue
            entries = [(cr.concept.prefix, it) for it in prompted_items(cr.split.test, cr.concept.instruction)]
            out[c] = self.outcomes(self.scores(None, cell_key(prompting=c, items="test"), entries), entries)
        return out


# ---- stage 3: numbers ---------------------------------------------------------------------------
def mean_ci(values: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95 % interval of a mean over items."""
    if len(values) == 0:
        return [math.nan, math.nan]
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    return [float(x) for x in np.percentile(values[idx].mean(1), [2.5, 97.5])]


def row(concept: str, condition: str, split: str, alpha: float, scores: ItemScores, flu: Fluency | None,
        **extra: Any) -> dict[str, Any]:
    """One frontier row (results.json → frontier)."""
    out: dict[str, Any] = {"concept": concept, "condition": condition, **extra, "alpha": alpha,
                           "kl": None if flu is None else (flu.kl if math.isfinite(flu.kl) else None),
                           "dce": None if flu is None else (flu.dce if math.isfinite(flu.dce) else None),
                           "logit_acc": scores.logit_acc, "token_acc": scores.token_acc, "n": scores.n, "split": split}
    if flu is not None:
        out["kl_ci95"] = [x if math.isfinite(x) else None for x in flu.kl_ci95]
        out["broken"] = flu.broken
    return out


def accuracy_cell(scores: ItemScores) -> dict[str, Any]:
    """Token and Logit Acc with Wilson intervals (the table at the operating point)."""
    return {"token_acc": scores.token_acc, "token_ci95": list(wilson_interval(sum(scores.token), scores.n)),
            "logit_acc": scores.logit_acc, "logit_ci95": list(wilson_interval(sum(scores.logit), scores.n)),
            "n": scores.n}


def paired_tests(mapped: dict[str, ItemScores], base: dict[str, ItemScores], random: dict[str, tuple[np.ndarray, int]],
                 metric: Metric, seed: int) -> dict[str, dict[str, Any]]:
    """Per concept, on the same test items at the operating point: sign-flip permutation p-values of the per-item
    score against the unsteered model and against the random directions at the operating KL (Holm-adjusted over
    concepts), and the exact McNemar p of Logit Acc against the unsteered model."""
    out: dict[str, dict[str, Any]] = {}
    for c, m in mapped.items():
        mv, bv = item_values(m, metric), item_values(base[c], metric)
        rv, n_random = random[c]
        out[c] = {"metric": metric, "mapped": float(mv.mean()), "baseline": float(bv.mean()),
                  "vs_baseline_p": paired_permutation_p(mv, bv, seed=seed),
                  "vs_baseline_mcnemar_logit_p": mcnemar_p(m.logit, base[c].logit),
                  "random": float(rv.mean()) if n_random else None, "random_points": n_random,
                  "vs_random_p": paired_permutation_p(mv, rv, seed=seed) if n_random else None}
    for test in ("vs_baseline_p", "vs_random_p"):
        names = [c for c in out if out[c][test] is not None]
        for c, adj in zip(names, holm([out[c][test] for c in names])):
            out[c][test.replace("_p", "_p_holm")] = adj
    return out


def efficiency(base: dict[str, ItemScores], mapped: dict[str, list[Point]], native: dict[str, list[Point]],
               kl_range: tuple[float, float], seed: int, item_ids: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """Transfer efficiency for each metric ("both" first: the value reported), from the curves of one split;
    ``item_ids`` (:meth:`Frontier.item_ids`) make the bootstrap draw a prompt shared by several concepts once."""
    pairs = {c: (Curve(base[c], tuple(mapped[c])), Curve(base[c], tuple(native[c]))) for c in mapped}
    out = transfer_efficiency(pairs, kl_range, metric="both", seed=seed, item_ids=item_ids)
    out["by_metric"] = {m: {k: v for k, v in transfer_efficiency(pairs, kl_range, metric=m, seed=seed,
                                                                 item_ids=item_ids).items()
                            if k in ("value", "ci95")} for m in ("logit", "token")}
    return out


def native_at(native: list[Point], base: ItemScores, kl: float, metric: Metric) -> float | None:
    """The native curve read at ``kl`` (None past its last point)."""
    value = curve_at(Curve(base, tuple(native)), [kl], metric)[0]
    return None if np.isnan(value) else float(value)


def random_scores(pooled: dict[str, list[Point]], op: dict[str, dict[str, Any]], metric: Metric) -> dict[str, tuple[np.ndarray, int]]:
    """Per concept, the random directions' per-item scores at its operating KL (:func:`random_at`)."""
    return {c: random_at(pooled[c], op[c]["kl"], metric=metric) if op[c]["kl"] > 0 else (np.array([]), 0) for c in op}
