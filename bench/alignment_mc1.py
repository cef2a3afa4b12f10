"""Benchmark: TruthfulQA MC1 over all 817 questions, source → target, four rows, with timings.

    python -m bench.alignment_mc1 [--data-dir ../shared/data] [--n-questions N] [--folds 2]

Runs :func:`contrans_tl.analyses.alignment_eval.run` for the honesty concept with Base, ConTrans
(transplant), Self-Align and Inst-Align on the offline pair (smollm2-135m-instruct →
gemma-3-270m by default), prints the paper-shaped table, the accuracies, the time of every
phase and the throughput in scored (question, choice) sequences per second, and writes
``bench_alignment_mc1.json`` next to the analysis outputs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from contrans_tl.analyses import alignment_eval as ae
from contrans_tl.files import write_json
from contrans_tl.tasks import scoring


def _default_data_dir() -> str | None:
    guess = Path(__file__).resolve().parents[2] / "shared" / "data"
    return str(guess) if guess.is_dir() else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.alignment_mc1", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=_default_data_dir(), help="folder holding truthfulqa/ and wikisplit/")
    p.add_argument("--source", default="smollm2-135m-instruct")
    p.add_argument("--target", default="gemma-3-270m")
    p.add_argument("--n-questions", type=int, help="first N questions only (default: all 817)")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in ae.Config().alphas))
    p.add_argument("--max-ppl-ratio", type=float, default=ae.Config().max_ppl_ratio,
                   help="the fluency bound of the alpha search (guard perplexity / unsteered)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-ppl", type=int, default=0, help="WikiSplit sentences for perplexity (default: skip)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out-dir", default="runs/bench_alignment_mc1")
    p.add_argument("--resume", action="store_true",
                   help="reuse the scores a killed run stored (default: start clean, so the timings are real)")
    args = p.parse_args(argv)
    if args.data_dir is None:
        p.error("--data-dir is required (no ../shared/data beside this checkout)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.resume:
        shutil.rmtree(Path(args.out_dir) / "cells", ignore_errors=True)

    scored = {"sequences": 0, "seconds": 0.0}
    inner = scoring.score_rows  # every MC1 and perplexity score goes through it

    def counting(model, rows, **kw):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return inner(model, rows, **kw)
        finally:
            scored["sequences"] += len(rows)
            scored["seconds"] += time.perf_counter() - start

    scoring.score_rows = counting  # type: ignore[assignment]
    cfg = ae.Config(
        source=args.source, target=args.target, tasks=("honesty",),
        conditions=("base", "transplant", "self-align", "inst-align"), data_dir=args.data_dir,
        n_questions=args.n_questions, folds=args.folds, n_val=args.n_val,
        alphas=tuple(float(a) for a in args.alphas.split(",")), batch_size=args.batch_size,
        n_ppl=args.n_ppl, max_ppl_ratio=args.max_ppl_ratio, dtype=args.dtype, out=args.out_dir, progress=True,
    )
    start = time.perf_counter()
    try:
        result = ae.run(cfg)
    finally:
        scoring.score_rows = inner  # type: ignore[assignment]
    wall = time.perf_counter() - start
    rows = result["honesty"]["rows"]
    print(ae.markdown_tables(result))
    print(f"device: cpu, torch threads: {torch.get_num_threads()}, dtype: {args.dtype}")
    print(f"questions: {result['honesty']['n_questions']}, tested: {result['honesty']['n_test']}, "
          f"folds: {args.folds}, validation/fold: {args.n_val}")
    for cond, row in rows.items():
        extra = f"  alpha per fold {row['alpha']}" if "alpha" in row else ""
        print(f"  {ae.METHOD_NAMES[cond]:12s} MC1 {100 * row['mc1']:5.1f}%  ({row['n_correct']}/{row['n']}, "
              f"ties {row['n_ties']}){extra}")
    print("timings (s):")
    for name, secs in result["timings_s"].items():
        print(f"  {name:24s} {secs:8.1f}")
    rate = scored["sequences"] / scored["seconds"] if scored["seconds"] else float("nan")
    print(f"scored sequences: {scored['sequences']} in {scored['seconds']:.0f} s ({rate:.2f}/s); wall {wall:.0f} s")
    bench = {
        "wall_s": round(wall, 1),
        "scored_sequences": scored["sequences"],
        "scoring_s": round(scored["seconds"], 1),
        "sequences_per_s": round(rate, 3),
        "threads": torch.get_num_threads(),
        "mc1": {cond: row["mc1"] for cond, row in rows.items()},
        "timings_s": result["timings_s"],
    }
    out = write_json(Path(args.out_dir) / "bench_alignment_mc1.json", bench)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
