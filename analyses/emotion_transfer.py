"""The paper's emotion transplantation (§4, Fig 2a/2b, Fig 5, Fig 7/8) for any source → target pair.

Refine one vector per emotion in the source, reformulate it through an affine map fitted on
neutral text, transplant it into the target at one layer and measure how often the target
answers the transplanted emotion on scenarios of the *other* emotions (negatives), with the
few-shot evaluation prompt. Controls: alpha = 0 (baseline), random vectors of the same
per-layer norm (several seeds), and the target's own natively refined vector (skyline).
The transplant layer and alpha are chosen on the refinement half, never on evaluation data.
Prompts, splits and scoring are the emotion task's (:class:`contrans_tl.tasks.emotion.EmotionTask`).

    python -m contrans_tl.analyses.emotion_transfer --out out/emotion            # the default offline pair
    python -m contrans_tl.analyses.emotion_transfer --quick --out out/quick      # a smoke run
    python -m contrans_tl.analyses.emotion_transfer --source mistralai/Mistral-7B-Instruct-v0.2 \\
        --target meta-llama/Llama-2-13b-hf --out out/mistral-llama   # hub models
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

import contrans_tl as ct
from contrans_tl import validate
from contrans_tl.analyses import _common as cm
from contrans_tl.analyses._emotion_outputs import confusion, goals, headline, measurability, plot, summary_markdown
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.capture import capture, check_layers
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import InvalidArgumentError, NonFiniteError
from contrans_tl.files import atomic_path, atomic_write_text, write_json
from contrans_tl.handle import ModelHandle
from contrans_tl.metrics import layer_cosine
from contrans_tl.reformulate import capture_pair, default_layer_pairs, fit_map_from_states
from contrans_tl.sweep import CellStore, cell_key, run_option, settings_fingerprint
from contrans_tl.tasks.emotion import EMOTIONS, QUERY, Answers, EmotionTask, emotion_task
from contrans_tl.tasks.perplexity import perplexity
from contrans_tl.tasks.selection import choose_within_bound
from contrans_tl.transplant import Unit

__all__ = ["Config", "QUICK", "run", "plot", "add_args", "config_from_args", "run_cli", "main"]

QUICK: dict[str, Any] = {"alphas": (0.0, 0.05, 0.3), "candidate_depths": (0.67, 0.9), "n_negatives": 2, "n_positives": 4,
                         "n_validation": 1, "n_refine": 8, "n_examples": (5, 0), "random_seeds": 1, "n_alignment": 120, "n_guard": 4}
"""``--quick``: alphas 0 / 0.05 / 0.3, 2 candidate layers, few scenarios, 4 guard sentences, 1 random seed (replaces the flags' values)."""


@dataclass
class Config:
    """Settings of one emotion-transfer run (each field is a command-line flag)."""

    source: str = "smollm2-135m-instruct"
    """Source model (aligned/instruct): built-in offline name, hub id, local dir or .gguf."""
    target: str = "gemma-3-270m"
    """Target model (the one that receives the concept)."""
    out: str = run_option("out/emotion")
    """Output directory: results.json, summary.md, figures/, artifacts/, cells/ (resumable)."""
    data_dir: str | None = None
    """Directory of {emotion}.json scenario lists (default: the built-in set)."""
    emotions: tuple[str, ...] = EMOTIONS
    """Emotions steered (negatives always come from all the other five)."""
    alphas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    """Strength grid (includes 0, the baseline), in ``unit``s; fine below 0.2, where the fluency bound falls."""
    unit: Unit = "norm"
    """"norm": alpha is a fraction of the target layer's mean residual norm; "raw": alpha·v."""
    layers: tuple[int, ...] | None = None
    """Target layer(s) to transplant into; None chooses one on the refinement half."""
    candidate_depths: tuple[float, ...] = (0.5, 0.67, 0.83, 0.9)
    """Relative depths of the target layers tried when ``layers`` is None."""
    n_negatives: int = 10
    """Evaluation scenarios per *other* emotion (negatives of emotion e: 5 × this many)."""
    n_positives: int = 20
    """Evaluation scenarios of the emotion itself."""
    n_refine: int = 0
    """Refinement scenarios per side for the main vectors (0 = the whole refinement half)."""
    n_validation: int = 3
    """Refinement-half scenarios per other emotion used to choose layer and alpha."""
    n_examples: tuple[int, ...] = (10, 20, 50, 0)
    """Refinement sizes for Fig 5 (0 = all available; sizes above the half are capped)."""
    random_seeds: int = 3
    """Random controls per emotion (mapped vector's per-layer norm) at the chosen alpha; one also at every alpha."""
    n_alignment: int = 380
    """Neutral sentences used to fit the affine map (the first ones; the last ``n_guard`` are kept out)."""
    n_guard: int = 10
    """Built-in neutral sentences held out of the map: the fluency bound's perplexity is measured on them
    (each pass scores Gemma's 262k-word vocabulary at every position, so they are few)."""
    max_ppl_ratio: float = 1.2
    """Fluency bound: a (layer, alpha) is eligible only if every mapped vector keeps the guard
    sentences' perplexity within this factor of the unsteered target's."""
    select_on: str = "both"
    """Validation score of the layer/alpha choice: "both" (mean of Token and Logit Acc), "token" or "logit"."""
    outlier_factor: float = 10.0
    """Samples whose norm passes this factor x the layer median are left out of the map fit (0 keeps all)."""
    batch_size: int = run_option(16)
    """Prompts per forward batch."""
    seed: int = 0
    """Seed of the scenario split, the contrast negatives and the map's held-out split."""
    device: str | None = run_option(None)
    """Device of both models (None: the library's default)."""
    quick: bool = False
    """Smoke-test sizes (:data:`QUICK`) for every size field still at its default and not in ``explicit``."""
    extra: dict[str, Any] = run_option(factory=dict)
    """Free-form notes kept in results.json (not part of the cell settings)."""
    explicit: tuple[str, ...] = run_option(())
    """Fields the user set on the command line: ``quick`` never replaces them."""

    def __post_init__(self) -> None:
        validate.choice("unit", self.unit, ("norm", "raw"))
        validate.choice("select_on", self.select_on, SELECT_ON)
        if not any(a > 0 for a in self.alphas):
            raise InvalidArgumentError("alphas", self.alphas, "a grid with at least one alpha > 0 (0 is the baseline)")
        if not self.max_ppl_ratio >= 1:
            raise InvalidArgumentError("max_ppl_ratio", self.max_ppl_ratio, "a factor >= 1 (1.2: 20 % above the base)")
        if not self.outlier_factor >= 0:  # checked here too, so no model is loaded for a bad flag
            raise InvalidArgumentError("outlier_factor", self.outlier_factor, "a factor >= 0 (0 keeps every sample)")
        n = len(neutral_sentences())
        if self.n_guard < 1 or self.n_alignment + self.n_guard > n:
            raise InvalidArgumentError("n_alignment, n_guard", (self.n_alignment, self.n_guard),
                                       f"n_guard >= 1 and n_alignment + n_guard <= the {n} built-in neutral sentences "
                                       "(the guard sentences are held out of the map)")

    def effective(self) -> Config:
        """The config with ``quick`` applied to the size fields the user left at their defaults."""
        if not self.quick:
            return self
        defaults = Config()
        keep = set(self.explicit) | {k for k in QUICK if getattr(self, k) != getattr(defaults, k)}
        return dataclasses.replace(self, **{k: v for k, v in QUICK.items() if k not in keep})


def _log(msg: str) -> None:
    print(f"[emotion {time.strftime('%H:%M:%S')}] {msg}", flush=True)


SELECT_ON = ("both", "token", "logit")
"""What the validation grid maximizes: mean of Token and Logit Acc, or one of them."""

GOALS = {"margin": 0.10, "causal_ratio": 0.8, "mean_token_acc": 0.5}
"""The transfer targets the demo reports against (issue #14 item 5): every emotion >= ``margin``
above both the baseline and the random control, causal ratio and mean Token Acc at the chosen alpha."""

NORM_REFERENCE = "target's mean resid_post norm at the last token of every refinement prompt"
"""Where the demo's alpha unit comes from (one value per target layer, shared by every condition)."""


PROTOCOL = ("3: one alpha unit for every condition; map at the candidate layers without outlier samples, guard "
            "sentences held out; label counts per cell; Token and Logit Acc in validation cells")
"""The evaluation protocol of the cells: part of their settings, so a folder from another protocol is refused."""


@dataclass
class _Run:
    """What the steps of one run share: settings, the task's prompts, both models, the cells and artifacts."""

    cfg: Config
    task: EmotionTask
    source: ModelHandle
    target: ModelHandle
    store: CellStore
    art: Path
    phases: cm.PhaseTimes
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per model (by ``id``): resid_post of every refinement prompt, captured once."""
    baseline: Answers | None = None
    """The target's unsteered answers to every held-out scenario, computed once for all emotions."""
    reference: torch.Tensor | None = None
    """:meth:`reference_norms`, once read or measured."""
    guard_ppl: float | None = None
    """:meth:`guard_base`, once read or measured."""

    def score(self, vector: ConceptVector | None, emotion: str, layers: Sequence[int], alpha: float,
              scenarios: list[str]) -> dict[str, Any]:
        """Token/Logit Acc of the target answering ``emotion`` on ``scenarios`` with ``vector`` at ``alpha``."""
        return self.task.score(self.target, emotion, scenarios, vector=vector, alpha=alpha, layers=layers,
                               unit=self.cfg.unit, batch_size=self.cfg.batch_size)

    def baseline_score(self, emotion: str, scenarios: list[str]) -> dict[str, Any]:
        """The unsteered score, read from the answers every emotion's baseline shares."""
        if self.baseline is None:
            held_out = [s for e in EMOTIONS if e in self.task.eval_scenarios
                        for s in self.task.eval_scenarios[e][: max(self.cfg.n_positives, self.cfg.n_negatives)]]
            self.baseline = self.task.answer(self.target, list(dict.fromkeys(held_out)), batch_size=self.cfg.batch_size)
        return self.baseline.subset(scenarios).accuracy(emotion)

    def vector(self, model: ModelHandle, kind: str, emotion: str, n: int | None = None) -> ConceptVector:
        """``emotion``'s vector refined in ``model`` from ``n`` contrast pairs (None: ``n_refine``), kept in artifacts/.

        Every refinement prompt is captured once per model (all emotions' contrasts and the Fig 5
        sizes draw from the same refinement half); each vector is a mean difference of those states.
        """
        path = self.art / f"{kind}_{emotion}{'' if n is None else f'_n{n}'}.safetensors"
        if path.is_file():
            self.store.reused(f"artifact-{path.stem}")
            return ConceptVector.load(path)
        with self.phases.record(f"artifact-{path.stem}"):
            pos, neg = self.task.contrast(emotion, n)
            cached = self.refinement_states(model)
            v = ct.concept_from_states(model, torch.stack([cached[p] for p in pos]),
                                       torch.stack([cached[p] for p in neg]))
            v.save(path)
        return v

    def in_reference_unit(self, vector: ConceptVector) -> ConceptVector:
        """``vector`` with alpha read against :meth:`reference_norms` (recorded in its provenance)."""
        return cm.with_norms(vector, self.reference_norms(), NORM_REFERENCE)

    def refinement_states(self, model: ModelHandle) -> dict[str, torch.Tensor]:
        """resid_post of every refinement prompt in ``model`` (all emotions' contrasts draw from them), captured once."""
        if id(model) not in self.states:
            prompts = list(dict.fromkeys(QUERY.format(s) for items in self.task.refine_scenarios.values()
                                         for s in items))
            self.states[id(model)] = dict(zip(prompts, capture(model, prompts, batch_size=self.cfg.batch_size)))
        return self.states[id(model)]

    def guard_ratios(self, items: dict[str, tuple[ConceptVector, Sequence[int], float]]) -> dict[str, float]:
        """Perplexity of the guard sentences (held out of the map) with each item's vector transplanted,
        over the unsteered target's: the fluency cost of a setting, kept as cells."""
        base = self.guard_base()
        return {k: float("inf") if v is None else v / base for k, v in self.store.run(items, self._guard_ppl).items()}

    def guard_base(self) -> float:
        """The unsteered target's perplexity on the guard sentences (a cell, read once)."""
        if self.guard_ppl is None:
            self.guard_ppl = float(self.store.run({"guard__base": None}, self._guard_ppl)["guard__base"])
        return self.guard_ppl

    def _guard_ppl(self, item: tuple[ConceptVector, Sequence[int], float] | None) -> float | None:
        """Perplexity of the last ``n_guard`` built-in neutral sentences, unsteered (None) or with the
        item's vector transplanted; None when the steered model breaks down (non-finite scores)."""
        texts = neutral_sentences()[-self.cfg.n_guard:]
        if item is None:
            return perplexity(self.target, texts, batch_size=self.cfg.batch_size).perplexity
        vector, layers, alpha = item
        with ct.transplant(self.target, vector, alpha=alpha, layers=list(layers), unit=self.cfg.unit):
            try:
                return perplexity(self.target, texts, batch_size=self.cfg.batch_size).perplexity
            except NonFiniteError:  # stored as null, read as infinitely over the bound
                return None

    def reference_norms(self) -> torch.Tensor:
        """Alpha's one norm unit per target layer, for mapped, native and random vectors alike: the
        target's mean resid_post norm at the last token of every refinement prompt (kept in artifacts/)."""
        if self.reference is None:
            path = self.art / "reference_norms.json"
            if path.is_file():
                self.reference = torch.tensor(json.loads(path.read_text())["norms"])
            else:
                states = torch.stack(list(self.refinement_states(self.target).values()))
                self.reference = states.norm(dim=-1).mean(0)
                write_json(path, {"norms": self.reference.tolist(), "what": NORM_REFERENCE, "n_prompts": len(states)})
        return self.reference


def _layers_key(layers: Sequence[int]) -> str:
    return "-".join(map(str, layers))


def _random_like(v: ConceptVector, seed: int) -> ConceptVector:
    """Gaussian noise with ``v``'s per-layer norms (the random control)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(v.vectors.shape, generator=g)
    noise = noise / noise.norm(dim=-1, keepdim=True) * v.vectors.norm(dim=-1, keepdim=True)
    return ConceptVector(noise, v.model, v.layers, "random", v.layer_norms, n_prompts=0,
                         provenance={"seed": seed, "matched_to": "mapped"})


# ---- the steps of run() ------------------------------------------------------------------------
def _candidate_layers(r: _Run) -> list[int]:
    """Target layers the run may transplant into: ``layers`` if given, else one per candidate depth."""
    if r.cfg.layers is not None:
        return sorted(set(check_layers(r.target, r.cfg.layers)))
    n_tgt = int(r.target.cfg.n_layers)
    return sorted({cm.layer_at_depth(n_tgt, d) for d in r.cfg.candidate_depths})


def _fit_or_load_map(r: _Run) -> AffineMap:
    """Step 2 first: one map source → target for all emotions (kept under artifacts/)."""
    map_path = r.art / "map.safetensors"
    if map_path.is_file():
        for part in ("corpus", "fit"):
            with r.phases.phase(f"map: {part}"):
                r.store.reused(f"artifact-map-{part}")
        return AffineMap.load(map_path)
    texts = neutral_sentences()[: r.cfg.n_alignment]  # the guard sentences (the last n_guard) stay out
    steerable = set(_candidate_layers(r))  # the layers the run may transplant into: no other pair is used
    pairs = [(s, t) for s, t in default_layer_pairs(int(r.source.cfg.n_layers), int(r.target.cfg.n_layers))
             if t in steerable]
    _log(f"fitting the affine map on {r.cfg.n_alignment} neutral sentences, target layers {sorted(steerable)}")
    with r.phases.phase("map: corpus"), r.phases.record("artifact-map-corpus"):
        xs, ys = capture_pair(r.source, r.target, texts, sorted({s for s, _ in pairs}), sorted({t for _, t in pairs}),
                              batch_size=r.cfg.batch_size, progress=True)
    with r.phases.phase("map: fit"), r.phases.record("artifact-map-fit"):
        amap = fit_map_from_states(xs, ys, layers=pairs, seed=r.cfg.seed, outlier_factor=r.cfg.outlier_factor)
    amap.save(map_path)
    return amap



def _refine_vectors(r: _Run, amap: AffineMap) -> tuple[dict[str, ConceptVector], dict[str, ConceptVector]]:
    """Step 1: each emotion refined in the source (then mapped) and natively in the target."""
    _log("refining emotion vectors in source and target")
    n_main = r.task.n_refine
    source_vecs = {e: r.vector(r.source, "source", e, n_main) for e in r.cfg.emotions}
    native_vecs = {e: r.vector(r.target, "native", e, n_main) for e in r.cfg.emotions}
    # one alpha unit for both: the native vector is not pushed harder than the mapped one at the same alpha
    native_vecs = {e: r.in_reference_unit(v) for e, v in native_vecs.items()}
    mapped_vecs = {e: r.in_reference_unit(amap.apply(source_vecs[e])) for e in r.cfg.emotions}
    return mapped_vecs, native_vecs


def _guard_key(e: str, cond: str, layers: Sequence[int], alpha: float) -> str:
    return cell_key(phase="guard", emotion=e, cond=cond, layers=_layers_key(layers), alpha=alpha)


def _choose_layer_and_alpha(r: _Run, mapped: dict[str, ConceptVector]) -> tuple[list[int], float, dict[str, Any]]:
    """Layer and alpha with the best validation score of the mapped vectors on refinement-half
    negatives, among the points where every mapped vector stays within the fluency bound."""
    cfg, emotions = r.cfg, list(r.cfg.emotions)
    layer_sets = [tuple(cfg.layers)] if cfg.layers is not None else [(layer,) for layer in _candidate_layers(r)]
    points = [(ls, float(a)) for ls in layer_sets for a in sorted(cfg.alphas) if a > 0]
    metrics = {"both": ("token_acc", "logit_acc"), "token": ("token_acc",), "logit": ("logit_acc",)}[cfg.select_on]
    _log(f"choosing the layer among {[list(ls) for ls in layer_sets]} and alpha among {cfg.alphas} on validation "
         f"scenarios, within perplexity {cfg.max_ppl_ratio} x the unsteered target's")

    def validate(point: tuple[tuple[int, ...], float]) -> dict[str, dict[str, float]]:
        """Token and Logit Acc of every mapped vector on refinement-half negatives (never the test half)."""
        layers, alpha = point
        return {e: {m: acc[m] for m in ("token_acc", "logit_acc")}
                for e in emotions
                for acc in [r.score(mapped[e], e, layers, alpha, r.task.negatives(e, held_out=False, k=cfg.n_validation))]}

    broken: dict[tuple[int, ...], float] = {}
    """Per layer set, the weakest alpha over the bound: stronger ones are not measured (perplexity
    grows with alpha), recorded as skipped."""
    skipped: set[tuple[tuple[int, ...], float]] = set()
    means: dict[tuple[tuple[int, ...], float], dict[str, float]] = {}
    """Per scored point, the mean Token and Logit Acc over emotions (for the grid record)."""

    def guard(point: tuple[tuple[int, ...], float]) -> float:
        layers, alpha = point
        if alpha > broken.get(layers, float("inf")):
            skipped.add(point)
            return float("inf")
        worst = max(r.guard_ratios({_guard_key(e, "mapped", layers, alpha): (mapped[e], layers, alpha)
                                    for e in emotions}).values())
        if worst > cfg.max_ppl_ratio:
            broken[layers] = min(alpha, broken.get(layers, float("inf")))
            _log(f"  layers {list(layers)} alpha {alpha:g}: perplexity x{worst:.2f}, over the bound (stronger alphas skipped)")
        return worst

    def score(point: tuple[tuple[int, ...], float]) -> float:
        layers, alpha = point
        val = next(iter(r.store.run({cell_key(phase="val", layer=_layers_key(layers), alpha=alpha): point},
                                    validate).values()))
        means[point] = {m: sum(v[m] for v in val.values()) / len(val) for m in ("token_acc", "logit_acc")}
        mean = sum(means[point][m] for m in metrics) / len(metrics)
        _log(f"  layers {list(layers)} alpha {alpha:g}: validation {cfg.select_on} {mean:.3f}")
        return mean

    try:
        (layers_t, alpha), record = choose_within_bound(points, guard, score, limit=cfg.max_ppl_ratio, cost=lambda p: p[1])
    except InvalidArgumentError:
        raise InvalidArgumentError("alphas", cfg.alphas, f"a grid with an alpha weak enough to keep every mapped vector "
                                   f"within perplexity {cfg.max_ppl_ratio} x the unsteered target's at some candidate "
                                   "layer (add a smaller alpha, or raise --max-ppl-ratio)") from None
    layers = list(layers_t)
    grid: dict[str, Any] = {}
    for (ls, a), rec in record.items():
        row: dict[str, Any] = {"max_ppl_ratio": rec["guard"], "allowed": rec["allowed"]}  # inf: broke down (null)
        if (ls, a) in skipped:
            row.update(max_ppl_ratio=None, skipped="not measured: a weaker alpha at these layers already exceeded the bound")
        if rec["allowed"]:
            row.update(score=rec["score"], **means[(ls, a)])
        grid[f"{_layers_key(ls)}:{a:g}"] = row
    selection: dict[str, Any] = {
        "how": ("given layers; " if cfg.layers is not None else "") +
               f"best mean {' + '.join(metrics)} of mapped vectors on refinement-half negatives ({cfg.n_validation} "
               f"per other emotion), among (layer, alpha) points where every mapped vector keeps the guard "
               f"sentences' perplexity within {cfg.max_ppl_ratio} x the unsteered target's",
        "select_on": cfg.select_on, "max_ppl_ratio": cfg.max_ppl_ratio, "grid": grid, "layers": layers, "alpha": alpha,
    }
    _log(f"transplanting at target layer(s) {layers}, validation-chosen alpha {alpha:g} ({cfg.unit})")
    return layers, alpha, selection


def _fluency(r: _Run, mapped: dict[str, ConceptVector], native: dict[str, ConceptVector], layers: list[int],
             alpha: float) -> dict[str, Any]:
    """Guard perplexity ratios: the mapped vectors at every alpha of the chosen layers, the native
    vector and a random control at the chosen alpha; and greedy sample continuations there."""
    items = {}
    for e in r.cfg.emotions:
        for a in r.cfg.alphas:
            if a > 0:
                items[_guard_key(e, "mapped", layers, a)] = (mapped[e], layers, float(a))
        items[_guard_key(e, "native", layers, alpha)] = (native[e], layers, alpha)
        items[_guard_key(e, "random", layers, alpha)] = (_random_like(mapped[e], 1000), layers, alpha)
    ratios = r.guard_ratios(items)
    return {
        "what": f"perplexity of the last {r.cfg.n_guard} built-in neutral sentences (held out of the map) "
                "over the unsteered target's",
        "base_ppl": r.guard_base(),
        "max_ppl_ratio": r.cfg.max_ppl_ratio,
        "mapped": {e: {f"{a:g}": ratios[_guard_key(e, "mapped", layers, a)] for a in r.cfg.alphas if a > 0}
                   for e in r.cfg.emotions},
        "native": {e: ratios[_guard_key(e, "native", layers, alpha)] for e in r.cfg.emotions},
        "random": {e: ratios[_guard_key(e, "random", layers, alpha)] for e in r.cfg.emotions},
    }


SAMPLE_TOKENS = 12
"""New tokens of each sample continuation."""


def _samples(r: _Run, mapped: dict[str, ConceptVector], layers: list[int], alpha: float) -> dict[str, Any]:
    """Greedy continuations at the chosen setting, unsteered and with each emotion transplanted: the
    first held-out negative's evaluation prompt (what the model says, not only which label wins) and
    the start of a guard sentence (does it still write ordinary text)."""
    opener = " ".join(neutral_sentences()[-r.cfg.n_guard].split()[:6])

    def prompts(e: str) -> list[str]:
        return [r.task.prefix + QUERY.format(r.task.negatives(e, held_out=True, k=1)[0]), opener]

    def write(arg: tuple[str, str | None]) -> list[str]:
        e, steer = arg
        if steer is None:
            return ct.generate(r.target, prompts(e), max_new_tokens=SAMPLE_TOKENS)
        with ct.transplant(r.target, mapped[e], alpha=alpha, layers=layers, unit=r.cfg.unit):
            return ct.generate(r.target, prompts(e), max_new_tokens=SAMPLE_TOKENS)

    cells = {cell_key(phase="samples", emotion=e, cond=c, layers=_layers_key(layers), alpha=alpha if c else 0):
             (e, c) for e in r.cfg.emotions for c in (None, "mapped")}
    done = r.store.run(cells, write, desc="sample continuations")
    out: dict[str, Any] = {"opener": opener, "max_new_tokens": SAMPLE_TOKENS, "emotions": {}}
    for key, (e, c) in cells.items():
        row = out["emotions"].setdefault(e, {"scenario": r.task.negatives(e, held_out=True, k=1)[0]})
        row["unsteered" if c is None else "transplanted"] = {"answer": done[key][0], "opener": done[key][1]}
    return out


def _condition_cells(r: _Run, e: str, mapped: ConceptVector, native: ConceptVector, layers: list[int],
                     chosen_alpha: float) -> dict[str, tuple[str, ConceptVector, float, int | None]]:
    """Cells of one emotion: (condition, vector, alpha, random seed) per cell key."""
    cells: dict[str, tuple[str, ConceptVector, float, int | None]] = {}
    lk = _layers_key(layers)
    for a in r.cfg.alphas:
        # alpha = 0 is the one baseline of every condition: run it once, under "mapped"
        for cond in ("mapped", "native") if a > 0 else ("mapped",):
            vector = mapped if cond == "mapped" else native
            cells[cell_key(emotion=e, cond=cond, alpha=a, layers=lk)] = (cond, vector, a, None)
        # random control: every seed at the chosen alpha (the headline), one seed elsewhere (Fig 2a)
        for s in range(r.cfg.random_seeds if a == chosen_alpha else min(1, r.cfg.random_seeds)) if a > 0 else ():
            cells[cell_key(emotion=e, cond="random", seed=s, alpha=a, layers=lk)] = (
                "random", _random_like(mapped, 1000 + s), a, s)
    return cells


def _evaluate_emotion(r: _Run, e: str, mapped: ConceptVector, native: ConceptVector, layers: list[int],
                      chosen_alpha: float) -> dict[str, Any]:
    """Held-out evaluation of one emotion: every condition × alpha on negatives (and positives)."""
    neg = r.task.negatives(e, held_out=True, k=r.cfg.n_negatives)
    pos = r.task.eval_scenarios[e][: r.cfg.n_positives]
    cells = _condition_cells(r, e, mapped, native, layers, chosen_alpha)

    def evaluate_cell(arg: tuple[str, ConceptVector, float, int | None]) -> dict[str, Any]:
        cond, vec, a, _seed = arg
        if a == 0:  # the baseline: read from the unsteered answers all emotions share
            return {"negatives": r.baseline_score(e, neg), "positives": r.baseline_score(e, pos)}
        row = {"negatives": r.score(vec, e, layers, a, neg)}
        if cond != "random":
            row["positives"] = r.score(vec, e, layers, a, pos)
        return row

    done: dict[str, Any] = {}
    for group in ("baseline", "mapped", "native", "random"):  # one phase each, so the time table shows the controls
        part = {k: arg for k, arg in cells.items() if ("baseline" if arg[2] == 0 else arg[0]) == group}
        with r.phases.phase(f"evaluate {e}: {group}"):
            done.update(r.store.run(part, evaluate_cell, desc=f"evaluate {e}: {group}"))
    table: dict[str, Any] = {"mapped": {}, "native": {}, "random": {}}
    for key, (cond, _vec, a, _seed) in cells.items():
        if cond == "random":
            table["random"].setdefault(f"{a:g}", []).append(done[key]["negatives"])
        else:
            table[cond][f"{a:g}"] = done[key]
    table["native"]["0"] = table["mapped"]["0"]
    for a, rows in table["random"].items():
        table["random"][a] = {
            "negatives": {**{m: sum(row[m] for row in rows) / len(rows) for m in ("token_acc", "logit_acc")},
                          "label_counts": {lab: sum(row["label_counts"][lab] for row in rows)
                                           for lab in rows[0]["label_counts"]}},
            "seeds": rows,
        }
    return table


def _refinement_sizes(r: _Run, amap: AffineMap, results: dict[str, Any], layers: list[int],
                      alpha: float) -> dict[str, dict[str, Any]]:
    """Fig 5: negatives' accuracy of mapped vectors refined from each number of examples."""
    n_main = r.task.n_refine
    n_examples: dict[str, dict[str, Any]] = {e: {} for e in r.cfg.emotions}
    size_cells: dict[str, tuple[str, int]] = {}
    for e in r.cfg.emotions:
        available = len(r.task.refine_scenarios[e])
        for n in r.cfg.n_examples:
            n_eff = available if n <= 0 else min(n, available)
            if n_eff == (n_main or available):  # the main vector: already evaluated
                n_examples[e][str(n_eff)] = results[e]["mapped"][f"{alpha:g}"]["negatives"]
            else:
                size_cells[cell_key(phase="n_examples", emotion=e, n=n_eff, alpha=alpha,
                                    layers=_layers_key(layers))] = (e, n_eff)

    def score_size(arg: tuple[str, int]) -> dict[str, Any]:
        e, n = arg
        return r.score(r.in_reference_unit(amap.apply(r.vector(r.source, "source", e, n))), e, layers, alpha,
                       r.task.negatives(e, held_out=True, k=r.cfg.n_negatives))

    sized = r.store.run(size_cells, score_size, desc="Fig 5: refinement sizes")
    for key, (e, n_eff) in size_cells.items():
        n_examples[e][str(n_eff)] = sized[key]
    return n_examples


def _save_states(r: _Run, amap: AffineMap, mapped: dict[str, ConceptVector], results: dict[str, Any],
                 layers: list[int], alpha: float, path: Path) -> None:
    """Hidden states for Fig 2b and Fig 7/8 (saved as arrays, plotted by :func:`plot`)."""
    if path.is_file():
        return
    emotions = list(r.cfg.emotions)
    steered = max(emotions, key=lambda e: results[e]["mapped"][f"{alpha:g}"]["negatives"]["logit_acc"])
    prompts = [QUERY.format(s) for e in emotions for s in r.task.eval_scenarios[e][: r.cfg.n_positives]]
    labels = [e for e in emotions for _ in r.task.eval_scenarios[e][: r.cfg.n_positives]]
    read_tgt = min(int(r.target.cfg.n_layers) - 1, layers[-1] + 1)
    read_src = (amap.source_layers[amap.target_layers.index(layers[-1])] if layers[-1] in amap.target_layers
                else r.source.cfg.n_layers - 1)
    before = capture(r.target, prompts, layers=[read_tgt])[:, 0]
    with ct.transplant(r.target, mapped[steered], alpha=alpha, layers=layers, unit=r.cfg.unit):
        after = capture(r.target, prompts, layers=[read_tgt])[:, 0]
    src_states = capture(r.source, prompts, layers=[read_src])[:, 0]
    with atomic_path(path) as tmp:
        torch.save({"before": before, "after": after, "source": src_states, "labels": labels,
                    "steered": steered, "target_layer": read_tgt, "source_layer": read_src}, tmp)


def run(cfg: Config) -> dict[str, Any]:
    """Run the whole experiment; finished pieces are kept under ``cfg.out`` and reused."""
    cfg = cfg.effective()
    t0 = time.time()
    out = Path(cfg.out)
    task = emotion_task(cfg.emotions, n_refine=cfg.n_refine if cfg.n_refine > 0 else None,
                        n_eval=cfg.n_negatives, seed=cfg.seed, data_dir=cfg.data_dir)
    phases = cm.PhaseTimes()
    _log(f"loading {cfg.source} and {cfg.target}")
    with phases.phase("load models"):
        source = ct.load_model(cfg.source, device=cfg.device)
        target = ct.load_model(cfg.target, device=cfg.device)
    # settings are claimed only once both models loaded: a mistyped model name leaves the folder free
    phases.store = CellStore(out / "cells", settings={**settings_fingerprint(cfg), "protocol": PROTOCOL})
    r = _Run(cfg, task, source, target, phases.store, out / "artifacts", phases)

    amap = _fit_or_load_map(r)
    with phases.phase("refine vectors"):
        mapped, native = _refine_vectors(r, amap)
    with phases.phase("validation grid"):
        layers, alpha, selection = _choose_layer_and_alpha(r, mapped)
    results: dict[str, Any] = {}
    for e in cfg.emotions:
        results[e] = _evaluate_emotion(r, e, mapped[e], native[e], layers, alpha)
        _log(f"{e}: done ({time.time() - t0:.0f}s)")
    with phases.phase("Fig 5: refinement sizes"):
        n_examples = _refinement_sizes(r, amap, results, layers, alpha)
    with phases.phase("hidden states (Fig 2b, 7/8)"):
        _save_states(r, amap, mapped, results, layers, alpha, out / "states.pt")
    with phases.phase("fluency and samples"):
        fluency = _fluency(r, mapped, native, layers, alpha)
        samples = _samples(r, mapped, layers, alpha)

    result = {
        "config": asdict(cfg),
        "source": asdict(ct.identity(source)),
        "target": asdict(ct.identity(target)),
        "layers": layers,
        "alpha": alpha,
        "unit": cfg.unit,
        "alphas": list(cfg.alphas),
        "norm_reference": {"what": NORM_REFERENCE, "layers": {str(layer): round(float(r.reference_norms()[layer]), 4)
                                                             for layer in _candidate_layers(r)},
                           "corpus_norms_for_comparison": {str(t): round(float(amap.target_norms[t]), 4)
                                                           for t in amap.target_layers}},
        "selection": selection,
        "map": {"pairs": amap.pairs, "r2_heldout": [round(float(x), 4) for x in amap.r2_heldout],
                "ridge": amap.ridge.tolist(), **amap.provenance},
        "cosine_mapped_native": {e: float(layer_cosine(mapped[e].vectors, native[e].vectors)[layers].mean())
                                 for e in cfg.emotions},
        "results": results,
        "headline": headline(results, alpha),
        "confusion": confusion(results, alpha),
        "n_examples": n_examples,
        "fluency": fluency,
        "samples": samples,
        "seconds": round(time.time() - t0, 1),
        "phases": phases.as_dict(),
    }
    result["measurability"] = measurability(result)
    result["goals"] = goals(result, GOALS)
    write_json(out / "results.json", result)
    atomic_write_text(out / "summary.md", summary_markdown(result))
    _log(f"wrote {out / 'results.json'} ({result['seconds']}s)")
    return result


# ---- command line ----------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    """Flags for the Config fields; unset flags stay None, so ``--quick`` fills only those."""
    d = Config()
    p.add_argument("--source", help=f"source model (default {d.source})")
    p.add_argument("--target", help=f"target model (default {d.target})")
    p.add_argument("--out", help=f"output folder (default {d.out})")
    p.add_argument("--data-dir", help="directory of {emotion}.json scenario lists")
    p.add_argument("--alphas", type=validate.float_list_flag,
                   help=f"comma-separated strengths (default {','.join(f'{a:g}' for a in d.alphas)})")
    p.add_argument("--unit", choices=["norm", "raw"], help=f"alpha's unit (default {d.unit})")
    p.add_argument("--layers", type=validate.int_list_flag,
                   help="comma-separated target layers (default: chosen on validation)")
    for name, what in (("n_negatives", "evaluation scenarios per other emotion"),
                       ("n_positives", "evaluation scenarios of the emotion itself"),
                       ("n_refine", "refinement scenarios per side (0 = all)"),
                       ("random_seeds", "random controls per emotion"),
                       ("n_alignment", "neutral sentences for the map"),
                       ("n_guard", "held-out neutral sentences of the fluency bound")):
        p.add_argument(f"--{name.replace('_', '-')}", type=validate.nonnegative_int_flag,
                       help=f"{what} (default {getattr(d, name)})")
    p.add_argument("--max-ppl-ratio", type=float, help=f"fluency bound of the alpha choice (default {d.max_ppl_ratio})")
    p.add_argument("--select-on", choices=list(SELECT_ON), help=f"validation score of the choice (default {d.select_on})")
    p.add_argument("--outlier-factor", type=float,
                   help=f"leave samples above this x the median norm out of the map (default {d.outlier_factor}; 0 keeps all)")
    p.add_argument("--batch-size", type=validate.positive_int_flag, help=f"default {d.batch_size}")
    p.add_argument("--seed", type=validate.nonnegative_int_flag, help=f"default {d.seed}")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true",
                   help="smoke-test sizes (a minute or two on CPU) for every size flag not given")
    p.add_argument("--no-plots", action="store_true")


def config_from_args(args: argparse.Namespace) -> Config:
    """The flags the user gave, over the defaults; ``--quick`` presets fill only the others."""
    cfg = cm.config_from_args(Config, {}, args)
    given = tuple(f.name for f in dataclasses.fields(Config) if f.name != "quick" and getattr(args, f.name, None) is not None)
    return dataclasses.replace(cfg, explicit=given)


def run_cli(args: argparse.Namespace) -> int:
    """Run, draw the figures (timed as their own phase), print the summary and where the time went."""
    cfg = config_from_args(args)
    result = run(cfg)
    phases = cm.PhaseTimes.from_dict(result["phases"])
    if not args.no_plots:
        with phases.phase("figures"):
            paths = plot(result, cfg.out)
        print("\n".join(f"figure: {p}" for p in paths if p.suffix == ".png"))
        result["phases"] = phases.as_dict()
        write_json(Path(cfg.out) / "results.json", result)
    print((Path(cfg.out) / "summary.md").read_text())
    print("Where the time went (seconds; reused work: recorded compute time of cells and artifacts a resumed run reused):")
    print(phases.table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cm.script_main("emotion_transfer", __doc__.splitlines()[0], add_args, run_cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
