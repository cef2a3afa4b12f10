"""The transfer job, end to end: the three steps, the frontier, the operating point, tests and artifacts.

``contrans transfer`` (one concept file) and ``contrans demo`` (the six emotions) are both this
job on their own concepts; the demo adds its paper figures on top (:mod:`.emotion_transfer`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Any

import contrans_tl as ct
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.metrics import layer_cosine
from contrans_tl.offline import describe_weights
from contrans_tl.sweep import cell_key
from contrans_tl.tasks.concept import ItemScores
from contrans_tl.tasks.frontier import Point

from contrans_tl.analyses._frontier_run import (Frontier, accuracy_cell, efficiency, mean_ci, native_at,
                                                paired_tests, random_scores, row)
from contrans_tl.analyses._transfer_run import ConceptRun, TransferRun, TransferSettings, log, start_run

__all__ = ["Job", "run_job", "GOALS"]

GOALS = {"transfer_efficiency": 0.8, "significant_share": 5 / 6, "alpha": 0.05}
"""What the transfer is reported against (issue #23): transfer efficiency ≥ 0.8, and 5 of 6 concepts
significantly (Holm-adjusted p < 0.05) above the unsteered model and above the random directions on test items."""


@dataclass
class Job:
    """A finished job: the run (models, cells), its vectors and the result written to results.json."""

    run: TransferRun
    frontier: Frontier
    """The run's measurements (cells), for what an analysis adds on top."""
    amap: AffineMap
    mapped: dict[str, ConceptVector]
    native: dict[str, ConceptVector]
    layers: tuple[int, ...]
    alphas: dict[str, float]
    """The operating alpha of each concept (0 when none was within the KL bound)."""
    result: dict[str, Any]


def _frontier_rows(fr: Frontier, layers: tuple[int, ...], curves: dict[str, dict[str, dict[str, list[Point]]]],
                   base: dict[str, dict[str, ItemScores]], random_rows: dict[str, list[dict[str, Any]]],
                   prompting: dict[str, ItemScores]) -> list[dict[str, Any]]:
    """Every measured point as a row: baseline, mapped and native at every alpha, every random point, prompting."""
    rows: list[dict[str, Any]] = []
    for split in ("validation", "test"):
        for c in fr.concepts:
            rows.append(row(c, "baseline", split, 0.0, base[split][c], None, layers=list(layers)))
            for cond in ("mapped", "native"):
                direction = fr.direction(cond, c, layers)
                for p in curves[cond][split][c]:
                    flu = fr.fluency({cell_key(fl=direction.name, alpha=p.alpha): direction.steering(p.alpha)})
                    rows.append(row(c, cond, split, p.alpha, p.scores, next(iter(flu.values())), layers=list(layers)))
        for r in random_rows[split]:
            d = fr.direction("random", r["seeded_by"], layers, r["seed"])
            flu = fr.fluency({cell_key(fl=d.name, alpha=r["point"].alpha): d.steering(r["point"].alpha)})
            rows.append(row(r["target"], "random", split, r["point"].alpha, r["point"].scores, next(iter(flu.values())),
                            seed=r["seed"], direction=r["direction"], layers=list(layers)))
    for c, scores in prompting.items():
        rows.append(row(c, "prompting", "test", 0.0, scores, None, instruction=fr.concepts[c].concept.instruction))
    return rows


def _operating_table(fr: Frontier, op: dict[str, dict[str, Any]], curves: dict[str, Any], base: dict[str, ItemScores],
                     rnd: dict[str, Any], prompting: dict[str, ItemScores]) -> dict[str, Any]:
    """Per concept at its operating point, on test items: every condition's Token / Logit Acc with intervals."""
    table: dict[str, Any] = {}
    for c in fr.concepts:
        at = {p.alpha: p for p in curves["mapped"]["test"][c]}
        native_same = {p.alpha: p for p in curves["native"]["test"][c]}
        entry: dict[str, Any] = {"alpha": op[c]["alpha"], "kl": op[c]["kl"], "baseline": accuracy_cell(base[c])}
        if op[c]["alpha"] > 0:
            entry["mapped"] = accuracy_cell(at[op[c]["alpha"]].scores)
            entry["native_same_alpha"] = accuracy_cell(native_same[op[c]["alpha"]].scores)
            entry["native_same_alpha"]["kl"] = native_same[op[c]["alpha"]].kl
            for m in ("logit", "token", "both"):
                entry.setdefault("native_at_kl", {})[m] = native_at(curves["native"]["test"][c], base[c], op[c]["kl"], m)
            values, n = rnd[c]
            entry["random_at_kl"] = {"score": float(values.mean()) if n else None, "ci95": mean_ci(values) if n else None,
                                     "points": n}
        if c in prompting:
            entry["prompting"] = accuracy_cell(prompting[c])
        table[c] = entry
    return table


def _save_vectors(job_run: TransferRun, mapped: dict[str, ConceptVector], layers: tuple[int, ...],
                  op: dict[str, dict[str, Any]]) -> dict[str, str]:
    """artifacts/mapped_<concept>.safetensors: each transplanted vector with its norm reference and operating point,
    ready for ``contrans export --unit norm``."""
    paths = {}
    for c, v in mapped.items():
        path = job_run.art / f"mapped_{c}.safetensors"
        dataclasses.replace(v.restrict(list(layers)), provenance={
            **v.provenance, "operating_point": {"layers": list(layers), "alpha": op[c]["alpha"], "unit": "norm",
                                                "kl": op[c]["kl"], "kl_bound": job_run.cfg.kl_bound}}).save(path)
        paths[c] = str(path)
    return paths


def run_job(cfg: TransferSettings, concepts: list[ConceptRun], *, protocol: str) -> Job:
    """Run the whole job; finished cells and artifacts under ``cfg.out`` are reused."""
    t0 = time.time()
    run = start_run(cfg, concepts, protocol)
    amap = run.fit_or_load_map()
    with run.phases.phase("refine vectors"):
        mapped, native = run.refine_vectors(amap)
    fr = Frontier(run, mapped, native)
    log(f"validation: choosing the layer among {run.layer_sets()} and each concept's alpha within KL {cfg.kl_bound}")
    with run.phases.phase("validation: mapped frontier, operating point"):
        selection = fr.choose()
    layers = tuple(selection["layers"])
    op = copy.deepcopy(selection["per_layer"]["-".join(map(str, layers))]["concepts"])
    chosen = ", ".join(f"{c}: {o['alpha']:g}" for c, o in op.items())
    log(f"operating point: layers {list(layers)}, alphas {{{chosen}}}")
    curves: dict[str, dict[str, dict[str, list[Point]]]] = {"mapped": {}, "native": {}}
    for cond in ("mapped", "native"):
        with run.phases.phase(f"test: {cond} frontier"):
            for split in ("validation", "test"):
                measured = fr.measure([(fr.direction(cond, c, layers), cfg.alphas) for c in fr.concepts], split)
                curves[cond][split] = {c: got[c] for c, got in zip(fr.concepts, measured)}
    with run.phases.phase("test: random directions"):
        grid = fr.random_grid(layers)
        pooled, random_rows = {}, {}
        for split in ("validation", "test"):
            pooled[split], random_rows[split] = fr.random_points(layers, grid["alphas"], split)
    with run.phases.phase("test: prompting baseline"):
        prompting = fr.prompting()
    base = {split: fr.baseline(split) for split in ("validation", "test")}

    metric = fr.metric
    rnd = random_scores(pooled["test"], op, metric)
    at_op = {c: next(p.scores for p in curves["mapped"]["test"][c] if p.alpha == op[c]["alpha"])
             for c in fr.concepts if op[c]["alpha"] > 0}
    tests = paired_tests(at_op, base["test"], rnd, metric, cfg.seed)
    significant = {t: sum(1 for r in tests.values() if (r.get(f"{t}_p_holm") or 1) < GOALS["alpha"])
                   for t in ("vs_baseline", "vs_random")}
    te = efficiency(base["test"], curves["mapped"]["test"], curves["native"]["test"], cfg.te_kl_range, cfg.seed,
                    fr.item_ids("test"))
    te_val = efficiency(base["validation"], curves["mapped"]["validation"], curves["native"]["validation"],
                        cfg.te_kl_range, cfg.seed, fr.item_ids("validation"))
    for c in op:
        d = fr.direction("mapped", c, layers)
        if op[c]["alpha"] > 0:
            flu = next(iter(fr.fluency({cell_key(fl=d.name, alpha=op[c]["alpha"]): d.steering(op[c]["alpha"])}).values()))
            op[c].update(dce=flu.dce, ppl_ratio=flu.ppl_ratio, kl_ci95=list(flu.kl_ci95))
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "source": {**asdict(ct.identity(run.source)), "weights": describe_weights(cfg.source)},
        "target": {**asdict(ct.identity(run.target)), "weights": describe_weights(cfg.target)},
        "concepts": {c.name: {"description": c.concept.description, "n_pairs": len(c.concept.positive),
                              "n_validation": len(c.split.validation), "n_test": len(c.split.test), "split": c.split.how,
                              "prefix": bool(c.concept.prefix), "instruction": c.concept.instruction}
                     for c in concepts},
        "map": {"pairs": amap.pairs, "r2_heldout": [round(float(x), 4) for x in amap.r2_heldout],
                "ridge": amap.ridge.tolist(), **amap.provenance},
        "norm_reference": {"what": "target's mean resid_post norm at the last token of every contrast prompt",
                           "layers": {str(t): round(float(run.reference_norms()[t]), 4) for t in run.candidate_layers()}},
        "fluency": {"what": "KL(unsteered || steered) and change of cross-entropy per token, every token of the "
                            "built-in generic text (contrans_tl/data/generic.txt), whole vocabulary",
                    "n_texts": len(run.fluency_texts), "n_tokens": _fluency_tokens(fr, layers)},
        "selection": selection,
        "layers": list(layers),
        "operating_point": {"layers": list(layers), "kl_bound": cfg.kl_bound, "unit": "norm", "concepts": op},
        "random_grid": grid,
        "cosine_mapped_native": {c: float(layer_cosine(mapped[c].vectors, native[c].vectors)[list(layers)].mean())
                                 for c in fr.concepts},
        "transfer_efficiency": te,
        "transfer_efficiency_validation": te_val,
        "tests": tests,
        "table": _operating_table(fr, op, curves, base["test"], rnd, prompting),
        "goals": {"targets": GOALS, "transfer_efficiency": te["value"], "transfer_efficiency_ci95": te["ci95"],
                  "significant": significant, "n_concepts": len(fr.concepts)},
        "frontier": _frontier_rows(fr, layers, curves, base, random_rows, prompting),
        "artifacts": _save_vectors(run, mapped, layers, op),
        "broken": [{"direction": d, "alpha": a} for d, a in sorted(fr.broken)],
    }
    result["seconds"] = round(time.time() - t0, 1)
    return Job(run, fr, amap, mapped, native, layers, {c: float(op[c]["alpha"]) for c in op}, result)


def _fluency_tokens(fr: Frontier, layers: tuple[int, ...]) -> int | None:
    """Tokens scored per fluency measurement (read from any stored cell of the chosen layer)."""
    first = next(iter(fr.concepts))
    d = fr.direction("mapped", first, layers)
    a = fr.run.cfg.alphas[0]
    cell = fr.fluency({cell_key(fl=d.name, alpha=a): d.steering(a)})
    return next(iter(cell.values())).n_tokens

