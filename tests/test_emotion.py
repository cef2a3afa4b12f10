from __future__ import annotations

import json

import pytest
import torch

from contrans_tl.tasks.emotion import EMOTIONS, emotion_scenarios
from contrans_tl.tasks.emotion import (
    QUERY,
    contrast_prompts,
    few_shot_prefix,
    label_tokens,
    split_scenarios,
)
from contrans_tl.errors import EmptyPromptsError
from contrans_tl.metrics import layer_cosine, logit_accuracy, token_accuracy


def test_token_and_logit_accuracy_on_hand_built_logits():
    labels = torch.tensor([3, 5, 7])
    logits = torch.zeros(4, 10)
    logits[0, 5] = 2.0  # argmax over vocab = label 1's token
    logits[1, 9] = 3.0  # vocab argmax is a non-label token...
    logits[1, 5] = 1.0  # ...but among labels, label 1 wins
    logits[2, 3] = 1.0  # label 0
    logits[3, 7] = 1.0  # label 2
    assert token_accuracy(logits, 5) == pytest.approx(0.25)
    assert logit_accuracy(logits, labels, 1) == pytest.approx(0.5)
    assert logit_accuracy(logits, labels, 0) == pytest.approx(0.25)
    assert torch.isnan(torch.tensor(token_accuracy(torch.zeros(0, 10), 1)))


def test_layer_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    assert torch.allclose(layer_cosine(a, b), torch.tensor([1.0, -1.0, 0.0]))


def test_builtin_data_has_six_emotions_of_sixty_plus():
    data = emotion_scenarios()
    assert tuple(data) == EMOTIONS
    for emotion, items in data.items():
        assert len(items) >= 60 and len(set(items)) == len(items)
        assert not any(emotion[:5] in s.lower() for s in items)


def test_split_and_contrast_prompts_are_disjoint_and_seeded():
    split = split_scenarios(emotion_scenarios(), seed=0)
    for e in EMOTIONS:
        assert not set(split.refine[e]) & set(split.evaluate[e])
    pos, neg = contrast_prompts(split.refine, "fear", n=10, seed=1)
    assert len(pos) == len(neg) == 10
    assert all(p.startswith("Scenario: ") and p.endswith("The emotion of the above scenario is") for p in pos)
    fear = {QUERY.format(s) for s in split.refine["fear"]}
    assert not fear & set(neg)
    assert contrast_prompts(split.refine, "fear", n=10, seed=1) == (pos, neg)
    assert split_scenarios(emotion_scenarios(), seed=0) == split


def test_few_shot_prefix_answers_each_emotion_once():
    split = split_scenarios(emotion_scenarios())
    prefix = few_shot_prefix(split.refine)
    assert prefix.count("The emotion of the above scenario is") == 6
    for word in ("happy.", "sad.", "angry.", "afraid.", "disgusted.", "surprised."):
        assert prefix.count(" " + word) == 1


def test_label_tokens_distinct(tiny_llama):
    ids = label_tokens(tiny_llama.tokenizer)
    assert len(set(ids.tolist())) == 6


def test_loader_reads_user_directory(tmp_path):
    for e in EMOTIONS:
        (tmp_path / f"{e}.json").write_text(json.dumps([f"{e} a", f"{e} b", f"{e} c", f"{e} d"]))
    assert emotion_scenarios(tmp_path)["anger"][0] == "anger a"
    (tmp_path / "fear.json").write_text("[]")
    with pytest.raises(EmptyPromptsError, match="fear.json"):
        emotion_scenarios(tmp_path)


def test_emotion_items_are_concept_items_scored_by_the_concept_task(tiny_llama):
    """EmotionTask.score is the concept task's scoring of the emotion's items: six label choices, the
    emotion's label the target; the label counts are the row of the transplant matrix."""
    from contrans_tl.tasks.concept import score_items
    from contrans_tl.tasks.emotion import LABEL_CHOICES, emotion_task

    task = emotion_task(n_eval=2)
    task = type(task)(**{**task.__dict__, "prefix": "Scenario: a gift.\nThe emotion is happy.\n\n"})  # short context
    items = task.items("fear", task.negatives("fear"))
    assert all(it.choices == LABEL_CHOICES and it.target == EMOTIONS.index("fear") for it in items)
    scores = score_items(tiny_llama, items, prefix=task.prefix, batch_size=3)
    got = task.score(tiny_llama, "fear", batch_size=4)
    assert got["logit_acc"] == scores.logit_acc and got["token_acc"] == scores.token_acc and got["n"] == len(items)
    assert sum(got["label_counts"].values()) == len(items)
    assert got["label_counts"]["fear"] == sum(scores.logit)  # the diagonal is the Logit Acc (no ties on floats)
    assert got["logit_hits"] == [int(x) for x in scores.logit] and got["token_hits"] == [int(x) for x in scores.token]
    assert sum(got["logit_hits"]) / got["n"] == got["logit_acc"] and sum(got["token_hits"]) / got["n"] == got["token_acc"]


def test_validation_scenarios_are_kept_out_of_contrast_prompts_and_shots():
    from contrans_tl.tasks.emotion import emotion_task

    task = emotion_task(n_eval=3, n_validation=4)
    held = {s for items in task.validation_scenarios.values() for s in items}
    assert len(held) == 24
    for e in EMOTIONS:
        pos, neg = task.contrast(e)
        assert not {QUERY.format(s) for s in held} & set(pos + neg)
        split = task.concept_split(e)
        assert len(split.validation) == 20 and len(split.test) == 15
        assert not {it.prompt for it in split.validation} & set(pos + neg)
    assert not any(QUERY.format(s) in task.prefix for s in held)
    assert emotion_task(n_eval=3).validation_scenarios == {e: [] for e in EMOTIONS}  # default: nothing reserved


def test_wilson_interval_known_values():
    from contrans_tl.metrics import wilson_interval

    low, high = wilson_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(0.0714, abs=5e-4)  # not the degenerate [0, 0] of ±1.96·SE
    low, high = wilson_interval(25, 50)
    assert low == pytest.approx(0.3664, abs=5e-4) and high == pytest.approx(0.6336, abs=5e-4)
    low, high = wilson_interval(50, 50)
    assert high == 1.0 and low == pytest.approx(0.9286, abs=5e-4)
    with pytest.raises(ValueError):
        wilson_interval(51, 50)


def test_accuracy_interval_pools_hits_over_cells():
    from contrans_tl.metrics import accuracy_interval, wilson_interval

    assert accuracy_interval([(0.5, 50)]) == wilson_interval(25, 50)
    assert accuracy_interval([(0.2, 50), (1.0, 50), (0.1, 10)]) == wilson_interval(10 + 50 + 1, 110)
