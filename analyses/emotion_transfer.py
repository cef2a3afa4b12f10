"""The paper's emotion transplantation (§4) as an instrument: six concepts, one frontier each.

Each of the six emotions is an instance of the concept task (:meth:`EmotionTask.concept`): its
vector is refined in the source from scenarios of the emotion against scenarios of the others,
mapped into the target and transplanted; its items are test scenarios of the *other* emotions
after a few-shot block, and the transplant succeeds when the target answers the emotion's label.
The transfer job (:mod:`._transfer_job`) measures the frontier — Logit and Token Acc against KL
on generic text for the mapped, native and random vectors and the prompting baseline — chooses
each emotion's operating alpha and the layer on validation scenarios (kept out of the contrast
prompts and the few-shot block), and reports transfer efficiency and paired tests on test items.
The demo adds the paper's figures: the transplant matrix, Fig 5 (refinement size), Fig 2b and 7/8.

    python -m contrans_tl.analyses.emotion_transfer --out out/emotion            # the default offline pair
    python -m contrans_tl.analyses.emotion_transfer --quick --out out/quick      # a smoke run
    python -m contrans_tl.analyses.emotion_transfer --source mistralai/Mistral-7B-Instruct-v0.2 \\
        --target meta-llama/Llama-2-13b-hf --out out/mistral-llama   # hub models
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import contrans_tl as ct
from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.analyses import _common as cm
from contrans_tl.analyses._emotion_outputs import confusion_table, emotion_summary, plot
from contrans_tl.analyses._frontier_run import Frontier
from contrans_tl.analyses._transfer_job import Job, run_job
from contrans_tl.analyses._transfer_outputs import summary_markdown
from contrans_tl.analyses._transfer_run import (ConceptRun, TransferSettings, add_transfer_args, log,
                                                settings_from_args)
from contrans_tl.capture import capture
from contrans_tl.datasets import generic_texts
from contrans_tl.files import atomic_path, atomic_write_text, write_json
from contrans_tl.sweep import cell_key, input_path, run_option
from contrans_tl.tasks.emotion import EMOTIONS, QUERY, emotion_accuracy, emotion_task
from contrans_tl.tasks.frontier import geometric_grid
from contrans_tl.transplant import Steering

__all__ = ["Config", "QUICK", "PROTOCOL", "run", "plot", "add_args", "config_from_args", "run_cli", "main"]

QUICK: dict[str, Any] = {"alphas": geometric_grid(0.025, 2.0, 5), "n_random": 4,
                         "random_points": 1, "n_fluency_texts": 3, "n_negatives": 2, "n_validation": 2, "n_refine": 8,
                         "n_examples": (4, 0)}
"""``--quick``: 5 alphas (×2 apart), 4 random directions per emotion at 1 alpha each,
3 generic paragraphs, 2 test and 2 validation scenarios per other emotion, 8 contrast pairs."""

PROTOCOL = ("4: concept-task scoring (labels by summed token log-probs), validation scenarios out of contrast "
            "prompts and shots, frontier on generic-text KL, operating point within the KL bound")
"""The evaluation protocol of the cells: part of their settings, so a folder from another protocol is refused."""

SAMPLE_TOKENS = 12
"""New tokens of each sample continuation."""


@dataclass
class Config(TransferSettings):
    """Settings of one emotion-transfer run (each field is a command-line flag)."""

    out: str = run_option("out/emotion")
    candidate_depths: tuple[float, ...] = (0.83,)
    """Relative depth of the target layer (Gemma-3-270M: layer 14). A full run comparing 0.83 and 0.9 (layers 14
    and 15) on validation items chose 14 (mean validation score 0.188 against 0.179); ``--candidate-depths
    0.83,0.9`` reruns that comparison, at the cost of another mapped frontier."""
    data_dir: str | None = input_path(None)
    """Directory of {emotion}.json scenario lists (default: the built-in set)."""
    emotions: tuple[str, ...] = EMOTIONS
    """Emotions steered (their items' choices are always all six labels)."""
    n_negatives: int = 10
    """Test scenarios per *other* emotion (test items of emotion e: 5 × this many)."""
    n_validation: int = 4
    """Scenarios per emotion kept out of the contrast prompts and few-shot block: validation items (5 × this many)."""
    n_refine: int = 0
    """Contrast pairs per emotion (0 = the whole refinement pool)."""
    n_examples: tuple[int, ...] = (10, 20, 0)
    """Refinement sizes of Fig 5 (0 = all available), scored at each emotion's operating alpha."""

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [e for e in self.emotions if e not in EMOTIONS]
        if bad or not self.emotions:
            raise ct.InvalidArgumentError("emotions", self.emotions, f"a non-empty subset of {list(EMOTIONS)}")
        validate.integer("n_negatives", self.n_negatives, low=1)
        validate.integer("n_validation", self.n_validation, low=1)
        validate.integer("n_refine", self.n_refine, low=0)


def _concepts(cfg: Config) -> list[ConceptRun]:
    task = emotion_task(cfg.emotions, n_refine=cfg.n_refine or None, n_eval=cfg.n_negatives,
                        n_validation=cfg.n_validation, seed=cfg.seed, data_dir=cfg.data_dir)
    return [ConceptRun(task.concept(e), task.concept_split(e)) for e in cfg.emotions]


def _confusion(fr: Frontier, job: Job) -> dict[str, Any]:
    """Which label won on each emotion's test items at its operating alpha: transplanted, native (same alpha), unsteered."""
    base = fr.baseline("test")
    counts: dict[str, dict[str, dict[str, int]]] = {"transplanted": {}, "native": {}, "unsteered": {}}
    for e, alpha in job.alphas.items():
        counts["unsteered"][e] = emotion_accuracy(base[e])["label_counts"]
        if alpha <= 0:
            continue
        for cond, name in (("mapped", "transplanted"), ("native", "native")):
            got = fr.measure([(fr.direction(cond, e, job.layers), [alpha])], "test")[0][e][0]
            counts[name][e] = emotion_accuracy(got.scores)["label_counts"]
    return confusion_table({k: v for k, v in counts.items() if v})


def _refinement_sizes(fr: Frontier, job: Job, sizes: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Fig 5: test accuracy of mapped vectors refined from the first n contrast pairs, at the operating alpha."""
    out: dict[str, dict[str, Any]] = {}
    for c in job.run.concepts:
        alpha = job.alphas[c.name]
        if alpha <= 0:
            continue
        available = len(c.concept.positive)
        for n in sorted({available if s <= 0 else min(s, available) for s in sizes}):
            v = job.run.in_reference_unit(job.amap.apply(job.run.vector(job.run.source, "source", c.concept, n)))
            entries = [(c.concept.prefix, it) for it in c.split.test]
            table = fr.scores(Steering.single(v, alpha, job.layers),
                              cell_key(fig5=c.name, n=n, layers="-".join(map(str, job.layers)), alpha=alpha), entries)
            scores = fr.outcomes(table, entries)
            out.setdefault(c.name, {})[str(n)] = {"token_acc": scores.token_acc, "logit_acc": scores.logit_acc}
    return out


def _save_states(cfg: Config, job: Job, steered: str, path: Path) -> None:
    """Hidden states for Fig 2b and Fig 7/8: every emotion's test scenarios (their own query, no few-shot block)
    before and after transplanting ``steered``, and in the source (saved as arrays, plotted by :func:`plot`)."""
    if path.is_file():
        return
    run, layers = job.run, list(job.layers)
    task = emotion_task(cfg.emotions, n_eval=cfg.n_negatives, seed=cfg.seed, data_dir=cfg.data_dir)
    prompts = [QUERY.format(s) for e in cfg.emotions for s in task.eval_scenarios[e][: cfg.n_negatives]]
    labels = [e for e in cfg.emotions for _ in task.eval_scenarios[e][: cfg.n_negatives]]
    read_tgt = min(int(run.target.cfg.n_layers) - 1, layers[-1] + 1)
    pairs = dict(zip(job.amap.target_layers, job.amap.source_layers))
    read_src = pairs.get(layers[-1], int(run.source.cfg.n_layers) - 1)
    before = capture(run.target, prompts, layers=[read_tgt])[:, 0]
    alpha = job.alphas[steered] or min(run.cfg.alphas)  # the operating alpha (the weakest one if none was allowed)
    with Steering.single(job.mapped[steered], alpha, layers).apply(run.target):
        after = capture(run.target, prompts, layers=[read_tgt])[:, 0]
    src_states = capture(run.source, prompts, layers=[read_src])[:, 0]
    with atomic_path(path) as tmp:
        torch.save({"before": before, "after": after, "source": src_states, "labels": labels, "steered": steered,
                    "target_layer": read_tgt, "source_layer": read_src}, tmp)


def _samples(job: Job) -> dict[str, Any]:
    """Greedy continuations at the operating point, unsteered and transplanted: after the prompt of the first test
    item (what the model says, not only which label wins) and after an opener of generic text."""
    run = job.run
    opener = " ".join(generic_texts()[-1].split()[:6])
    rows: dict[str, Any] = {}
    for c in run.concepts:
        prompts = [c.concept.prefix + c.split.test[0].prompt, opener]
        steering = Steering.single(job.mapped[c.name], job.alphas[c.name], job.layers)

        def write(steered: bool, steering: Steering = steering, prompts: list[str] = prompts) -> list[str]:
            with steering.apply(run.target) if steered else nullcontext():
                return ct.generate(run.target, prompts, max_new_tokens=SAMPLE_TOKENS)

        layers = "-".join(map(str, job.layers))
        done = run.store.run({cell_key(samples=c.name, steered=s, layers=layers, alpha=job.alphas[c.name]): s
                              for s in (False, True)}, write)
        unsteered, steered = done.values()
        rows[c.name] = {"scenario": c.split.test[0].prompt, "unsteered": {"answer": unsteered[0], "opener": unsteered[1]},
                        "transplanted": {"answer": steered[0], "opener": steered[1]}}
    return {"opener": opener, "max_new_tokens": SAMPLE_TOKENS, "emotions": rows}


def _by_emotion(result: dict[str, Any]) -> None:
    """The demo's rows are keyed by ``emotion`` where the transfer job's say ``concept``."""
    for r in result["frontier"]:
        r["emotion"] = r.pop("concept")


def run(cfg: Config) -> dict[str, Any]:
    """Run the whole experiment; finished pieces are kept under ``cfg.out`` and reused."""
    cfg = cfg.effective(QUICK)  # type: ignore[assignment]
    t0 = time.time()
    job = run_job(cfg, _concepts(cfg), protocol=PROTOCOL)
    fr = job.frontier
    phases = job.run.phases
    with phases.phase("transplant matrix"):
        job.result["confusion"] = _confusion(fr, job)
    with phases.phase("Fig 5: refinement sizes"):
        job.result["n_examples"] = _refinement_sizes(fr, job, cfg.n_examples)
    # the emotion shown in Fig 2b: the best operating point on *validation* items (no test number chooses anything)
    ops = job.result["operating_point"]["concepts"]
    steered = max(ops, key=lambda e: ops[e]["validation_score"])
    with phases.phase("hidden states (Fig 2b, 7/8)"):
        _save_states(cfg, job, steered, Path(cfg.out) / "states.pt")
    with phases.phase("sample continuations"):
        job.result["samples"] = _samples(job)
    _by_emotion(job.result)
    job.result["seconds"] = round(time.time() - t0, 1)
    job.result["phases"] = phases.as_dict()
    out = Path(cfg.out)
    write_json(out / "results.json", job.result)
    atomic_write_text(out / "summary.md", summary_markdown(job.result, key="emotion", title="Emotion transplantation")
                      + emotion_summary(job.result))
    log(f"wrote {out / 'results.json'} ({job.result['seconds']}s)")
    return job.result


# ---- command line ----------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    """Flags for the Config fields; unset flags stay None, so ``--quick`` fills only those."""
    d = Config()
    add_transfer_args(p, d)
    p.add_argument("--data-dir", type=flags.existing_dir_flag,
                   help="directory of {emotion}.json scenario lists (default: the built-in set)")
    p.add_argument("--emotions", type=flags.name_list_flag, help="comma-separated emotions (default: all six)")
    for name, what in (("n_negatives", "test scenarios per other emotion"),
                       ("n_validation", "validation scenarios per emotion (kept out of contrast prompts and shots)")):
        p.add_argument(f"--{name.replace('_', '-')}", type=flags.positive_int_flag, help=f"{what} (default {getattr(d, name)})")
    p.add_argument("--n-refine", type=flags.nonnegative_int_flag, help="contrast pairs per emotion (0 = all)")
    p.add_argument("--n-examples", type=flags.int_list_flag, help="refinement sizes of Fig 5 (0 = all)")


def config_from_args(args: argparse.Namespace) -> Config:
    """The flags the user gave, over the defaults; ``--quick`` presets fill only the others."""
    return settings_from_args(Config, args)


def run_cli(args: argparse.Namespace) -> int:
    """Run, draw the figures (timed as their own phase), print the summary and where the time went."""
    cfg = config_from_args(args)
    result = run(cfg)
    phases = cm.PhaseTimes.from_dict(result["phases"])
    if not args.no_plots:
        with phases.phase("figures"):
            paths = plot(result, cfg.out)
        print("\n".join(f"figure: {p}" for p in paths if p.suffix == ".png"))
        result["phases"] = phases.as_dict()
        write_json(Path(cfg.out) / "results.json", result)
    print((Path(cfg.out) / "summary.md").read_text())
    print("Where the time went (seconds; reused work: recorded compute time of cells and artifacts a resumed run reused):")
    print(phases.table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cm.script_main("emotion_transfer", __doc__.splitlines()[0], add_args, run_cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
