"""Issue #23's levers on the frontier: which map carries the emotions into the target.

One run loads the pair once, measures the target's native frontier once, and for every lever —
a map corpus, a map estimator, a source layer — fits the map, pushes the six emotion vectors
through it and measures the mapped frontier (KL on generic text, accuracy on validation and test
items) at one target layer. Each lever's transfer efficiency at equal KL comes with its bootstrap
interval; levers are compared on **validation** items, and the test numbers are reported beside
them (the choice never reads them). Cells are kept under ``--out`` (a killed run resumes).

    python -m bench.levers --out /tmp/levers                                   # the default pair, the default levers
    python -m bench.levers --target qwen2.5-coder-1.5b-instruct --layer 22 --emotions happiness,sadness,anger \\
        --n-negatives 4 --n-fluency-texts 8 --levers "neutral:ridge:24;concept:ridge:24" --out /tmp/lq

A lever is ``CORPUS:ESTIMATOR:SOURCE_LAYER[:RANK]`` (``--levers`` joins several with ``;``); CORPUS is
a map-corpus spec (``neutral``, ``concept``, ``concept+neutral``, ``wikisplit:PATH:N``, ``file:PATH``).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.analyses import emotion_transfer as et
from contrans_tl.analyses._frontier_run import Direction, Frontier, efficiency
from contrans_tl.analyses._transfer_run import concept_texts, start_run
from contrans_tl.capture import check_layers
from contrans_tl.corpus import resolve_corpus
from contrans_tl.entry import CommandParser, run_reporting_errors, split_debug
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.files import atomic_write_text, write_json
from contrans_tl.metrics import layer_cosine
from contrans_tl.reformulate import capture_pair, fit_map_from_states

__all__ = ["DEFAULT_LEVERS", "parse_levers", "measure_levers", "main"]

DEFAULT_LEVERS = ("neutral:ridge:24;concept:ridge:24;concept+neutral:ridge:24;"
                  "concept:rrr:24:64;concept:whitened:24;concept:procrustes:24;concept:ridge:20;concept:ridge:28")
"""The default pair's levers at target layer 14 (the demo's): corpora with the default estimator, estimators
on the concept's own text, and the source layer around the depth-matched one (24)."""

PROTOCOL = et.PROTOCOL + "; levers 1"


def parse_levers(text: str) -> list[dict[str, Any]]:
    """``CORPUS:ESTIMATOR:SOURCE_LAYER[:RANK]`` items joined by ``;`` (a corpus spec may hold ':' itself)."""
    accepted = "CORPUS:ESTIMATOR:SOURCE_LAYER[:RANK] items joined by ';'"
    out = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        parts = item.rsplit(":", 3)
        rank = None
        if len(parts) == 4 and parts[1] in validate.MAP_ESTIMATORS:
            corpus, estimator, layer, rank = parts[0], parts[1], parts[2], parts[3]
        elif len(parts) >= 3:
            corpus, estimator, layer = item.rsplit(":", 2)
        else:
            raise InvalidArgumentError("levers", item, accepted)
        validate.corpus_spec("levers", corpus)
        validate.choice("levers", estimator, validate.MAP_ESTIMATORS)
        if not layer.isdigit() or (rank is not None and not rank.isdigit()):
            raise InvalidArgumentError("levers", item, accepted + " (layer and rank: whole numbers)")
        out.append({"name": item, "corpus": corpus, "estimator": estimator, "source_layer": int(layer),
                    "rank": None if rank is None else int(rank)})
    if not out:
        raise InvalidArgumentError("levers", text, accepted)
    return out


def measure_levers(cfg: et.Config, levers: list[dict[str, Any]], layer: int, log: Any = print) -> dict[str, Any]:
    """Native frontier once, then every lever's mapped frontier and transfer efficiency (validation and test)."""
    t0 = time.time()
    concepts = et._concepts(cfg)
    run = start_run(cfg, concepts, PROTOCOL)
    check_layers(run.target, [layer])
    native = {c.name: run.in_reference_unit(run.vector(run.target, "native", c.concept)) for c in concepts}
    fr = Frontier(run, {}, native)
    layers = (layer,)
    base = {s: fr.baseline(s) for s in ("validation", "test")}
    log(f"native frontier at layer {layer}")
    native_curves = {s: {c: got[c] for c, got in zip(fr.concepts, fr.measure(
        [(Direction("native", c, layers, native[c]), cfg.alphas) for c in fr.concepts], s))} for s in base}
    texts = concept_texts(concepts)
    rows: list[dict[str, Any]] = []
    for lever in levers:
        name = lever["name"]
        log(f"lever {name}")
        corpus = resolve_corpus(lever["corpus"], concept_texts=texts)
        check_layers(run.source, [lever["source_layer"]])
        xs, ys = capture_pair(run.source, run.target, list(corpus.texts), [lever["source_layer"]], [layer],
                              batch_size=cfg.batch_size)
        amap = fit_map_from_states(xs, ys, layers=[(lever["source_layer"], layer)], estimator=lever["estimator"],
                                   rank=lever["rank"], seed=cfg.seed, outlier_factor=cfg.outlier_factor, corpus=corpus)
        mapped = {c.name: run.in_reference_unit(amap.apply(run.vector(run.source, "source", c.concept))) for c in concepts}
        directions = [(Direction(f"mapped[{name}]", c, layers, mapped[c]), cfg.alphas) for c in fr.concepts]
        curves = {s: {c: got[c] for c, got in zip(fr.concepts, fr.measure(directions, s))} for s in base}
        te = {s: efficiency(base[s], curves[s], native_curves[s], cfg.te_kl_range, cfg.seed, fr.item_ids(s)) for s in base}
        cos = {c: float(layer_cosine(mapped[c].vectors, native[c].vectors)[layer]) for c in fr.concepts}
        rows.append({**lever, "n_texts": len(corpus.texts), "n_train_samples": amap.provenance.get("n_train_samples"),
                     "r2_heldout": float(amap.r2_heldout[0]), "cosine": cos, "cosine_mean": sum(cos.values()) / len(cos),
                     "te_validation": {k: te["validation"][k] for k in ("value", "ci95", "by_metric", "per_concept")},
                     "te_test": {k: te["test"][k] for k in ("value", "ci95", "by_metric", "per_concept")}})
        log(f"  R2 {rows[-1]['r2_heldout']:.3f}  cos {rows[-1]['cosine_mean']:.3f}  TE validation "
            f"{_fmt(te['validation']['value'])} {te['validation']['ci95']}  test {_fmt(te['test']['value'])}")
    best = max(rows, key=lambda r: r["te_validation"]["value"] if r["te_validation"]["value"] is not None else -math.inf)
    return {"source": cfg.source, "target": cfg.target, "target_layer": layer, "alphas": list(cfg.alphas),
            "te_kl_range": list(cfg.te_kl_range), "emotions": list(cfg.emotions), "n_negatives": cfg.n_negatives,
            "n_validation": cfg.n_validation, "n_fluency_texts": cfg.n_fluency_texts,
            "chosen_on_validation": best["name"], "levers": rows, "seconds": round(time.time() - t0, 1)}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Levers, {result['source']} → {result['target']} layer {result['target_layer']} "
             f"(transfer efficiency at equal KL {result['te_kl_range'][0]}–{result['te_kl_range'][1]} nats/token; "
             f"chosen on validation: **{result['chosen_on_validation']}**):", "",
             "| lever (corpus:estimator:source layer) | texts | held-out R² | cos(mapped, native) | TE validation [95 % CI] | TE test [95 % CI] |",
             "|---|---|---|---|---|---|"]
    for r in result["levers"]:
        v, t = r["te_validation"], r["te_test"]
        ci = lambda c: "–" if not c else f"[{c[0]:.2f}, {c[1]:.2f}]"  # noqa: E731
        lines.append(f"| {r['name']} | {r['n_texts']} | {r['r2_heldout']:.2f} | {r['cosine_mean']:.2f} | "
                     f"{_fmt(v['value'])} {ci(v['ci95'])} | {_fmt(t['value'])} {ci(t['ci95'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    p = CommandParser(prog="python -m bench.levers", description=__doc__.splitlines()[0])
    p.add_argument("--source", type=flags.model_flag, default="smollm2-135m-instruct")
    p.add_argument("--target", type=flags.model_flag, default="gemma-3-270m")
    p.add_argument("--layer", type=flags.nonnegative_int_flag, default=14, help="target layer (default 14, the demo's)")
    p.add_argument("--levers", type=flags.text_flag, default=DEFAULT_LEVERS,
                   help="CORPUS:ESTIMATOR:SOURCE_LAYER[:RANK] items joined by ';'")
    p.add_argument("--emotions", type=flags.name_list_flag, default=et.EMOTIONS)
    p.add_argument("--n-negatives", type=flags.positive_int_flag, default=10)
    p.add_argument("--n-validation", type=flags.positive_int_flag, default=4)
    p.add_argument("--n-fluency-texts", type=flags.positive_int_flag, default=19)
    p.add_argument("--alphas", type=flags.float_list_flag, default=None)
    p.add_argument("--threads", type=flags.positive_int_flag)
    p.add_argument("--out", type=flags.out_dir_flag, required=True)
    try:
        args = p.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)

    def go() -> int:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        levers = parse_levers(args.levers)
        cfg = et.Config(source=args.source, target=args.target, out=args.out, emotions=tuple(args.emotions),
                        n_negatives=args.n_negatives, n_validation=args.n_validation,
                        n_fluency_texts=args.n_fluency_texts, layers=(args.layer,),
                        **({"alphas": tuple(args.alphas)} if args.alphas else {}))
        result = measure_levers(cfg, levers, args.layer, log=lambda m: print(m, file=sys.stderr, flush=True))
        write_json(Path(args.out) / "levers.json", result)
        atomic_write_text(Path(args.out) / "levers.md", markdown(result))
        print(markdown(result))
        return 0

    return run_reporting_errors(go, debug=debug)


if __name__ == "__main__":
    raise SystemExit(main())
