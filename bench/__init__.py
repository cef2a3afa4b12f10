"""Benchmarks of contrans_tl: speed and memory of each step against its limit and baseline.

``contrans bench [--quick] [--out DIR]`` (or ``python -m bench.run``) measures, in one run on
one machine, side by side:

1. capture throughput of :func:`contrans_tl.refine` vs a plain batched HF forward (the limit);
2. the same vs the reference implementation's one-prompt-at-a-time ``output_hidden_states``;
3. steered vs unsteered greedy generation (KV cache on);
4. ``fit_map``: solver time vs the forward time of its captures, aligned samples per pass;
5. peak memory of capture vs ``run_with_cache`` of the whole residual stream over lengths;
6. the size matrix's model loads (N with ``--keep-loaded``);
7. ``contrans demo`` (the quick demo with ``--quick``) against its forward-pass floor: wall time,
   the map's solver share on the demo's corpus, peak memory over the weights (:mod:`bench.demo`).

It prints a table (metric, value, goal, met?) and writes ``DIR/bench.json`` (see
``docs/performance.md``). This module stays import-light: the CLI builds its parser from
:func:`add_arguments` without importing torch.
"""

from __future__ import annotations

import argparse

from contrans_tl import flags

__all__ = ["add_arguments", "run"]

DEFAULT_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``contrans bench`` / ``python -m bench.run``."""
    p.add_argument("--quick", action="store_true", help="short run (fewer prompts, repeats and lengths)")
    p.add_argument("--out", type=flags.out_dir_flag, help="directory for bench.json (default: print only)")
    p.add_argument("--models", nargs=2, metavar=("SOURCE", "TARGET"), type=flags.model_flag, default=list(DEFAULT_MODELS),
                   help="source and target model (default: %(default)s)")
    p.add_argument("--device", type=flags.device_flag, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=flags.positive_int_flag, help="timed repeats per measurement (median reported)")
    p.add_argument("--batch-size", type=flags.positive_int_flag, help="capture batch size (default 16)")
    p.add_argument("--seq-lens", type=flags.positive_int_flag, nargs="+", help="sequence lengths for the memory item")
    p.add_argument("--threads", type=flags.positive_int_flag, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-demo", action="store_true", help="skip item 7 (the demo against its floor: the longest item)")
    p.add_argument("--in-process-memory", action="store_true",
                   help="measure CPU memory in this process instead of a fresh one per model")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments (imports torch and the models)."""
    from bench.run import run_from_args

    return run_from_args(args)
