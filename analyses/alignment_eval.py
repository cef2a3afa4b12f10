"""Alignment evaluations of the paper (§5, appendix B.1/B.5): honesty, fairness, both at once.

For each concept the same rows are computed on the target model:

* **Base** — no intervention.
* **ConTrans** — the concept refined in the source model, reformulated with an affine map fitted
  on neutral text (:func:`~contrans_tl.fit_map`), transplanted into the target.
* **Self-Align** — the concept refined in the target itself (or in its instruct sibling,
  ``self_align_model``) and added the same way.
* **Inst-Align** — no vector: an instruction in front of every prompt.
* **Align-Training** — the instruct model's own score (``instruct_model``; skipped without one).

Honesty (:mod:`.alignment_honesty`) is scored by TruthfulQA MC1, fairness
(:mod:`.alignment_fairness`) by the toxicity of continuations of held-out ToxiGen prompts, and
fluency by the perplexity of neutral WikiSplit sentences under each intervention. "multi"
transplants both concepts together (Table 7).

Alpha (in units of the layer's mean residual norm by default) is chosen on a validation split
by grid search and reported on a disjoint test split; with ``folds >= 2`` the questions are
cross-fitted, so every question is tested once with an alpha chosen on other questions.

Run: ``python -m contrans_tl.analyses.alignment_eval --data-dir ../shared/data`` (or ``contrans align-eval``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import contrans_tl as ct
from contrans_tl import flags
from contrans_tl.artifacts import AffineMap
from contrans_tl.capture import check_layers
from contrans_tl.datasets import neutral_sentences
from contrans_tl.files import atomic_write_text, json_ready, write_json
from contrans_tl.handle import ModelHandle
from contrans_tl.reformulate import default_layer_pairs
from contrans_tl.sweep import CellStore, settings_fingerprint
from contrans_tl.tasks.perplexity import load_wikisplit
from contrans_tl.tasks.truthfulqa import mc1_from_scores

from contrans_tl.analyses._common import DTYPES, script_main
from contrans_tl.analyses.alignment_fairness import FairnessOutcome, fairness, generate_items
from contrans_tl.analyses.alignment_honesty import HonestyOutcome, honesty
from contrans_tl.analyses.alignment_setup import (
    CONDITIONS,
    METHOD_NAMES,
    TASKS,
    AlignmentRun,
    Config,
    Steer,
    data_path,
    default_layers,
)

__all__ = ["Config", "run", "write_outputs", "markdown_tables", "add_args", "config_from_args", "run_cli", "main",
           "default_layers", "HELP", "TASKS", "CONDITIONS", "METHOD_NAMES"]

HELP = "alignment evaluations (TruthfulQA MC1, ToxiGen toxicity, perplexity; paper §5)"


# ---- one run ----------------------------------------------------------------------------------------
def _load(cfg: Config, name: str) -> ModelHandle:
    return ct.load_model(name, device=cfg.device, dtype=DTYPES[cfg.dtype])


def _fit_or_load_map(r: AlignmentRun, source: ModelHandle) -> AffineMap:
    """The source → target map at the steered layers; a rerun with the same settings reuses it."""
    cfg = r.cfg
    pairs_all = {t: s for s, t in default_layer_pairs(int(source.cfg.n_layers), int(r.target.cfg.n_layers))}
    map_path = Path(cfg.out) / "cells" / "map.safetensors"
    with r.timed("fit_map"):
        if map_path.is_file():  # same settings (the store checked them): reuse the fitted map
            return AffineMap.load(map_path)
        amap = ct.fit_map(source, r.target, neutral_sentences()[: cfg.map_texts],
                          layers=[(pairs_all[t], t) for t in r.layers], batch_size=cfg.batch_size,
                          progress=cfg.progress)
        amap.save(map_path)
    return amap


def _prepare(cfg: Config) -> AlignmentRun:
    """Load the models the conditions need, fit the map, read the perplexity sentences."""
    t0 = time.perf_counter()
    target = _load(cfg, cfg.target)
    layers = tuple(cfg.layers) if cfg.layers else default_layers(int(target.cfg.n_layers))
    check_layers(target, layers)
    r = AlignmentRun(cfg, target, layers, store=CellStore(Path(cfg.out) / "cells", settings=settings_fingerprint(cfg)))
    r.timings["load_target"] = round(time.perf_counter() - t0, 2)
    if "transplant" in cfg.conditions:
        with r.timed("load_source"):
            r.source = source = _load(cfg, cfg.source)
        r.amap = _fit_or_load_map(r, source)
    if "self-align" in cfg.conditions:
        r.self_model = _load(cfg, cfg.self_align_model) if cfg.self_align_model else target
    if "align-training" in cfg.conditions and cfg.instruct_model:
        r.instruct = _load(cfg, cfg.instruct_model)
    wiki = data_path(cfg, cfg.wikisplit, "wikisplit")
    if wiki is not None and cfg.n_ppl > 0:
        r.ppl_texts = load_wikisplit(wiki, n=cfg.n_ppl)
    return r


def _multi(run: AlignmentRun, honest: HonestyOutcome, fair: FairnessOutcome) -> dict[str, Any]:
    """Honesty and fairness transplanted together (Table 7): MC1 and toxicity for each combination."""
    mc, tox = honest.mc, fair.tox
    h_steers, f_steer = honest.chosen["transplant"], fair.chosen["transplant"][0]
    h_rows, f_rows = honest.result["rows"], fair.result["rows"]
    questions = mc.questions
    test_all = sorted(i for s in honest.splits for i in s.test)

    def mc1_with(extra: Steer | None, with_honesty: bool) -> float:
        per_q: dict[int, list[float]] = {}
        for split, h in zip(honest.splits, h_steers):
            steers = ([h] if with_honesty else []) + ([extra] if extra is not None else [])
            key = ("multi", split.fold, with_honesty, extra is not None)
            per_q.update(zip(split.test, mc.scores(key, split.test, steers)))
        return mc1_from_scores([per_q[i] for i in test_all], [questions[i].correct for i in test_all]).accuracy

    def tox_with(steers: list[Steer]) -> dict[str, Any]:
        return tox(generate_items(run, run.target, fair.test_prompts, steers))

    rows: dict[str, Any] = {}
    with run.timed("multi"):
        rows["base"] = {"mc1": h_rows["base"]["mc1"] if "base" in h_rows else mc.result("base", test_all).accuracy,
                        "toxicity": f_rows.get("base") or tox_with([])}
        rows["honesty"] = {"mc1": h_rows["transplant"]["mc1"], "toxicity": tox_with([h_steers[0]])}
        rows["fairness"] = {"mc1": mc1_with(f_steer, False), "toxicity": f_rows["transplant"]}
        rows["honesty+fairness"] = {"mc1": mc1_with(f_steer, True), "toxicity": tox_with([h_steers[0], f_steer])}
    for r in rows.values():
        r["toxicity"] = {k: v for k, v in r["toxicity"].items() if k != "examples"}
    return {"rows": rows, "alphas": {"honesty": [s[1] for s in h_steers], "fairness": f_steer[1]},
            "note": "toxicity of rows with honesty uses fold 0's honesty vector"}


def run(cfg: Config) -> dict[str, Any]:
    """Run the configured evaluations; returns the JSON-ready result (also written to ``cfg.out``)."""
    t0 = time.perf_counter()
    tasks = set(cfg.tasks) | ({"honesty", "fairness"} if "multi" in cfg.tasks else set())
    r = _prepare(cfg)
    result: dict[str, Any] = {
        "source": cfg.source,
        "target": cfg.target,
        "target_layers_searched": list(r.layers),
        "unit": cfg.unit,
        "map_r2_heldout": None if r.amap is None else [round(float(x), 4) for x in r.amap.r2_heldout],
        "perplexity_data": "WikiSplit" if r.ppl_texts else None,
    }
    honest = honesty(r) if "honesty" in tasks else None
    fair = fairness(r) if "fairness" in tasks else None
    if honest is not None:
        result["honesty"] = honest.result
    if fair is not None:
        result["fairness"] = fair.result
    if "multi" in cfg.tasks and honest is not None and fair is not None:
        result["multi"] = _multi(r, honest, fair)
    r.timings["total"] = round(time.perf_counter() - t0, 2)
    result["timings_s"] = r.timings
    result["config"] = dataclasses.asdict(cfg)
    result = json_ready(result)
    write_outputs(result, cfg.out)
    return result


# ---- outputs ----------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _tox_cell(row: dict[str, Any] | None) -> str:
    if not row or "percent_above" not in row:
        return "–"
    cell = f"{row['percent_above']:.1f}" if row.get("is_toxicity") else f"{row['percent_above']:.1f} (mean {row['mean_score']:.3f})"
    if row.get("n_empty"):
        cell += f", {row['n_empty']}/{row['n']} empty"
    return cell


def _mc1_cell(row: dict[str, Any] | None) -> str:
    if not row:
        return "–"
    ci = row.get("mc1_ci95")
    return _pct(row["mc1"]) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")


def _ppl_cell(row: dict[str, Any] | None) -> str:
    if not row or "ppl" not in row:
        return "–"
    ci = row.get("ppl_ci95")
    return f"{row['ppl']:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def _method_row(cond: str, h: dict[str, Any], f: dict[str, Any]) -> str:
    """One table line: the method's MC1 and perplexity, toxicity and perplexity (95 % intervals), and alphas."""
    cells = [METHOD_NAMES[cond]]
    if h:
        cells += [_mc1_cell(h.get(cond)), _ppl_cell(h.get(cond))]
    if f:
        row = f.get(cond)
        cells += [_tox_cell(row), _ppl_cell(row)]
    alphas = [f"{name}: {rows[cond]['alpha']}" for name, rows in (("h", h), ("f", f))
              if rows.get(cond, {}).get("alpha") is not None]
    cells.append("; ".join(alphas) or "–")
    return "| " + " | ".join(cells) + " |"


def markdown_tables(result: dict[str, Any]) -> str:
    """The paper-shaped tables: methods × (TruthfulQA MC1, Toxic %, perplexity), then Table 7."""
    h = result.get("honesty", {}).get("rows", {})
    f = result.get("fairness", {}).get("rows", {})
    scorer = result.get("fairness", {}).get("scorer")
    tox_head = "Toxic % ↓"
    notes = []
    if scorer and not scorer["is_toxicity_classifier"]:
        tox_head = "Stand-in % > 0.5 (NOT toxicity)"
        notes.append(f"Fairness column: scored by *{scorer['name']}*; these numbers are not toxicity.")
    elif scorer:
        notes.append(f"Toxic %: share of continuations scored > 0.5 by {scorer['name']}.")
    lines = [f"## Alignment: {result['source']} → {result['target']}", ""]
    head = ["Method"] + (["TruthfulQA MC1 (%) [95 % CI] ↑", "PPL (honesty) [95 % CI] ↓"] if h else []) \
        + ([tox_head, "PPL (fairness) [95 % CI] ↓"] if f else []) + ["alpha"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_method_row(c, h, f) for c in ("base", "align-training", "inst-align", "self-align", "transplant")
              if c in h or c in f]
    hon = result.get("honesty")
    if hon:
        notes.append(f"MC1 over {hon['n_test']} of {hon['n_questions']} TruthfulQA questions "
                     f"(concept: {hon['concept']}; {len(hon['folds'])} fold(s), alpha chosen on validation "
                     "questions disjoint from each fold's test and refinement questions, "
                     f"{hon.get('selection', '')}).")
        notes.append("Intervals: MC1 95 % Wilson; perplexity 95 % bootstrap over the sentences (folds: their mean).")
    multi = result.get("multi")
    if multi:
        lines += ["", "### Multi-concept transplantation (Table 7)", "",
                  f"| Concepts transplanted | TruthfulQA MC1 (%) ↑ | {tox_head} |", "|---|---|---|"]
        for name, row in multi["rows"].items():
            lines.append(f"| {name} | {_pct(row['mc1'])} | {_tox_cell(row['toxicity'])} |")
    lines += _frontier_lines(result)
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _frontier_lines(result: dict[str, Any]) -> list[str]:
    """The frontier of every alpha search: validation score against KL on generic text, per grid point."""
    searches: list[tuple[str, dict[str, Any]]] = []
    for fold in result.get("honesty", {}).get("folds", []):
        searches += [(f"honesty {METHOD_NAMES[c]}, fold {fold['fold']} (validation MC1)", fold[c])
                     for c in ("transplant", "self-align") if c in fold]
    searches += [(f"fairness {METHOD_NAMES[c]} (validation toxicity score)", rec)
                 for c, rec in result.get("fairness", {}).get("search", {}).items()]
    if not searches:
        return []
    lines = ["", "### Frontier: validation score against KL on generic text (nats/token; * within the bound; "
             "the chosen alpha in bold)", ""]
    for name, rec in searches:
        cells = []
        for p in rec["frontier"]:
            kl = "–" if p["kl"] is None else f"{p['kl']:.3f}"
            val = "broken" if p["validation_score"] is None else f"{p['validation_score']:.3f}"
            text = f"α {p['alpha']:g}: KL {kl}{'*' if p['allowed'] else ''} → {val}"
            cells.append(f"**{text}**" if p["alpha"] == rec["alpha"] and p["layers"] == rec["layers"] else text)
        lines.append(f"- {name}: " + "; ".join(cells))
    return lines


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``alignment_eval.json`` and ``alignment_eval.md`` in ``out_dir``."""
    out = Path(out_dir)
    js = write_json(out / "alignment_eval.json", result)
    md = atomic_write_text(out / "alignment_eval.md", markdown_tables(result))
    return js, md


# ---- command line -----------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``contrans align-eval`` / ``python -m contrans_tl.analyses.alignment_eval``."""
    d = Config()
    p.add_argument("--source", type=flags.model_flag, default=d.source)
    p.add_argument("--target", type=flags.model_flag, default=d.target)
    p.add_argument("--tasks", type=flags.name_list_flag, default=d.tasks, help="comma-separated: honesty,fairness,multi")
    p.add_argument("--conditions", type=flags.name_list_flag, default=d.conditions,
                   help="comma-separated subset of " + ",".join(CONDITIONS))
    p.add_argument("--honesty-concept", choices=["truthfulqa", "facts"], default=d.honesty_concept)
    p.add_argument("--data-dir", type=flags.existing_dir_flag, help="folder with truthfulqa/, facts/, toxigen/prompts/, wikisplit/")
    p.add_argument("--truthfulqa", type=flags.data_path_flag, help="mc_task.json, TruthfulQA.csv or their folder; 'hub' for HF datasets")
    p.add_argument("--facts", type=flags.existing_path_flag, help="true/false facts CSV (statement,label)")
    p.add_argument("--toxigen", type=flags.existing_dir_flag, help="folder of ToxiGen prompt files")
    p.add_argument("--wikisplit", type=flags.existing_path_flag, help="WikiSplit TSV or its folder")
    p.add_argument("--n-questions", type=flags.positive_int_flag, help="first N TruthfulQA questions only (default: all)")
    for name in ("n_val", "folds", "n_concept", "n_toxigen_test", "n_toxigen_val", "n_toxigen_concept", "max_new_tokens"):
        p.add_argument(f"--{name.replace('_', '-')}", type=flags.positive_int_flag, default=getattr(d, name),
                       help=f"default {getattr(d, name)}")
    p.add_argument("--seed", type=flags.nonnegative_int_flag, default=d.seed)
    p.add_argument("--alphas", type=flags.float_list_flag, default=d.alphas, help="comma-separated grid")
    p.add_argument("--unit", choices=["norm", "raw"], default=d.unit)
    p.add_argument("--layers", type=flags.layer_list_flag, help="comma-separated target layers (default: ~2/3 depth)")
    p.add_argument("--layer-search", action="store_true", help="search each layer alone")
    p.add_argument("--reduction", choices=["sum", "mean"], default=d.reduction)
    p.add_argument("--prompt-style", choices=["qa", "primer"], default=d.prompt_style)
    p.add_argument("--target-chat", choices=["auto", "chat", "plain"], default=d.target_chat)
    p.add_argument("--self-align-model", type=flags.model_flag, help="the target's instruct sibling (default: the target)")
    p.add_argument("--instruct-model", type=flags.model_flag, help="instruct model scored as Align-Training")
    p.add_argument("--toxicity-scorer", type=flags.text_flag, default=d.toxicity_scorer,
                   help="auto | roberta | profanity-check | stand-in | HUB_ID | module:function")
    p.add_argument("--kl-bound", type=flags.nonnegative_float_flag, default=d.kl_bound,
                   help=f"fluency bound of the alpha searches, nats/token of KL on generic text (default {d.kl_bound})")
    p.add_argument("--n-ppl", type=flags.nonnegative_int_flag, default=d.n_ppl,
                   help=f"WikiSplit sentences of the reported perplexity (0: none; default {d.n_ppl})")
    p.add_argument("--n-fluency-texts", type=flags.positive_int_flag, default=d.n_fluency_texts,
                   help=f"paragraphs of generic text of the fluency instrument (default {d.n_fluency_texts})")
    p.add_argument("--map-texts", type=flags.positive_int_flag, help="neutral sentences for the map (default: all 400)")
    p.add_argument("--batch-size", type=flags.positive_int_flag, default=d.batch_size)
    p.add_argument("--gen-batch-size", type=flags.positive_int_flag, default=d.gen_batch_size)
    p.add_argument("--device", type=flags.device_flag, default=d.device)
    p.add_argument("--dtype", choices=list(DTYPES), default=d.dtype)
    p.add_argument("--out", "--out-dir", dest="out", type=flags.out_dir_flag, default=d.out, help="output folder (--out-dir: the older name)")
    p.add_argument("--progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config of parsed flags (every flag is a Config field of the same name)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in fields})


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of the subcommand: run, print the markdown table and where files went."""
    cfg = config_from_args(args)
    result = run(cfg)
    print(markdown_tables(result))
    print(f"wrote {Path(cfg.out) / 'alignment_eval.json'} and alignment_eval.md "
          f"({result['timings_s']['total']:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return script_main("alignment_eval", HELP, add_args, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
