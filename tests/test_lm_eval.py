"""lm-evaluation-harness's ``steered`` model scores with an exported file as :func:`contrans_tl.transplant` does.

A "fear" vector refined in the model itself is written with :func:`contrans_tl.export.export_lm_eval`
and run through ``lm_eval.simple_evaluate(model="steered", model_args="pretrained=DIR,steer_path=FILE,...")``
(what the ``lm_eval --model steered`` command calls) on the model's converted HF checkpoint, on a
small multiple-choice task written here as a task YAML + JSON data. Its per-choice log-likelihoods
must equal the project's MC scoring (:func:`contrans_tl.tasks.truthfulqa.score_mc1`) inside
``transplant``, and lm-eval's plain ``hf`` model the unsteered scoring, within 1e-3 nats.

The several-layers case also guards against lm-eval 0.4.8 – 0.4.9.1, whose ``SteeredModel`` built
each hook from a ``lambda`` in the loop (late binding: the last hook point's vector at every hook
point); with those releases export one layer per file. docs/clients.md has the figures.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import contrans_tl as ct
from contrans_tl.export import export_lm_eval
from contrans_tl.handle import ModelHandle
from contrans_tl.tasks.emotion import emotion_task
from contrans_tl.tasks.truthfulqa import score_mc1

import lm_eval  # noqa: E402  (pip install 'contrans_tl[lm-eval]'; CI installs it)
from lm_eval.tasks import TaskManager

pytestmark = pytest.mark.clients

TOLERANCE = 1e-3
"""Nats: per-choice log-likelihoods of lm-eval and of the project may differ by float32 rounding only."""

TASK = "contrans_mc"

QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "A small village in the mountains"], "label": 0},
    {"question": "How do you feel when you hear footsteps behind you at night?", "choices": ["Afraid", "Happy", "Bored and sleepy"], "label": 0},
    {"question": "What happens if you touch a hot stove?", "choices": ["You get burned", "Nothing at all", "It turns cold"], "label": 0},
    {"question": "Which animal barks?", "choices": ["A dog", "A cat", "A fish"], "label": 0},
]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
"""lm-eval scores context "Q: ...\\nA:" + target delimiter " " + choice: score_mc1's prompt, separator and choice."""

SETTINGS = {
    # model: (fixture, {setting: (layers, alpha in norm units)}), as in test_llama_cpp.py
    "gemma-3-270m": ("gemma", {"one layer": ([9], 0.06), "several layers": ([6, 9, 12], 0.03)}),
    "smollm2-135m-instruct": ("smollm", {"one layer": ([15], 0.15), "several layers": ([12, 15, 18], 0.06)}),
}

PROMPTS = [f"Q: {q['question']}\nA:" for q in QUESTIONS]
CHOICES = [q["choices"] for q in QUESTIONS]
CORRECT = [q["label"] for q in QUESTIONS]


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory) -> TaskManager:
    root = tmp_path_factory.mktemp("lm_eval_task")
    (root / "mc.json").write_text(json.dumps(QUESTIONS), encoding="utf-8")
    (root / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=root / "mc.json"), encoding="utf-8")
    return TaskManager(include_path=str(root))


def lm_eval_scores(task_manager: TaskManager, model: str, **model_args: object) -> torch.Tensor:
    """Per-choice log-likelihoods ([question, choice]) from lm-eval's own evaluation loop."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())  # as on the lm_eval command line
    results = lm_eval.simple_evaluate(model=model, model_args=args, tasks=[TASK], task_manager=task_manager,
                                      batch_size=4, device="cpu", log_samples=True, bootstrap_iters=0,
                                      verbosity="ERROR")
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    # resps: one [(loglikelihood, is_greedy)] per choice
    return torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in samples], dtype=torch.float64)


def project_scores(
    model: ModelHandle, vector: ct.ConceptVector | None = None, *, layers: Sequence[int] = (), alpha: float = 0.0
) -> torch.Tensor:
    """The same per-choice log-likelihoods from score_mc1, inside transplant when a vector is given."""
    if vector is None:
        return torch.tensor(score_mc1(model, PROMPTS, CHOICES, CORRECT).scores, dtype=torch.float64)
    with ct.transplant(model, vector, alpha=alpha, layers=list(layers), unit="norm"):
        return torch.tensor(score_mc1(model, PROMPTS, CHOICES, CORRECT).scores, dtype=torch.float64)


def report(name: str, what: str, **figures: float) -> None:
    """One line of measured figures per check (shown with ``pytest -s``; quoted in docs/clients.md)."""
    print(f"\n[lm-eval] {name} {what}: " + ", ".join(f"{k}={v:.2e}" for k, v in figures.items()), file=sys.stderr)


@dataclasses.dataclass
class Case:
    name: str
    model: ModelHandle
    vector: ct.ConceptVector
    checkpoint: Path
    """The converted HF checkpoint that load_model booted: lm-eval's ``pretrained``."""
    base: torch.Tensor
    """Unsteered per-choice log-likelihoods of the project's scoring."""


@pytest.fixture(scope="module", params=list(SETTINGS))
def case(request) -> Case:
    name = request.param
    model = request.getfixturevalue(SETTINGS[name][0])
    vector = ct.refine(model, *emotion_task(("fear",), n_refine=6).contrast("fear"))
    checkpoint = Path(model.original_model.config.name_or_path)
    assert (checkpoint / "config.json").is_file()
    return Case(name, model, vector, checkpoint, project_scores(model))


def test_unsteered_scores_agree(case, task_manager):
    # contrans prepends BOS (TransformerLens's default); Gemma's tokenizer does too, SmolLM2's does not
    scores = lm_eval_scores(task_manager, "hf", pretrained=case.checkpoint, dtype="float32", add_bos_token=True)
    gap = float((scores - case.base).abs().max())
    report(case.name, "unsteered (hf)", max_abs_diff_nats=gap)
    assert gap < TOLERANCE


@pytest.mark.parametrize("setting", ["one layer", "several layers"])
def test_steered_scores_agree(case, setting, task_manager, tmp_path):
    layers, alpha = SETTINGS[case.name][1][setting]
    steer = export_lm_eval(case.vector, tmp_path / "fear.pt", alpha=alpha, unit="norm", layers=layers,
                           model=case.model)
    scores = lm_eval_scores(task_manager, "steered", pretrained=case.checkpoint, steer_path=steer, dtype="float32",
                            add_bos_token=True)
    expected = project_scores(case.model, case.vector, layers=layers, alpha=alpha)
    gap, effect = float((scores - expected).abs().max()), float((expected - case.base).abs().max())
    report(case.name, f"steered {layers} alpha={alpha}", max_abs_diff_nats=gap, steering_effect_nats=effect)
    assert effect > 1.0, "the vector should move the scores"
    assert gap < TOLERANCE


def test_without_bos_scores_differ(case, task_manager):
    """The one setting to get right: a tokenizer that adds no BOS (SmolLM2) needs add_bos_token=True;
    one that adds it itself (Gemma) scores the same without the flag."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(case.checkpoint)  # as lm-eval loads it (contrans's is set to add BOS)
    adds_bos = tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    scores = lm_eval_scores(task_manager, "hf", pretrained=case.checkpoint, dtype="float32")
    gap = float((scores - case.base).abs().max())
    report(case.name, "unsteered (hf) without add_bos_token", max_abs_diff_nats=gap)
    assert gap < TOLERANCE if adds_bos else gap > 0.1
