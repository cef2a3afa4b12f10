"""The main job against its floor: ``contrans demo`` timed as a whole, and the forwards it must run.

The demo runs in a child process (a fresh output folder, the models already converted) with
the forward ledger open (:mod:`contrans_tl.ledger`): every row it pushes through a model is
noted with its few-shot prefix and the steering setting active at the time. The **floor** is
the distinct rows per (model, steering setting, prefix) — each scored prompt once per distinct
setting, the steered few-shot prefix once per setting (steering changes its keys and values,
so it is recomputed per setting; the unsteered prefix counts once), each refinement prompt and
corpus text once per model — timed here with plain batched Hugging Face forwards (no hooks,
no TransformerLens; the prefix's KV cache reused within a setting, batches sorted by length,
hidden-state rows through the decoder without the unembedding). Model loading, file writing
and figures are not in the floor; they are in the demo's time.

- ``demo_vs_floor`` = the demo command's wall time ÷ the floor's (goal ≤ 1.5);
- ``solver_fraction_full`` = the demo's map fit ÷ its corpus capture, from the demo's own
  phase table (its map corpus: the contrast prompts, 186 texts in the full demo, 81 with ``--quick``; goal ≤ 0.05);
- ``demo_peak_rss_vs_weights`` = the child's peak RSS ÷ the float32 weights of both models (goal ≤ 1.8).

    python -m bench.demo --quick            # only this item; `contrans bench` runs it with the rest
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from contrans_tl import flags
from contrans_tl.capture import model_device, pad_batch, pad_token_id
from contrans_tl.entry import CommandParser, run_reporting_errors, split_debug
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.ledger import Ledger

__all__ = ["DemoRun", "run_demo", "floor_seconds", "fp32_weight_bytes", "bench_demo", "main"]

Log = Callable[[str], None]


@dataclass
class DemoRun:
    """What one measured demo run gave: wall/CPU seconds, peak RSS, its ledger and results.json."""

    wall_s: float
    """The child process from start to exit, less the time it took to write the ledger file."""
    cpu_s: float
    peak_rss_bytes: int
    ledger: Ledger
    results: dict[str, Any]
    flags: list[str]


def _child(ledger_path: str, threads: int | None, flags: Sequence[str]) -> int:
    """In the child: ``contrans demo FLAGS`` with the ledger open, then the ledger written out (timed)."""
    from contrans_tl.cli import main as contrans_main
    from contrans_tl.files import write_json
    from contrans_tl.ledger import record_forwards

    if threads:
        torch.set_num_threads(threads)
    with record_forwards() as ledger:
        code = contrans_main(["demo", *flags])
    start = time.perf_counter()
    write_json(Path(ledger_path), ledger.to_json())
    Path(ledger_path + ".seconds").write_text(f"{time.perf_counter() - start}")
    return code


def run_demo(flags: Sequence[str], *, threads: int | None = None, log: Log = print) -> DemoRun:
    """``contrans demo FLAGS`` in a child process: wall and CPU time, peak RSS (Linux), ledger, results.

    ``--out`` in ``flags`` must be absolute: the child runs from the checkout's root.
    """
    out = Path(flags[list(flags).index("--out") + 1])
    with tempfile.TemporaryDirectory() as tmp:
        ledger_path = Path(tmp) / "ledger.json"
        command = [sys.executable, "-m", "bench.demo", "--child", str(ledger_path),
                   *(["--threads", str(threads)] if threads else []), "--", *flags]
        log(f"demo: {' '.join(['contrans demo', *flags])} (child process)")
        start = time.perf_counter()
        tail: list[str] = []
        with subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail = (tail + [line.rstrip()])[-40:]
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS in KiB on Linux)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError("the demo failed in the benchmark:\n" + "\n".join(tail))
        ledger = Ledger.from_json(json.loads(ledger_path.read_text()))
        wall -= float(Path(str(ledger_path) + ".seconds").read_text())
    results = json.loads((out / "results.json").read_text())
    return DemoRun(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_bytes=usage.ru_maxrss * 1024,
                   ledger=ledger, results=results, flags=list(flags))


@torch.inference_mode()
def _floor_group(model: ModelHandle, prefix: tuple[int, ...], kind: str, rows: list[tuple[int, ...]],
                 batch_size: int) -> None:
    """Plain HF forwards of one group: its prefix once (KV cache kept), then its rows in sorted batches."""
    hf = model.original_model
    device = model_device(model)
    pad = pad_token_id(model)
    rows = sorted(rows, key=len)
    prefix_cache = None
    if prefix:
        prefix_cache = hf(input_ids=torch.tensor([prefix], device=device), use_cache=True,
                          logits_to_keep=1).past_key_values
    decoder = getattr(hf, hf.base_model_prefix)
    for start in range(0, len(rows), batch_size):
        batch = pad_batch(rows[start : start + batch_size], pad_id=pad)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        if kind == "resid":
            decoder(input_ids=ids, attention_mask=mask)
            continue
        if kind == "sequence":  # the fluency instrument: every position over the whole vocabulary, log-softmaxed
            torch.log_softmax(hf(input_ids=ids, attention_mask=mask, logits_to_keep=0).logits.float(), dim=-1)
            continue
        extra: dict[str, Any] = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(ids.shape[0])
            mask = torch.cat([torch.ones(ids.shape[0], len(prefix), dtype=mask.dtype, device=device), mask], 1)
            extra["past_key_values"] = cache
        hf(input_ids=ids, attention_mask=mask, logits_to_keep=1, **extra)


def floor_seconds(models: dict[str, ModelHandle], ledger: Ledger, *, batch_size: int = 16,
                  log: Log = print) -> dict[str, Any]:
    """Time the ledger's distinct rows with plain HF forwards, per model; returns seconds and counts."""
    unique = ledger.unique()
    per_model: dict[str, Any] = {}
    for label, groups in ledger.groups.items():
        if label not in models:
            raise KeyError(f"the ledger names model {label!r}, not loaded here ({sorted(models)})")
        model = models[label]
        log(f"floor: {label}, {unique[label]['rows']} distinct rows in {len(groups)} settings/prefixes")
        start = time.perf_counter()
        for (_setting, prefix, kind), rows in groups.items():
            _floor_group(model, prefix, kind, list(rows), batch_size)
        seconds = time.perf_counter() - start
        per_model[label] = {**unique[label], "seconds": seconds, "groups": len(groups),
                            "demo_rows": ledger.seen_rows.get(label, 0), "demo_tokens": ledger.seen_tokens.get(label, 0)}
    return {"seconds": sum(m["seconds"] for m in per_model.values()), "models": per_model, "batch_size": batch_size}


def fp32_weight_bytes(model: ModelHandle) -> int:
    """Bytes of the model's parameters in float32 (tied weights once)."""
    return 4 * sum(p.numel() for p in model.original_model.parameters())


def _phase_wall(results: dict[str, Any], name: str) -> float | None:
    row = results.get("phases", {}).get(name)
    return None if row is None else float(row["total_wall_s"])


def bench_demo(names: Sequence[str], *, quick: bool, device: str | None = None, threads: int | None = None,
               batch_size: int = 16, demo_out: str | Path | None = None, log: Log = print) -> dict[str, Any]:
    """Item 7: the demo (``--quick`` demo when ``quick``) vs its floor, its solver share and memory.

    ``names``: source and target as ``contrans demo`` takes them. The floor loads them here the way
    the demo does (same device, default dtype), after the demo's process has exited.
    ``demo_out``: where the demo writes (must not hold an earlier run: it would resume); None, a
    temporary folder.
    """
    from contrans_tl.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(demo_out).resolve() if demo_out is not None else Path(tmp) / "demo"
        if (out / "cells").exists():
            raise InvalidArgumentError("demo_out", str(out), "a folder without an earlier demo run: the benchmark "
                                       "times a fresh run, and the demo would resume this one")
        flags = ["--source", str(names[0]), "--target", str(names[1]), "--out", str(out),
                 *(["--device", device] if device else []), *(["--quick"] if quick else [])]
        demo = run_demo(flags, threads=threads, log=log)
    models = [load_model(name, device=device) for name in names]
    by_label = {str(m.cfg.model_name): m for m in models}
    floor = floor_seconds(by_label, demo.ledger, batch_size=batch_size, log=log)
    results = demo.results
    corpus, fit = _phase_wall(results, "map: corpus"), _phase_wall(results, "map: fit")
    weights = sum(fp32_weight_bytes(m) for m in models)
    load = _phase_wall(results, "load models") or 0.0
    return {
        "command": "contrans demo " + " ".join(demo.flags),
        "quick": quick,
        "demo_wall_s": demo.wall_s,
        "demo_cpu_s": demo.cpu_s,
        "demo_load_s": load,
        "floor_s": floor["seconds"],
        "demo_vs_floor": demo.wall_s / floor["seconds"],
        "demo_vs_floor_without_load": (demo.wall_s - load) / floor["seconds"],
        "floor": floor,
        "solver_fraction_full": None if not corpus or fit is None else fit / corpus,
        "solver_corpus_texts": results["map"]["n_texts"],
        "map_corpus_s": corpus,
        "map_fit_s": fit,
        "demo_peak_rss_bytes": demo.peak_rss_bytes,
        "fp32_weight_bytes": weights,
        "demo_peak_rss_vs_weights": demo.peak_rss_bytes / weights,
        "phases": results.get("phases"),
        "transfer_efficiency": results.get("transfer_efficiency", {}).get("value"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.demo [--quick]``: item 7 alone (``--child`` is the measured process)."""
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    p = CommandParser(prog="python -m bench.demo", description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=flags.positive_int_flag)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs=2, type=flags.model_flag, default=["smollm2-135m-instruct", "gemma-3-270m"])
    p.add_argument("--out", type=flags.out_dir_flag, help="folder for demo_bench.json")
    p.add_argument("--demo-out", type=flags.out_dir_flag, help="keep the demo's own output here (a fresh folder; default: a temporary one)")
    p.add_argument("rest", nargs="*")
    try:
        args = p.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag already reported in one line
        return int(stop.code or 0)
    if args.child:
        return _child(args.child, args.threads, args.rest)
    return run_reporting_errors(lambda: _run(args), debug=debug)


def _run(args: argparse.Namespace) -> int:
    from contrans_tl.files import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_demo(args.models, quick=args.quick, threads=args.threads, demo_out=args.demo_out,
                        log=lambda m: print(m, file=sys.stderr))
    summary = {k: v for k, v in result.items() if k not in ("phases", "floor", "headline")}
    print(json.dumps(summary, indent=1))
    if args.out:
        write_json(Path(args.out) / "demo_bench.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
