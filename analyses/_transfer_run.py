"""One transfer run's settings and state, shared by ``contrans transfer`` (a concept file) and ``contrans demo``.

The three steps, in order: step 1 refines each concept's vector in the source (its contrast
prompts, captured once per model) and natively in the target (the skyline); step 2 fits one
map source → target at the candidate target layers, on a text corpus that holds no evaluation
item; the mapped vector is ``map.apply(source vector)``. Every vector transplanted into the
target — mapped, native, random — reads alpha in one norm unit (the target's mean residual norm
at the last token of every contrast prompt), so at one alpha all are pushed equally hard, and
the frontier (:mod:`._frontier_run`) compares them at equal KL, not at equal alpha.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

import contrans_tl as ct
from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.analyses import _common as cm
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.capture import capture, check_layers
from contrans_tl.corpus import MapCorpus, resolve_corpus
from contrans_tl.datasets import generic_texts
from contrans_tl.errors import InvalidArgumentError, LayerIndexError
from contrans_tl.files import write_json
from contrans_tl.handle import ModelHandle
from contrans_tl.reformulate import capture_pair, default_layer_pairs, fit_map_from_states
from contrans_tl.sweep import CellStore, run_option
from contrans_tl.tasks.concept import Concept, ConceptSplit, check_held_out
from contrans_tl.tasks.frontier import METRICS, geometric_grid

__all__ = ["ALPHAS", "TransferSettings", "ConceptRun", "TransferRun", "NORM_REFERENCE", "concept_texts", "start_run",
           "random_vector", "log"]

ALPHAS = geometric_grid(0.02, 1.5, 8)
"""Default strengths of the concept vectors (norm units): 0.02 × 1.5^k, k = 0..7, i.e. 0.02 to 0.34 —
from where the default pair's vectors barely move the model to where its fluency breaks."""

NORM_REFERENCE = "target's mean resid_post norm at the last token of every contrast prompt"
"""Where alpha's unit comes from (one value per target layer, shared by every condition)."""


def log(msg: str) -> None:
    print(f"[transfer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class TransferSettings:
    """The settings every transfer run shares (each a command-line flag of ``transfer`` and ``demo``)."""

    source: str = "smollm2-135m-instruct"
    """Source model (where the concept is refined): built-in offline name, hub id, local dir or .gguf."""
    target: str = "gemma-3-270m"
    """Target model (where it is transplanted)."""
    out: str = run_option("out/transfer")
    """Output folder: results.json, summary.md, figures/, artifacts/, cells/ (resumable)."""
    alphas: tuple[float, ...] = ALPHAS
    """Strengths of the mapped and native vectors (norm units), a geometric grid (see :data:`ALPHAS`)."""
    layers: tuple[int, ...] | None = None
    """Target layer(s) steered together; None chooses one layer among ``candidate_depths`` on validation items."""
    candidate_depths: tuple[float, ...] = (0.83, 0.9)
    """Relative depths of the target layers tried when ``layers`` is None."""
    kl_bound: float = 0.1
    """Fluency bound of the operating point, nats/token of KL on generic text: the low end of the mild
    regime in ITI's reports (0.1–0.15), fixed before any tuning."""
    te_kl_range: tuple[float, float] = (0.01, 0.1)
    """KL range (nats/token) over which transfer efficiency averages mapped ÷ native gains."""
    select_on: str = "both"
    """What validation maximizes: "both" (mean of Token and Logit outcome per item), "logit" or "token"."""
    n_random: int = 8
    """Random directions per concept (seeded by concept and seed), each with its own KL."""
    random_points: int = 1
    """Alphas of the random grid each random direction is scored at (staggered, so the grid is covered: with 8
    directions and 8 grid alphas, each alpha once per concept; every concept's band pools all directions)."""
    n_fluency_texts: int = 19
    """Paragraphs of the built-in generic text the fluency instrument scores (19: about 2,050 Gemma tokens)."""
    map_corpus: str = "concept"
    """What the map is fitted on (:func:`contrans_tl.corpus.resolve_corpus`): ``concept`` (the concepts' own
    contrast prompts and domain text, never evaluation items; the default: on the default pair its map carries
    the emotions at transfer efficiency 1.01 on validation against 0.52 for ``neutral``, docs/beyond.md §6),
    ``neutral`` (the 400 built-in sentences), ``neutral:N``, ``file:PATH``, ``wikisplit:PATH[:N]`` or a union
    such as ``concept+neutral``."""
    map_estimator: str = "ridge"
    """How the map is fitted: lstsq, ridge (validation-chosen, the default), procrustes, rrr, whitened."""
    map_rank: int | None = None
    """Rank of the map for ``rrr`` (required) and ``whitened`` (optional)."""
    source_layer: int | None = None
    """Source layer the map reads (and the mapped vector comes from); None pairs each target layer with the
    source layer at the same relative depth. On the default pair layer 28 beat the depth-matched 24 on
    validation (transfer efficiency 1.11 against 1.01, intervals overlapping; docs/beyond.md §6)."""
    outlier_factor: float = 10.0
    """Samples whose norm passes this factor × the layer median are left out of the map fit (0 keeps all)."""
    batch_size: int = run_option(16)
    """Prompts per forward batch."""
    seed: int = 0
    """Seed of the item split, the map's held-out split and the random directions."""
    device: str | None = run_option(None)
    """Device of both models (None: the library's default)."""
    quick: bool = False
    """Smoke-test sizes (the analysis's QUICK presets) for every field the user did not set."""
    explicit: tuple[str, ...] = run_option(())
    """Fields the user set on the command line: ``quick`` never replaces them."""

    def __post_init__(self) -> None:
        validate.choice("select_on", self.select_on, METRICS)
        alphas = [validate.real(f"alphas[{i}]", a, low=0.0, low_open=True) for i, a in enumerate(self.alphas)]
        if len(alphas) < 2 or len(set(alphas)) != len(alphas):
            raise InvalidArgumentError("alphas", self.alphas, "two or more distinct strengths > 0 (0, the baseline, is always run)")
        validate.real("kl_bound", self.kl_bound, low=0.0, low_open=True)
        lo, hi = (validate.real(f"te_kl_range[{i}]", x, low=0.0, low_open=True) for i, x in enumerate(self.te_kl_range))
        if not lo < hi:
            raise InvalidArgumentError("te_kl_range", self.te_kl_range, "low < high (nats/token)")
        for name in ("n_random", "random_points", "n_fluency_texts"):
            validate.integer(name, getattr(self, name), low=1)
        validate.integer("random_points", self.random_points, low=1, high=len(alphas))
        validate.integer("n_fluency_texts", self.n_fluency_texts, low=1, high=len(generic_texts()))
        validate.corpus_spec("map_corpus", self.map_corpus)
        validate.choice("map_estimator", self.map_estimator, validate.MAP_ESTIMATORS)
        if self.map_rank is not None:
            validate.integer("map_rank", self.map_rank, low=1)
        validate.real("outlier_factor", self.outlier_factor, low=0.0)
        if self.source_layer is not None:
            validate.integer("source_layer", self.source_layer, low=0)
        for i, d in enumerate(self.candidate_depths):
            validate.real(f"candidate_depths[{i}]", d, low=0.0, high=1.0, low_open=True)
        if self.layers is None and not self.candidate_depths:
            raise InvalidArgumentError("candidate_depths", self.candidate_depths, "at least one depth (or give layers)")

    def effective(self, quick: dict[str, Any]) -> "TransferSettings":
        """This config with the ``quick`` presets for every field still at its default and not in ``explicit``."""
        if not self.quick:
            return self
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        keep = set(self.explicit) | {k for k in quick if getattr(self, k) != defaults[k]}
        return dataclasses.replace(self, **{k: v for k, v in quick.items() if k not in keep})


@dataclass(frozen=True)
class ConceptRun:
    """One concept of a run: its contrast prompts (and prefix, instruction) and the items it is chosen and reported on."""

    concept: Concept
    split: ConceptSplit

    @property
    def name(self) -> str:
        return self.concept.name


def random_vector(like: ConceptVector, concept: str, seed: int) -> ConceptVector:
    """A random direction for ``concept`` (Gaussian, one per layer), seeded by concept and seed: in norm units
    only its direction counts, so every concept's controls are different directions."""
    digest = int(hashlib.sha256(f"random-{concept}-{seed}".encode()).hexdigest()[:15], 16)
    noise = torch.randn(like.vectors.shape, generator=torch.Generator().manual_seed(digest))
    return ConceptVector(noise, like.model, like.layers, "random", like.layer_norms, n_prompts=0,
                         provenance={"seed": seed, "concept": concept, "norm_reference": NORM_REFERENCE})


@dataclass
class TransferRun:
    """What the steps of one run share: settings, concepts, both models, the cells, artifacts and timings."""

    cfg: TransferSettings
    concepts: list[ConceptRun]
    source: ModelHandle
    target: ModelHandle
    store: CellStore
    art: Path
    phases: cm.PhaseTimes
    corpus: MapCorpus
    """The map's corpus, resolved once by :func:`start_run` (its digest is part of the run's settings)."""
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per model (by ``id``): resid_post of every contrast prompt at every layer, captured once."""
    reference: torch.Tensor | None = None

    @property
    def fluency_texts(self) -> list[str]:
        return generic_texts()[: self.cfg.n_fluency_texts]

    def contrast_states(self, model: ModelHandle) -> dict[str, torch.Tensor]:
        """resid_post of every concept's contrast prompts in ``model``, captured once."""
        if id(model) not in self.states:
            prompts = list(dict.fromkeys(p for c in self.concepts for p in (*c.concept.positive, *c.concept.negative)))
            self.states[id(model)] = dict(zip(prompts, capture(model, prompts, batch_size=self.cfg.batch_size)))
        return self.states[id(model)]

    def vector(self, model: ModelHandle, kind: str, concept: Concept, n: int | None = None) -> ConceptVector:
        """``concept``'s mean-difference vector in ``model`` from its first ``n`` pairs (None: all), kept in artifacts/."""
        path = self.art / f"{kind}_{concept.name}{'' if n is None else f'_n{n}'}.safetensors"
        if path.is_file():
            self.store.reused(f"artifact-{path.stem}")
            return ConceptVector.load(path)
        with self.phases.record(f"artifact-{path.stem}"):
            cached = self.contrast_states(model)
            pos, neg = concept.positive[:n], concept.negative[:n]
            v = ct.concept_from_states(model, torch.stack([cached[p] for p in pos]), torch.stack([cached[p] for p in neg]))
            v.save(path)
        return v

    def reference_norms(self) -> torch.Tensor:
        """Alpha's one norm unit per target layer (kept in artifacts/)."""
        if self.reference is None:
            path = self.art / "reference_norms.json"
            if path.is_file():
                self.reference = torch.tensor(json.loads(path.read_text())["norms"])
            else:
                states = torch.stack(list(self.contrast_states(self.target).values()))
                self.reference = states.norm(dim=-1).mean(0)
                write_json(path, {"norms": self.reference.tolist(), "what": NORM_REFERENCE, "n_prompts": len(states)})
        return self.reference

    def in_reference_unit(self, vector: ConceptVector) -> ConceptVector:
        return cm.with_norms(vector, self.reference_norms(), NORM_REFERENCE)

    def candidate_layers(self) -> list[int]:
        """Target layers the run may steer: ``layers`` if given (steered together), else one per candidate depth."""
        if self.cfg.layers is not None:
            return sorted(set(check_layers(self.target, self.cfg.layers)))
        n_tgt = int(self.target.cfg.n_layers)
        return sorted({cm.layer_at_depth(n_tgt, d) for d in self.cfg.candidate_depths})

    def layer_sets(self) -> list[tuple[int, ...]]:
        """The steering choices the validation stage compares: the given layers together, or each candidate alone."""
        if self.cfg.layers is not None:
            return [tuple(self.candidate_layers())]
        return [(layer,) for layer in self.candidate_layers()]

    def fit_or_load_map(self) -> AffineMap:
        """Step 2: one map source → target at the candidate layers, on the run's map corpus (kept in artifacts/);
        a corpus that holds an evaluation item's prompt is refused."""
        path = self.art / "map.safetensors"
        if path.is_file():
            for part in ("corpus", "fit"):
                with self.phases.phase(f"map: {part}"):
                    self.store.reused(f"artifact-map-{part}")
            return AffineMap.load(path)
        corpus = self.corpus
        items = {it.prompt for c in self.concepts for it in (*c.split.validation, *c.split.test)}
        leaked = next((p for p in items for text in corpus.texts if p in text), None)
        if leaked is not None:
            raise InvalidArgumentError("map_corpus", self.cfg.map_corpus, f"a corpus that holds no evaluation item (it "
                                       f"holds {leaked[:60]!r})")
        texts = list(corpus.texts)
        steerable = set(self.candidate_layers())
        pairs = [(s, t) for s, t in default_layer_pairs(int(self.source.cfg.n_layers), int(self.target.cfg.n_layers))
                 if t in steerable]
        if self.cfg.source_layer is not None:
            n_src = int(self.source.cfg.n_layers)
            if self.cfg.source_layer >= n_src:
                raise LayerIndexError(f"source_layer: layer {self.cfg.source_layer} out of range: the source model has "
                                      f"{n_src} blocks (0..{n_src - 1})")
            pairs = [(self.cfg.source_layer, t) for _, t in pairs]
        log(f"fitting the map ({self.cfg.map_estimator}) on {len(texts)} texts of {self.cfg.map_corpus!r}, "
            f"target layers {sorted(steerable)}")
        with self.phases.phase("map: corpus"), self.phases.record("artifact-map-corpus"):
            xs, ys = capture_pair(self.source, self.target, texts, sorted({s for s, _ in pairs}),
                                  sorted({t for _, t in pairs}), batch_size=self.cfg.batch_size, progress=True)
        with self.phases.phase("map: fit"), self.phases.record("artifact-map-fit"):
            amap = fit_map_from_states(xs, ys, layers=pairs, seed=self.cfg.seed, outlier_factor=self.cfg.outlier_factor,
                                       estimator=self.cfg.map_estimator, rank=self.cfg.map_rank, corpus=corpus)
        amap.save(path)
        return amap

    def refine_vectors(self, amap: AffineMap) -> tuple[dict[str, ConceptVector], dict[str, ConceptVector]]:
        """Step 1 and the mapping: per concept, the mapped source vector and the target's native one, in one unit."""
        mapped, native = {}, {}
        for c in self.concepts:
            source_vec = self.vector(self.source, "source", c.concept)
            mapped[c.name] = self.in_reference_unit(amap.apply(source_vec))
            native[c.name] = self.in_reference_unit(self.vector(self.target, "native", c.concept))
        return mapped, native


def concept_texts(concepts: Sequence[ConceptRun]) -> list[str]:
    """What the map corpus "concept" stands for: every concept's contrast prompts and domain text."""
    return [t for c in concepts for t in c.concept.contrast_texts]


def start_run(cfg: TransferSettings, concepts: list[ConceptRun], protocol: str) -> TransferRun:
    """Load both models, then claim the output folder's cells with the run's settings (a mistyped model
    name leaves the folder unclaimed)."""
    from contrans_tl.sweep import settings_fingerprint

    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("concepts", names, "concepts with distinct names")
    for c in concepts:  # no validation or test item is a contrast prompt or a few-shot example
        check_held_out(c.concept, c.split)
    phases = cm.PhaseTimes()
    log(f"loading {cfg.source} and {cfg.target}")
    with phases.phase("load models"):
        source = ct.load_model(cfg.source, device=cfg.device)
        target = ct.load_model(cfg.target, device=cfg.device)
    out = Path(cfg.out)
    concept_digest = hashlib.sha256(json.dumps([dataclasses.asdict(c) for c in concepts], sort_keys=True,
                                               default=str).encode()).hexdigest()[:16]
    corpus = resolve_corpus(cfg.map_corpus, concept_texts=concept_texts(concepts))
    phases.store = CellStore(out / "cells", settings={**settings_fingerprint(cfg), "protocol": protocol,
                                                      "concepts": concept_digest,
                                                      "map_corpus_sha256": corpus.provenance["sha256"][:16]})
    return TransferRun(cfg, concepts, source, target, phases.store, out / "artifacts", phases, corpus=corpus)


# ---- command line -------------------------------------------------------------------------------
def add_transfer_args(p: Any, defaults: TransferSettings) -> None:
    """The flags of every :class:`TransferSettings` field (unset flags stay None, so ``--quick`` fills only those)."""
    d = defaults
    p.add_argument("--source", type=flags.model_flag,
                   help=f"source model: built-in name, hub id, local folder or .gguf (default {d.source})")
    p.add_argument("--target", type=flags.model_flag, help=f"target model (default {d.target})")
    p.add_argument("--out", type=flags.out_dir_flag, help=f"output folder (default {d.out})")
    p.add_argument("--alphas", type=flags.float_list_flag,
                   help=f"comma-separated strengths > 0 in norm units (default {','.join(f'{a:g}' for a in d.alphas)})")
    p.add_argument("--layers", type=flags.layer_list_flag, help="target layers steered together (default: chosen on validation)")
    p.add_argument("--candidate-depths", type=flags.float_list_flag,
                   help=f"relative depths of the candidate layers (default {','.join(map(str, d.candidate_depths))})")
    p.add_argument("--kl-bound", type=flags.nonnegative_float_flag,
                   help=f"fluency bound of the operating point, nats/token of KL on generic text (default {d.kl_bound})")
    p.add_argument("--te-kl-range", type=flags.float_list_flag,
                   help=f"LOW,HIGH: KL range of transfer efficiency (default {d.te_kl_range[0]},{d.te_kl_range[1]})")
    p.add_argument("--select-on", choices=list(METRICS), help=f"validation score (default {d.select_on})")
    for name, what in (("n_random", "random directions per concept"),
                       ("random_points", "alphas each random direction is scored at"),
                       ("n_fluency_texts", "paragraphs of generic text the fluency instrument scores"),
                       ("map_rank", "rank of an rrr / whitened map")):
        p.add_argument(f"--{name.replace('_', '-')}", type=flags.positive_int_flag,
                       help=f"{what} (default {getattr(d, name)})")
    p.add_argument("--map-corpus", type=flags.corpus_flag, help=f"what the map is fitted on (default {d.map_corpus})")
    p.add_argument("--map-estimator", type=flags.estimator_flag, help=f"how the map is fitted (default {d.map_estimator})")
    p.add_argument("--source-layer", type=flags.nonnegative_int_flag,
                   help="source layer the map reads (default: the one at the target layer's relative depth)")
    p.add_argument("--outlier-factor", type=flags.nonnegative_float_flag,
                   help=f"leave samples above this x the median norm out of the map (default {d.outlier_factor}; 0 keeps all)")
    p.add_argument("--batch-size", type=flags.positive_int_flag, help=f"default {d.batch_size}")
    p.add_argument("--seed", type=flags.nonnegative_int_flag, help=f"default {d.seed}")
    p.add_argument("--device", type=flags.device_flag, default=None, help="device of both models (default: the library's)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes for every size flag not given")
    p.add_argument("--no-plots", action="store_true", help="write no figures")


def settings_from_args(config_cls: Any, args: Any) -> Any:
    """A Config of ``config_cls`` from the flags the user gave (the rest at their defaults; ``explicit`` records them)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    given = {name: getattr(args, name) for name in fields - {"quick", "explicit"}
             if getattr(args, name, None) is not None}
    if "te_kl_range" in given and len(given["te_kl_range"]) != 2:
        raise InvalidArgumentError("te_kl_range", given["te_kl_range"], "two numbers LOW,HIGH")
    return config_cls(**given, quick=bool(getattr(args, "quick", False)), explicit=tuple(sorted(given)))
