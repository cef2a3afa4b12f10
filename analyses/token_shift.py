"""Logit-lens token shift (paper appendix B.3, Table 8): which tokens a transplant makes likelier.

Each emotion's vector is refined in the source, mapped into the target with an affine map
fitted on word-aligned neutral text (source steering layer → target steering layer) and
transplanted at the target's steering layer. On the emotion's negatives (other emotions'
evaluation scenarios in the refinement query, no few-shot block) the target's ``resid_post``
at the last token is read through its final norm and unembedding (:mod:`contrans_tl.lens`)
before and after the transplant. Per prompt the ``k`` tokens whose probability rises most and
the ``k`` that fall most are kept; over all prompts each token's count is how many prompts
have it among them — the "token (count)" entries of Table 8.

The same is done with the **native** vector (refined in the target itself, same alpha in the
same norm units) and the two top-k sets are compared: per prompt the shared fraction
|A ∩ B| / k (and Jaccard), and the overlap of the two aggregated top-``top`` lists.

Read-out layers (``lens_layers``): ``"steer"`` reads the block where the vector is added (what
the offset itself says in vocabulary space), ``"final"`` the last block (how the model's next-
token distribution moves). Both are computed by default.

Outputs under ``out``: ``token_shift.json``, ``token_shift.md`` (tables), ``token_shift.csv``
(every counted token) and bar figures ``token_shift_<layer>.png/pdf``.

Run: ``python -m contrans_tl.analyses.token_shift --quick`` (source smollm2-135m-instruct → gemma-3-270m).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

import contrans_tl as ct
from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.analyses import _common as cm
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.files import atomic_write_text, write_json
from contrans_tl.handle import ModelHandle
from contrans_tl.pairing import PairedStates
from contrans_tl.lens import (
    count_tokens,
    lens_resid,
    logits_from_resid,
    shift_csv,
    shift_markdown,
    token_label,
    token_shift,
    topk_overlap,
)
from contrans_tl.tasks.emotion import EMOTIONS, EmotionTask, emotion_task
from contrans_tl.transplant import Unit

__all__ = ["Config", "QUICK", "HELP", "run", "plot", "markdown", "add_args", "config_from_args", "run_cli", "main"]

HELP = "logit-lens token shift of transplanted emotion vectors (paper appendix B.3, Table 8)"

QUICK: dict[str, Any] = {"n_refine": 10, "n_eval": 4, "n_texts": 120}
"""``--quick``: 10 refinement prompts per side, 4 scenarios per other emotion (20 prompts per emotion)."""


@dataclass
class Config(cm.RunSettings):
    """Settings of one token-shift run (each field is a command-line flag; shared ones in :class:`RunSettings`)."""

    source: str = "smollm2-135m-instruct"
    """Model the vectors are refined in: built-in offline name, hub id or local directory."""
    target: str = "gemma-3-270m"
    """Model the vectors are transplanted into and read out from."""
    out: str = "runs/token_shift"
    """Output directory: token_shift.json, .md, .csv and the figures."""
    emotions: tuple[str, ...] = EMOTIONS
    """Emotions whose vectors are read out (the label set is always all six)."""
    n_refine: int | None = None
    """Refinement prompts per side (None: the whole refinement half, 35)."""
    n_eval: int | None = None
    """Scenarios per other emotion used as prompts (None: all 35, 175 prompts per emotion)."""
    alpha: float = 0.3
    """Transplant strength, in ``unit``s."""
    unit: Unit = "norm"
    """"norm" (alpha is a fraction of the target's residual norm) or "raw"."""
    depth: float = 2 / 3
    """Relative depth of the steering layer in both models."""
    lens_layers: tuple[str, ...] = ("steer", "final")
    """Blocks read out: "steer" (the transplant layer), "final" (the last block) or an index."""
    k: int = 10
    """Rising/falling tokens kept per prompt."""
    top: int = 10
    """Tokens shown per table cell (the CSV keeps all)."""
    native: bool = True
    """Also run the target's own (native) vector and report the top-k overlap."""
    n_texts: int | None = None
    """Neutral sentences for the map (None: all 400)."""
    chunk: int = 32
    """Prompts per read-out chunk (bounds memory: chunk × vocabulary probabilities; residuals are small)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.emotions = tuple(self.emotions)
        self.lens_layers = tuple(str(x) for x in self.lens_layers)
        for x in self.lens_layers:
            if x not in ("steer", "final") and not x.lstrip("-").isdigit():
                raise InvalidArgumentError("lens_layers", x, "'steer', 'final' or a block index")
        validate.choice("unit", self.unit, ("norm", "raw"))
        cm.check_shared_fields(self)
        self.alpha = validate.real("alpha", self.alpha)
        for name in ("k", "top", "chunk"):
            validate.integer(name, getattr(self, name), low=1)
        for name in ("source", "target"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise InvalidArgumentError(name, getattr(self, name), "a model name, hub id, folder or .gguf file")


def _lens_index(spec: str, steer: int, n_layers: int) -> int:
    if spec == "steer":
        return steer
    if spec == "final":
        return n_layers - 1
    i = int(spec)
    return i + n_layers if i < 0 else i


def _shifts(model: ModelHandle, before: Float[Tensor, "prompt block d_model"],
            after: Float[Tensor, "prompt block d_model"], block: int, cfg: Config) -> dict[str, Tensor]:
    """Top-k rising/falling ids per prompt from residuals before/after, read-out chunked over prompts."""
    parts = []
    for start in range(0, before.shape[0], cfg.chunk):
        rows = slice(start, start + cfg.chunk)
        p_before = logits_from_resid(model, before[rows, block]).softmax(-1)
        p_after = logits_from_resid(model, after[rows, block]).softmax(-1)
        parts.append(token_shift(p_before, p_after, k=cfg.k))
        del p_before, p_after
    fields = ("rising", "rising_delta", "falling", "falling_delta")
    return {f: torch.cat([getattr(s, f) for s in parts]) for f in fields}


@dataclass
class _Models:
    """The target (still loaded), its steering layer, the map into it and both sides' vectors."""

    target: ModelHandle
    s_layer: int
    t_layer: int
    amap: AffineMap
    source_vectors: dict[str, ConceptVector]
    native: dict[str, ConceptVector]


def _source_side(cfg: Config, task: EmotionTask, texts: list[str],
                 log: cm.RunLog) -> tuple[dict[str, ConceptVector], PairedStates, int]:
    """Load the source once: its emotion vectors, its aligned states and its steering layer."""
    source = log.load(cfg.source, "refine + aligned states", device=cfg.device, dtype=cm.DTYPES[cfg.dtype])
    s_layer = cm.layer_at_depth(int(source.cfg.n_layers), cfg.depth)
    vectors = cm.refine_emotions(source, task, batch_size=cfg.batch_size, log=log, name=cfg.source)
    states = ct.capture_paired(source, texts, layers=[s_layer], scheme="words")
    log.forward(cfg.source, "capture_paired", cm.batches(len(texts), 8))
    return vectors, states, s_layer


def _prepare(cfg: Config, task: EmotionTask, log: cm.RunLog) -> _Models:
    """Source side (the source is dropped after it), then target states, the map and the native vectors."""
    texts = neutral_sentences()[: cfg.n_texts]
    src_vectors, src_states, s_layer = _source_side(cfg, task, texts, log)
    cm.free_memory()
    target = log.load(cfg.target, "aligned states, native vectors, lens read-outs", device=cfg.device,
                      dtype=cm.DTYPES[cfg.dtype])
    t_layer = cm.layer_at_depth(int(target.cfg.n_layers), cfg.depth)
    tgt_states = ct.capture_paired(target, texts, layers=[t_layer], scheme="words")
    log.forward(cfg.target, "capture_paired", cm.batches(len(texts), 8))
    amap = ct.fit_map_from_states(src_states, tgt_states, layers=[(s_layer, t_layer)], seed=cfg.seed)
    native = cm.refine_emotions(target, task, batch_size=cfg.batch_size, log=log, name=cfg.target)
    return _Models(target, s_layer, t_layer, amap, src_vectors, native)


def _read_out(m: _Models, cfg: Config, prompt_sets: dict[str, list[str]], blocks: list[int],
              log: cm.RunLog) -> dict[str, dict[str, dict[int, dict[str, Tensor]]]]:
    """Per emotion and vector (transplanted, native): the top-k shifts at every read-out block."""
    # one pass per prompt set serves every read-out block; "before" is shared by all emotions
    unique = list(dict.fromkeys(p for ps in prompt_sets.values() for p in ps))
    row_of = {p: i for i, p in enumerate(unique)}
    before_all = lens_resid(m.target, unique, blocks, batch_size=cfg.batch_size)
    log.forward(cfg.target, "capture (lens)", cm.batches(len(unique), cfg.batch_size))
    shifts: dict[str, dict[str, dict[int, dict[str, Tensor]]]] = {}
    for emotion, prompts in prompt_sets.items():
        before = before_all[[row_of[p] for p in prompts]]
        mapped = m.amap.apply(m.source_vectors[emotion])
        vectors = {"transplanted": cm.with_norms(mapped, m.native[emotion].layer_norms,
                                                    "the target's native vector of the same emotion")}
        if cfg.native:
            vectors["native"] = m.native[emotion]
        shifts[emotion] = {}
        for name, vector in vectors.items():
            after = lens_resid(m.target, prompts, blocks, vector=vector, alpha=cfg.alpha, unit=cfg.unit,
                               steer_layers=[m.t_layer], batch_size=cfg.batch_size)
            log.forward(cfg.target, "capture (lens)", cm.batches(len(prompts), cfg.batch_size))
            shifts[emotion][name] = {i: _shifts(m.target, before, after, i, cfg) for i in range(len(blocks))}
    return shifts


def _labelled(tok: Any, ids: Tensor, deltas: Tensor) -> list[list[Any]]:
    return [[token_label(tok, t), round(float(d), 6)] for t, d in zip(ids, deltas)]


def _overlap(section: dict[str, Any], emotion: str, tr: dict[str, Tensor], nat: dict[str, Tensor],
             top: int) -> dict[str, Any]:
    """Transplanted vs native: per-prompt top-k overlap and the overlap of the aggregated top lists."""
    agg = {}
    for side in ("rising", "falling"):
        a = {t for t, _ in section["transplanted"][emotion][side][:top]}
        b = {t for t, _ in section["native"][emotion][side][:top]}
        agg[side] = {"shared": len(a & b), "of": top, "jaccard": len(a & b) / max(1, len(a | b))}
    rise = topk_overlap(tr["rising"], nat["rising"])
    fall = topk_overlap(tr["falling"], nat["falling"])
    return {
        "per_prompt_rising": {k: v for k, v in rise.items() if k != "per_prompt_shared"},
        "per_prompt_falling": {k: v for k, v in fall.items() if k != "per_prompt_shared"},
        "aggregate_top": agg,
    }


def _section(tok: Any, cfg: Config, prompt_sets: dict[str, list[str]],
             shifts: dict[str, dict[str, dict[int, dict[str, Tensor]]]], col: int, block: int) -> dict[str, Any]:
    """One read-out block's tables: token counts per vector, two example prompts, the overlaps."""
    section: dict[str, Any] = {"block": block, "transplanted": {}, "native": {}, "overlap": {}, "examples": {}}
    for emotion, prompts in prompt_sets.items():
        for name, per_block in shifts[emotion].items():
            sh = per_block[col]
            section[name][emotion] = {side: count_tokens(sh[side], tok) for side in ("rising", "falling")}
        tr = shifts[emotion]["transplanted"][col]
        section["examples"][emotion] = [
            {"prompt": prompts[i][-120:], "rising": _labelled(tok, tr["rising"][i], tr["rising_delta"][i]),
             "falling": _labelled(tok, tr["falling"][i], tr["falling_delta"][i])}
            for i in range(min(2, len(prompts)))
        ]
        if cfg.native:
            section["overlap"][emotion] = _overlap(section, emotion, tr, shifts[emotion]["native"][col], cfg.top)
    return section


def run(cfg: Config) -> dict[str, Any]:
    """Compute the token-shift tables; writes JSON, markdown and CSV under ``cfg.out``."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = cm.RunLog(verbose=cfg.progress)
    task = emotion_task(cfg.emotions, n_refine=cfg.n_refine, n_eval=cfg.n_eval, seed=cfg.seed, data_dir=cfg.data_dir)
    m = _prepare(cfg, task, log)
    result: dict[str, Any] = {
        "analysis": "token_shift",
        "source": cfg.source,
        "target": cfg.target,
        "source_layer": m.s_layer,
        "target_layer": m.t_layer,
        "map_r2_heldout": float(m.amap.r2_heldout[0]),
        "alpha": cfg.alpha,
        "unit": cfg.unit,
        "k": cfg.k,
        "task": task.describe(),
        "prompts": "each emotion's negatives: other emotions' evaluation scenarios in the refinement query",
        "count": "number of prompts whose top-k rising (falling) tokens include the token",
        "layers": {},
    }
    lens_layers = {spec: _lens_index(spec, m.t_layer, int(m.target.cfg.n_layers)) for spec in cfg.lens_layers}
    blocks = sorted(set(lens_layers.values()))
    prompt_sets = {e: task.negative_prompts(e) for e in cfg.emotions}
    shifts = _read_out(m, cfg, prompt_sets, blocks, log)
    for spec, layer in lens_layers.items():
        result["layers"][spec] = _section(m.target.tokenizer, cfg, prompt_sets, shifts, blocks.index(layer), layer)
    del m
    cm.free_memory()
    result.update(log.summary())
    result["timings_s"] = {"total": round(time.perf_counter() - t0, 2)}
    result["config"] = dataclasses.asdict(cfg)
    write_json(out / "token_shift.json", result)
    result = json.loads((out / "token_shift.json").read_text())
    atomic_write_text(out / "token_shift.md", markdown(result))
    atomic_write_text(out / "token_shift.csv", _csv(result))
    return result


def _table(section: dict[str, Any], name: str) -> dict[str, dict[str, list[tuple[str, int]]]]:
    return {e: {side: [(t, int(n)) for t, n in pairs] for side, pairs in sides.items()}
            for e, sides in section[name].items()}


def markdown(result: dict[str, Any]) -> str:
    """Table-8-style tables per read-out layer (transplanted, then native) and the overlaps."""
    lines = [f"## Token shift: {result['source']} → {result['target']} (alpha {result['alpha']:g}, {result['unit']} units, "
             f"k = {result['k']}, {result['task']['n_negatives_per_emotion']} prompts per emotion)", ""]
    top = result["config"]["top"]
    for spec, section in result["layers"].items():
        where = f"block {section['block']}" + (" (transplant layer)" if spec == "steer" else " (last block)" if spec == "final" else "")
        lines.append(shift_markdown(_table(section, "transplanted"), top=top,
                                    title=f"Transplanted vector, read at {where}"))
        if section.get("native"):
            lines.append(shift_markdown(_table(section, "native"), top=top, title=f"Native vector, read at {where}"))
            lines += ["| emotion | per-prompt shared rising (of k) | per-prompt shared falling | aggregate top rising shared | aggregate top falling shared |",
                      "|---|---|---|---|---|"]
            for e, ov in section["overlap"].items():
                lines.append(f"| {e} | {ov['per_prompt_rising']['mean_shared_fraction']:.2f} | "
                             f"{ov['per_prompt_falling']['mean_shared_fraction']:.2f} | "
                             f"{ov['aggregate_top']['rising']['shared']}/{ov['aggregate_top']['rising']['of']} | "
                             f"{ov['aggregate_top']['falling']['shared']}/{ov['aggregate_top']['falling']['of']} |")
            lines.append("")
    return "\n".join(lines)


def _csv(result: dict[str, Any]) -> str:
    rows = []
    for spec, section in result["layers"].items():
        for name in ("transplanted", "native"):
            if section.get(name):
                body = shift_csv(_table(section, name)).splitlines()[1:]  # without its header
                rows += [f"{spec},{name},{line}" for line in body]
    return "layer,vector," + "concept,direction,rank,token,count\n" + "\n".join(rows) + "\n"


def plot(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Per read-out layer: one panel per emotion, bars of the top rising tokens' counts."""
    from contrans_tl import plotting

    written: list[Path] = []
    top = result["config"]["top"]
    for spec, section in result["layers"].items():
        fig = plotting.token_shift_bars(
            {e: row["rising"][:top] for e, row in section["transplanted"].items()},
            native={e: row.get("rising", []) for e, row in section.get("native", {}).items()},
            n_prompts=result["task"]["n_negatives_per_emotion"],
            title=f"Tokens rising most, {result['source']} → {result['target']}, block {section['block']} ({spec})",
        )
        written += plotting.save_figure(fig, Path(out) / f"token_shift_{spec}")
    return written


# ---- command line ---------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", type=flags.model_flag)
    p.add_argument("--target", type=flags.model_flag)
    p.add_argument("--out", type=flags.out_dir_flag, help=f"output directory (default {Config.out})")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (flags below override)")
    cm.add_size_args(p)
    p.add_argument("--alpha", type=flags.finite_float_flag)
    p.add_argument("--unit", choices=["norm", "raw"])
    p.add_argument("--lens-layers", type=flags.name_list_flag, help="comma-separated: steer, final, or block indices")
    p.add_argument("--k", type=flags.positive_int_flag, help="rising/falling tokens kept per prompt")
    p.add_argument("--top", type=flags.positive_int_flag, help="tokens shown per table cell")
    p.add_argument("--chunk", type=flags.positive_int_flag, help="prompts per read-out chunk")
    p.add_argument("--no-native", dest="native", action="store_false", default=None)
    cm.add_run_args(p)


def config_from_args(args: argparse.Namespace) -> Config:
    return cm.config_from_args(Config, QUICK, args)


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run(cfg)
    if not args.no_plot:
        plot(result, cfg.out)
    print(markdown(result))
    print(f"wrote {Path(cfg.out) / 'token_shift.json'}, token_shift.md, token_shift.csv "
          f"({result['timings_s']['total']:.0f} s, {result['model_loads']} model loads)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cm.script_main("token_shift", HELP, add_args, run_cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
