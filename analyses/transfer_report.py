"""Transfer report and layer-pair search for an emotion concept on a source → target pair.

Composes the library: the emotion task (:mod:`contrans_tl.tasks.emotion`) gives the contrast
prompts that refine the concept in the source (transplanted) and in the target (native
reference); an affine map is fitted on neutral text;
:func:`contrans_tl.reports.transfer.transfer_report` measures held-out R², cosine and the causal
ratio on the emotion metric; :func:`contrans_tl.reports.layer_search.layer_pair_search_from_states`
scores a strided source × target grid by R² and the logit-lens proxy on the emotion's label
token (:func:`contrans_tl.lens.concept_readout`). Both models are captured once, at every
layer, and the captures serve the map and the grid.

The metric is scored on *negatives*: evaluation-half scenarios of the other five emotions
(``EmotionTask.negatives``), behind the task's few-shot block. "logit_acc" is the share of them
answered with the concept's label among the six labels (the paper's Logit Acc); "label_prob"
the mean probability of that label among the six (continuous, so small effects show).

Run: ``contrans report --out runs/transfer`` and ``contrans layer-search --out runs/transfer``
(or ``python -m contrans_tl.analyses.transfer_report --out runs/transfer`` for both in one process).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import contrans_tl as ct
from contrans_tl.analyses import _common as cm
from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.files import write_json
from contrans_tl.handle import ModelHandle
from contrans_tl.lens import concept_readout
from contrans_tl.pairing import PairedStates, capture_paired
from contrans_tl.reports.layer_search import (
    LayerPairSearch,
    auto_layers,
    drop_outlier_samples,
    layer_pair_search_from_states,
    strided_layers,
)
from contrans_tl.reports.strength import guarded_sweep
from contrans_tl.reports.transfer import Metric, TransferReport, transfer_report
from contrans_tl.tasks.emotion import EMOTIONS, EmotionTask, emotion_task, label_tokens
from contrans_tl.transplant import Unit

HELP = "transfer report (R2, cosine, causal ratio) and layer-pair search for an emotion concept"

N_EVAL_HELP = ("negative scenarios the metric is scored on, rounded up to a multiple of the five other emotions "
               "(ceil(n_eval / 5) held-out scenarios of each)")

METRICS = ("logit_acc", "label_prob")


@dataclass
class Config:
    """Settings of one run. Defaults: the offline pair, fear, sizes that run on a laptop CPU."""

    source: str = "smollm2-135m-instruct"
    target: str = "gemma-3-270m"
    emotion: str = "fear"
    n_texts: int | None = None
    """With ``map_corpus="neutral"``: how many built-in neutral sentences the maps are fitted on (None: 200; a
    fifth held out for R²)."""
    map_corpus: str = "neutral"
    """What the maps are fitted on: "neutral" (``n_texts`` built-in sentences spread over the set) or a map-corpus
    spec (:mod:`contrans_tl.corpus`; "concept" = the emotion's contrast prompts)."""
    map_estimator: str = "ridge"
    """How the maps are fitted (:mod:`contrans_tl.estimators`)."""
    n_refine: int = 24
    """Contrast prompts per side for refining the concept in each model."""
    n_eval: int = 24
    """Negative scenarios the metric is scored on, rounded up to a multiple of the five other
    emotions: ``ceil(n_eval / 5)`` held-out scenarios of each."""
    alpha: float | str = 0.1
    """Strength for the causal ratio, or "auto": the largest alpha of a KL-guarded sweep."""
    unit: Unit = "norm"
    kl_budget: float = 0.25
    """Nats of mean neutral-text KL allowed when alpha is "auto"."""
    metric: str = "logit_acc"
    steer_layers: tuple[int, ...] | str | None = None
    """Target layers steered together for the combined causal ratio (default: all layers of the
    map; "auto": :func:`contrans_tl.reports.layer_search.auto_layers`, called here)."""
    per_layer: tuple[int, ...] = ()
    """Target layers additionally steered one at a time."""
    per_layer_alpha: float | None = None
    """Strength of the one-layer runs (default: ``alpha``)."""
    pairs: str = "default"
    """Layer pairs of the report's map: "default" (depth-matched, the paper) or "search" (the best
    source layer for every target layer of the layer-pair search); ``run`` also takes "both"
    (report.json with the default pairs, report_search.json with the searched ones)."""
    min_effect: float | None = None
    """Smallest native effect for which the causal ratio is defined (default: two scenarios'
    worth, 1.5/n_eval, for logit_acc; 0.005 for label_prob)."""
    outlier_factor: float = 10.0
    """Drop aligned samples whose norm exceeds this many times the layer's median (0: keep all)."""
    stride: int = 3
    target_stride: int = 1
    top_k: int = 5
    map_path: str | None = None
    vector_path: str | None = None
    native_path: str | None = None
    out: str = "runs/transfer"
    device: str | None = None
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        """Every field checked before a model loads: a bad one is a named error, not a crash midway."""
        v = validate
        v.choice("emotion", self.emotion, EMOTIONS)
        for name in ("n_refine", "n_eval", "stride", "target_stride", "top_k", "batch_size"):
            v.integer(name, getattr(self, name), low=1)
        v.integer("seed", self.seed, low=0)
        if self.alpha != "auto":
            self.alpha = v.real("alpha", self.alpha)
        v.choice("unit", self.unit, ("raw", "norm"))
        v.real("kl_budget", self.kl_budget, low=0.0, low_open=True)
        v.choice("metric", self.metric, METRICS)
        v.choice("pairs", self.pairs, ("default", "search", "both"))
        v.real("outlier_factor", self.outlier_factor, low=0.0)
        v.corpus_spec("map_corpus", self.map_corpus)
        cm.check_neutral_count(self, default=200)
        v.choice("map_estimator", self.map_estimator, v.MAP_ESTIMATORS)
        for name in ("per_layer_alpha", "min_effect"):
            if getattr(self, name) is not None:
                v.real(name, getattr(self, name), low=0.0 if name == "min_effect" else None)
        if self.steer_layers is not None and self.steer_layers != "auto":
            self.steer_layers = tuple(v.integer(f"steer_layers[{i}]", x, low=0) for i, x in enumerate(self.steer_layers))
        self.per_layer = tuple(v.integer(f"per_layer[{i}]", x, low=0) for i, x in enumerate(self.per_layer))
        v.device("device", self.device)
        v.out_dir("out", self.out)
        for name in ("map_path", "vector_path", "native_path"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise InvalidArgumentError(name, path, "an existing artifact file (.safetensors)")
        for name in ("source", "target"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise InvalidArgumentError(name, getattr(self, name), "a model name, hub id, folder or .gguf file")


_FROM_FLAGS = {"map": "map_path", "vector": "vector_path", "native": "native_path"}
"""Flags whose Config field has another name."""


def config_from_args(args: argparse.Namespace) -> Config:
    """A Config from ``contrans report`` / ``contrans layer-search`` arguments (flags not given keep the defaults)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {_FROM_FLAGS.get(k, k): val for k, val in vars(args).items() if val is not None}
    return Config(**{k: val for k, val in values.items() if k in fields})


# ---- the emotion concept: task, metric, readout (all from contrans_tl.tasks.emotion) -------------
def negatives_per_emotion(n_eval: int) -> int:
    """Held-out scenarios of each other emotion so that at least ``n_eval`` negatives are scored."""
    return math.ceil(n_eval / (len(EMOTIONS) - 1))


def emotion_metric(task: EmotionTask, emotion: str, kind: str = "logit_acc", *,
                   batch_size: int = 16) -> Callable[[ModelHandle], float]:
    """``metric(model)``: Logit Acc of ``emotion`` on its held-out negatives, or its label probability."""
    if kind == "logit_acc":
        return lambda model: float(task.score(model, emotion, batch_size=batch_size)["logit_acc"])
    if kind == "label_prob":
        return lambda model: task.label_probability(model, emotion, batch_size=batch_size)
    raise InvalidArgumentError("metric", kind, " or ".join(repr(m) for m in METRICS))


def emotion_readout(model: ModelHandle, emotion: str):
    """Logit-lens readout of the emotion's label token against the other five labels."""
    labels = label_tokens(model.tokenizer).tolist()
    i = list(EMOTIONS).index(emotion)
    return concept_readout(model, [labels[i]], labels[:i] + labels[i + 1 :])


# ---- the runs ---------------------------------------------------------------------------------
class _Run:
    """Models, texts and vectors shared by the report and the search (loaded once)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.source: ModelHandle = ct.load_model(cfg.source, device=cfg.device)
        self.target: ModelHandle = ct.load_model(cfg.target, device=cfg.device)
        self.timings["load"] = time.perf_counter() - t0
        pool = neutral_sentences()
        self.task = emotion_task((cfg.emotion,), n_refine=cfg.n_refine, n_eval=negatives_per_emotion(cfg.n_eval),
                                 seed=cfg.seed)
        spread = pool[:: max(1, len(pool) // cfg.n_texts)][: cfg.n_texts] if cfg.n_texts else pool
        self.corpus = cm.map_corpus(cfg.map_corpus, spread, self.task)
        self.texts = list(self.corpus.texts)
        self.negatives = self.task.negatives(cfg.emotion)
        self._states: tuple[PairedStates, PairedStates] | None = None
        self.search: LayerPairSearch | None = None
        self.n_dropped: int | None = None  # None: no capture in this run (maps loaded from files)
        t0 = time.perf_counter()
        self.vector = self._vector(self.source, cfg.vector_path, "source")
        self.native = self._vector(self.target, cfg.native_path, "native")
        self.timings["refine"] = time.perf_counter() - t0

    def _vector(self, model: ModelHandle, path: str | None, role: str) -> ConceptVector:
        """The concept vector loaded from ``path``, or refined in ``model`` and saved."""
        if path:
            return ConceptVector.load(path)
        positives, negatives = self.task.contrast(self.cfg.emotion)
        vector = ct.refine(model, positives, negatives, batch_size=self.cfg.batch_size)
        vector.save(self.out / f"{self.cfg.emotion}_{role}.safetensors")
        return vector

    def states(self) -> tuple[PairedStates, PairedStates]:
        """Aligned captures of both models at every layer (once)."""
        if self._states is None:
            t0 = time.perf_counter()
            same = self.source.tokenizer.get_vocab() == self.target.tokenizer.get_vocab()
            scheme: Literal["tokens", "words"] = "tokens" if same else "words"
            xs = capture_paired(self.source, self.texts, scheme=scheme, batch_size=self.cfg.batch_size)
            ys = capture_paired(self.target, self.texts, scheme=scheme, batch_size=self.cfg.batch_size)
            xs, ys, self.n_dropped = drop_outlier_samples(xs, ys, factor=self.cfg.outlier_factor)
            self._states = (xs, ys)
            self.timings["capture"] = time.perf_counter() - t0
        return self._states

    def amap(self, pairs_from: str) -> AffineMap:
        """The report's map: loaded, or fitted on the captures with default or searched pairs."""
        if self.cfg.map_path:
            return AffineMap.load(self.cfg.map_path)
        if pairs_from not in ("default", "search"):
            raise InvalidArgumentError("pairs", pairs_from, "'default' or 'search'")
        xs, ys = self.states()
        pairs = (self.search or layer_search(self)).best_source_for_target() if pairs_from == "search" else None
        t0 = time.perf_counter()
        amap = ct.fit_map_from_states(xs, ys, layers=pairs, seed=self.cfg.seed, estimator=self.cfg.map_estimator,
                                      corpus=self.corpus)
        amap.save(self.out / ("map.safetensors" if pairs_from == "default" else "map_search.safetensors"))
        self.timings[f"fit_map_{pairs_from}"] = time.perf_counter() - t0
        return amap


def _min_effect(run: _Run) -> float:
    if run.cfg.min_effect is not None:
        return float(run.cfg.min_effect)
    if run.cfg.metric == "logit_acc":
        return 1.5 / max(1, len(run.negatives))  # one flipped scenario is noise
    return 0.005


def _steered(run: _Run, mapped: ConceptVector) -> list[int] | None:
    """Target layers steered together: as configured, or chosen by auto_layers."""
    layers = run.cfg.steer_layers
    if isinstance(layers, str):
        if layers != "auto":
            raise InvalidArgumentError("steer_layers", layers, "target layers, 'auto' or None")
        return auto_layers(mapped, search=run.search)
    return list(layers) if layers else None


def _alpha(run: _Run, mapped: ConceptVector, metric: Metric) -> tuple[float, dict[str, Any] | None]:
    """The configured alpha, or the largest one of a KL-guarded sweep (with the sweep's record)."""
    cfg = run.cfg
    if cfg.alpha != "auto":
        return float(cfg.alpha), None
    t0 = time.perf_counter()
    sweep = guarded_sweep(run.target, mapped, budget=cfg.kl_budget, unit=cfg.unit,
                          layers=_steered(run, mapped), metric=metric)
    run.timings["alpha_sweep"] = time.perf_counter() - t0
    if sweep.chosen is None:
        raise InvalidArgumentError("kl_budget", cfg.kl_budget, f"a budget some alpha keeps: KL per token of generic "
                                   f"text at alphas {sweep.alphas}: {[round(k, 4) for k in sweep.kl]}")
    return sweep.chosen, sweep.to_dict()


def _timings(run: _Run) -> dict[str, float]:
    return {k: round(v, 1) for k, v in run.timings.items()}


def report(run: _Run, pairs_from: str | None = None) -> TransferReport:
    """The transfer report; writes report[_search].json and .png/.pdf under ``cfg.out``."""
    from contrans_tl import plotting

    cfg = run.cfg
    pairs_from = pairs_from or cfg.pairs
    stem = "report" if pairs_from == "default" else "report_search"
    amap = run.amap(pairs_from)
    metric = emotion_metric(run.task, cfg.emotion, cfg.metric, batch_size=16)
    mapped = amap.apply(run.vector)
    alpha, sweep = _alpha(run, mapped, metric)
    t0 = time.perf_counter()
    rep = transfer_report(
        run.target, amap, run.vector, run.native, metric=metric, metric_name=cfg.metric, concept=cfg.emotion,
        alpha=alpha, unit=cfg.unit, layers=_steered(run, mapped), per_layer=cfg.per_layer,
        per_layer_alpha=cfg.per_layer_alpha, min_effect=_min_effect(run),
    )
    run.timings[stem] = time.perf_counter() - t0
    rep.settings.update(pairs=pairs_from, config=dataclasses.asdict(cfg), n_eval=len(run.negatives),
                        outliers_dropped=run.n_dropped, min_effect=_min_effect(run))
    if sweep is not None:
        rep.settings["alpha_sweep"] = sweep
    rep.settings["timings_s"] = _timings(run)
    rep.save(run.out / f"{stem}.json")
    plotting.save_figure(plotting.transfer_report(rep), run.out / stem)
    return rep


def layer_search(run: _Run) -> LayerPairSearch:
    """The layer-pair grid; writes layer_search.json and layer_search.png/pdf under ``cfg.out``."""
    from contrans_tl import plotting

    cfg = run.cfg
    xs, ys = run.states()
    t0 = time.perf_counter()
    search = layer_pair_search_from_states(
        xs, ys,
        source_layers=strided_layers(len(xs.layers), cfg.stride),
        target_layers=strided_layers(len(ys.layers), cfg.target_stride),
        source_vector=run.vector, readout=emotion_readout(run.target, cfg.emotion), native_vector=run.native,
        seed=cfg.seed,
    )
    run.timings["layer_search"] = time.perf_counter() - t0
    run.search = search
    search.settings.update(outliers_dropped=run.n_dropped, config=dataclasses.asdict(cfg), timings_s=_timings(run))
    search.save(run.out / "layer_search.json", top_k=cfg.top_k)
    plotting.save_figure(plotting.layer_search(search), run.out / "layer_search")
    return search


# ---- summaries and entry points ----------------------------------------------------------------
def _summary_report(rep: TransferReport) -> str:
    lines = [f"{rep.source} -> {rep.target}, {rep.concept}: alpha {rep.alpha:g} ({rep.unit})"]
    for p in rep.pairs:
        lines.append(f"  pair {p['source_layer']:2d} -> {p['target_layer']:2d}  R2 {p['r2_heldout']:.3f}  cos {p['cosine']:+.3f}")
    if rep.combined:
        c = rep.combined
        lines.append(f"  {rep.metric_name}: base {rep.metric_base:.3f}  mapped {c['metric_mapped']:.3f}  "
                     f"native {c['metric_native']:.3f}  causal ratio {c['causal_ratio']:.3f}")
    for r in rep.per_layer:
        lines.append(f"  layer {r['target_layer']:2d} alone: effect mapped {r['effect_mapped']:+.3f}  "
                     f"native {r['effect_native']:+.3f}  ratio {r['causal_ratio']:.3f}  cos {r['cosine']:+.3f}")
    lines += [f"  WARNING {w}" for w in rep.warnings]
    return "\n".join(lines)


def _summary_search(search: LayerPairSearch, top_k: int) -> str:
    lines = [f"layer-pair search {search.source} -> {search.target}: best pairs"]
    for c in search.best_pairs(top_k):
        lines.append("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()))
    return "\n".join(lines)


def run_report(cfg: Config) -> TransferReport:
    run = _Run(cfg)
    rep = report(run)
    print(_summary_report(rep))
    stem = "report" if cfg.pairs == "default" else "report_search"
    print(f"wrote {run.out / (stem + '.json')} and {run.out / (stem + '.png')}")
    return rep


def run_layer_search(cfg: Config) -> LayerPairSearch:
    run = _Run(cfg)
    search = layer_search(run)
    print(_summary_search(search, cfg.top_k))
    print(f"wrote {run.out / 'layer_search.json'} and {run.out / 'layer_search.png'}")
    return search


def run(cfg: Config) -> tuple[TransferReport, LayerPairSearch]:
    """Both, sharing the models, vectors and captures."""
    shared = _Run(cfg)
    search = layer_search(shared)
    kinds = ("default", "search") if cfg.pairs == "both" else (cfg.pairs,)
    reports = [report(shared, kind) for kind in kinds]
    print(_summary_search(search, cfg.top_k))
    for rep in reports:
        print(_summary_report(rep))
    write_json(shared.out / "timings.json", _timings(shared))
    return reports[-1], search


# ---- command line ---------------------------------------------------------------------------------
def _shared_args(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    d = Config()
    p.add_argument("--source", type=flags.model_flag, help=f"source model (default {d.source}: the offline pair)")
    p.add_argument("--target", type=flags.model_flag, help=f"target model (default {d.target})")
    p.add_argument("--emotion", choices=EMOTIONS, help="built-in emotion concept (its label tokens and scenarios)")
    p.add_argument("--n-texts", type=flags.positive_int_flag, help="with --map-corpus neutral: built-in neutral sentences for fitting maps (default 200)")
    p.add_argument("--n-refine", type=flags.positive_int_flag, help=f"contrast prompts per side (default {d.n_refine})")
    p.add_argument("--out", required=out_required, type=flags.out_dir_flag,
                   help="output directory (JSON, figures, artifacts)")
    p.add_argument("--outlier-factor", type=flags.nonnegative_float_flag,
                   help=f"drop aligned samples with norm > this x the layer median (0: keep all; default {d.outlier_factor})")
    cm.add_map_args(p, default_corpus=d.map_corpus)
    p.add_argument("--device", type=flags.device_flag)
    p.add_argument("--batch-size", type=flags.positive_int_flag, help=f"default {d.batch_size}")
    p.add_argument("--seed", type=flags.nonnegative_int_flag, help=f"default {d.seed}")


def _report_only_args(p: argparse.ArgumentParser, *, pairs: Sequence[str]) -> None:
    p.add_argument("--map", type=flags.existing_file_flag, help="AffineMap file (default: fit one on the neutral corpus)")
    p.add_argument("--vector", type=flags.existing_file_flag,
                   help="source ConceptVector file (default: refine --emotion in the source)")
    p.add_argument("--native", type=flags.existing_file_flag,
                   help="target ConceptVector file (default: refine --emotion in the target)")
    p.add_argument("--alpha", type=flags.alpha_or_auto_flag,
                   help="strength for the causal ratio (default 0.1), or 'auto' (KL-guarded sweep)")
    p.add_argument("--unit", choices=["raw", "norm"])
    p.add_argument("--kl-budget", type=flags.positive_float_flag, help="nats of neutral-text KL for --alpha auto")
    p.add_argument("--metric", choices=list(METRICS))
    p.add_argument("--n-eval", type=flags.positive_int_flag, help=N_EVAL_HELP)
    p.add_argument("--steer-layers", type=flags.layers_or_auto_flag, help="target layers steered together: "
                   "comma-separated, 'auto' (reports.layer_search.auto_layers); default: all layers of the map")
    p.add_argument("--per-layer", type=flags.layer_list_flag, help="comma-separated target layers to also test one at a time")
    p.add_argument("--per-layer-alpha", type=flags.finite_float_flag, help="strength of the one-layer runs")
    p.add_argument("--min-effect", type=flags.nonnegative_float_flag,
                   help="smallest native effect for which the causal ratio is defined")
    p.add_argument("--pairs", choices=list(pairs), help="map layer pairs: depth-matched, or the best of a layer-pair search")


def _search_only_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-stride", type=flags.positive_int_flag, help="every n-th target layer")
    p.add_argument("--top-k", type=flags.positive_int_flag, help="best pairs listed")


def add_report_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``contrans report``."""
    _shared_args(p, out_required=True)
    _report_only_args(p, pairs=("default", "search"))
    p.add_argument("--stride", type=flags.positive_int_flag, help="layer-pair search stride (with --pairs search)")


def add_layer_search_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``contrans layer-search``."""
    _shared_args(p, out_required=True)
    p.add_argument("--stride", type=flags.positive_int_flag, help="every n-th source layer (the last always kept)")
    _search_only_args(p)


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``python -m contrans_tl.analyses.transfer_report``: the search and the report(s) in one process."""
    _shared_args(p, out_required=False)
    _report_only_args(p, pairs=("default", "search", "both"))
    p.add_argument("--stride", type=flags.positive_int_flag, help="every n-th source layer of the search")
    _search_only_args(p)


def run_cli(args: argparse.Namespace) -> int:
    run(config_from_args(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from contrans_tl.analyses._common import script_main

    return script_main("transfer_report", HELP, add_args, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
