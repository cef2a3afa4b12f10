"""Paper analyses composed from the library: each module has a Config, run(cfg) and plot(result).

``COMMANDS`` lists the analyses that the ``contrans`` command exposes as subcommands.
"""

from __future__ import annotations

COMMANDS: dict = {}


def _demo_args(parser):
    from contrans_tl.analyses.emotion_transfer import add_args

    add_args(parser)


def _demo_run(args) -> int:
    from contrans_tl.analyses.emotion_transfer import cli_run

    return cli_run(args)


COMMANDS["demo"] = ("the main job: emotion transplantation smollm2-135m-instruct -> gemma-3-270m "
                    "(paper §4; figures, results.json, summary.md)", _demo_args, _demo_run)


def _align_eval_args(parser):  # imported on use: `python -m contrans_tl.analyses.alignment_eval` runs it once
    from contrans_tl.analyses.alignment_eval import add_args

    add_args(parser)


def _align_eval_run(args) -> int:
    from contrans_tl.analyses.alignment_eval import run_cli

    return run_cli(args)


COMMANDS["align-eval"] = ("alignment evaluations: TruthfulQA MC1, ToxiGen, perplexity (paper §5)",
                          _align_eval_args, _align_eval_run)


def _lazy(module: str):
    """(add_args, run) of an analysis module that has add_args(parser) and run_cli(args), imported on use."""
    from importlib import import_module

    return (lambda parser: import_module(f"contrans_tl.analyses.{module}").add_args(parser),
            lambda args: import_module(f"contrans_tl.analyses.{module}").run_cli(args))


COMMANDS["size-matrix"] = ("size matrix: every model's emotion vectors into every model (paper §6.3, Fig 4)",
                           *_lazy("size_matrix"))
COMMANDS["checkpoint-sweep"] = ("checkpoint sweep: final-model vectors into training checkpoints (paper §6.1, Fig 3)",
                                *_lazy("checkpoint_sweep"))
COMMANDS["token-shift"] = ("logit-lens token shift of transplanted vectors (paper appendix B.3, Table 8)",
                           *_lazy("token_shift"))
