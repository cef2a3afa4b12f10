"""Paper analyses composed from the library, each on one protocol.

Every analysis module has a ``Config`` dataclass (its output folder is the field ``out``),
``run(cfg) -> result`` (written to that folder), ``plot(result, out)`` as a separate step, and
the command-line mapping ``add_args(parser)``, ``config_from_args(args) -> Config``,
``run_cli(args) -> int`` and ``main(argv=None) -> int``.

``COMMANDS`` lists the analyses that the ``contrans`` command exposes as subcommands.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["COMMANDS"]


def _lazy(module: str) -> tuple[Callable[[Any], None], Callable[[Any], int]]:
    """(add_args, run_cli) of an analysis module, imported on use.

    Importing on use keeps ``python -m contrans_tl.analyses.<module>`` from importing the module
    twice (once through this package, once as ``__main__``).
    """
    from importlib import import_module

    return (lambda parser: import_module(f"contrans_tl.analyses.{module}").add_args(parser),
            lambda args: import_module(f"contrans_tl.analyses.{module}").run_cli(args))


COMMANDS: dict[str, tuple[str, Callable[[Any], None], Callable[[Any], int]]] = {
    "demo": ("the main job: emotion transplantation smollm2-135m-instruct -> gemma-3-270m "
             "(paper §4; figures, results.json, summary.md)", *_lazy("emotion_transfer")),
    "transfer": ("bring your own concept: move a concept file's concept from --source into --target; frontier, "
                 "transfer efficiency, operating point, tests, vectors (docs/concepts.md)", *_lazy("concept_transfer")),
    "align-eval": ("alignment evaluations: TruthfulQA MC1, ToxiGen, perplexity (paper §5)", *_lazy("alignment_eval")),
    "size-matrix": ("size matrix: every model's emotion vectors into every model (paper §6.3, Fig 4)",
                    *_lazy("size_matrix")),
    "checkpoint-sweep": ("checkpoint sweep: final-model vectors into training checkpoints (paper §6.1, Fig 3)",
                         *_lazy("checkpoint_sweep")),
    "token-shift": ("logit-lens token shift of transplanted vectors (paper appendix B.3, Table 8)",
                    *_lazy("token_shift")),
}
"""Subcommand name → (help, add_args, run_cli), each module imported only when used."""
