"""Bring your own concept: move the concept of a concept file from a source model into a target model.

    contrans transfer --concept my_concept.json --out out/my_concept            # the offline pair
    contrans transfer --concept my_concept.json --quick --out out/quick         # a few minutes
    contrans transfer --concept my_concept.json --source mistralai/Mistral-7B-Instruct-v0.2 \\
        --target meta-llama/Llama-2-13b-hf --out out/mistral-llama

The file's ``eval`` items are split into validation and test (seeded, recorded); the run refines
the concept in both models, maps it, chooses the operating point on validation items within a
KL bound and reports on test items: the frontier (accuracy against KL, mapped / native / random /
prompting), transfer efficiency with its interval, paired tests, the mapped vector ready for
``contrans export`` — results.json, summary.md and figures/frontier.png. The format of a concept
file: docs/concepts.md; an example: examples/concepts/positive_sentiment.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.analyses import _common as cm
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.files import atomic_write_text, write_json
from contrans_tl.sweep import run_option
from contrans_tl.tasks.concept import load_concept, split_concept
from contrans_tl.tasks.frontier import geometric_grid

from contrans_tl.analyses._transfer_job import run_job
from contrans_tl.analyses._transfer_outputs import plot_frontier, summary_markdown
from contrans_tl.analyses._transfer_run import ConceptRun, TransferSettings, add_transfer_args, log, settings_from_args

__all__ = ["Config", "QUICK", "PROTOCOL", "concept_runs", "run", "add_args", "config_from_args", "run_cli", "main"]

QUICK: dict[str, Any] = {"alphas": geometric_grid(0.025, 2.0, 5), "candidate_depths": (0.83,), "n_random": 4,
                         "random_points": 1, "n_fluency_texts": 3}
"""``--quick``: 5 alphas (×2 apart), one candidate layer, 4 random directions at 1 alpha each, 3 generic
paragraphs."""

PROTOCOL = "concept-transfer 1: frontier on generic-text KL, operating point on validation within the KL bound"
"""The protocol of the cells (part of their settings: a folder from another protocol is refused)."""


@dataclass
class Config(TransferSettings):
    """Settings of one ``contrans transfer`` run (each field is a flag)."""

    concept: str = ""
    """The concept file (docs/concepts.md): JSON with name, description, positive, negative, eval."""
    validation_fraction: float = 0.3
    """Share of the eval items that validate (at least 3); the rest (at least 5) are the test set."""
    out: str = run_option("out/transfer")
    random_points: int = 3
    """Alphas each random direction is scored at: 3 here (one concept has only its own 8 directions, so more
    points are needed near any KL than in the demo, where six emotions pool 48)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.concept, str) or not self.concept:
            raise InvalidArgumentError("concept", self.concept, "the path of a concept file (JSON, docs/concepts.md)")
        validate.real("validation_fraction", self.validation_fraction, low=0.0, high=1.0, low_open=True, high_open=True)


def concept_runs(cfg: Config) -> list[ConceptRun]:
    """The file's concept with its seeded validation/test split (read before any model loads)."""
    concept = load_concept(cfg.concept)
    return [ConceptRun(concept, split_concept(concept, validation_fraction=cfg.validation_fraction, seed=cfg.seed))]


def run(cfg: Config) -> dict[str, Any]:
    """Run the job; finished cells under ``cfg.out`` are reused. Writes results.json and summary.md."""
    cfg = cfg.effective(QUICK)  # type: ignore[assignment]
    concepts = concept_runs(cfg)
    job = run_job(cfg, concepts, protocol=PROTOCOL)
    job.result["concept_file"] = str(Path(cfg.concept).resolve())
    job.result["phases"] = job.run.phases.as_dict()
    write_json(Path(cfg.out) / "results.json", job.result)
    atomic_write_text(Path(cfg.out) / "summary.md", summary_markdown(job.result, title=f"Transfer of {concepts[0].name}"))
    log(f"wrote {Path(cfg.out) / 'results.json'} ({job.result['seconds']}s)")
    return job.result


def plot(result: dict[str, Any], out: str | Path) -> list[Path]:
    return plot_frontier(result, out)


# ---- command line ----------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concept", required=True, type=flags.text_file_flag,
                   help="concept file: JSON with name, description, positive, negative, eval (docs/concepts.md)")
    p.add_argument("--validation-fraction", type=flags.fraction_flag,
                   help="share of the eval items that validate (default 0.3)")
    add_transfer_args(p, Config(concept="-"))


def config_from_args(args: argparse.Namespace) -> Config:
    return settings_from_args(Config, args)


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    concept_runs(cfg)  # a malformed concept file fails here, before any model loads
    start = time.time()
    result = run(cfg)
    if not args.no_plots:
        paths = plot(result, cfg.out)
        print("\n".join(f"figure: {p}" for p in paths if p.suffix == ".png"))
    print((Path(cfg.out) / "summary.md").read_text())
    print(f"({time.time() - start:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cm.script_main("concept_transfer", __doc__.splitlines()[0], add_args, run_cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
