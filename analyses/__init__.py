"""Paper analyses composed from the library: each module has a Config, run(cfg) and plot(result).

``COMMANDS`` lists the analyses that the ``contrans`` command exposes as subcommands.
"""

from __future__ import annotations

COMMANDS: dict = {}


def _demo_args(parser):
    from analyses.emotion_transfer import add_args

    add_args(parser)


def _demo_run(args) -> int:
    from analyses.emotion_transfer import cli_run

    return cli_run(args)


COMMANDS["demo"] = ("the main job: emotion transplantation smollm2-135m-instruct -> gemma-3-270m "
                    "(paper §4; figures, results.json, summary.md)", _demo_args, _demo_run)


def _align_eval_args(parser):  # imported on use: `python -m analyses.alignment_eval` runs it once
    from analyses.alignment_eval import add_args

    add_args(parser)


def _align_eval_run(args) -> int:
    from analyses.alignment_eval import run_cli

    return run_cli(args)


COMMANDS["align-eval"] = ("alignment evaluations: TruthfulQA MC1, ToxiGen, perplexity (paper §5)",
                          _align_eval_args, _align_eval_run)
