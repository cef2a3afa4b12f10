"""The concept task: the choice scorer against hand computations, concept files, splits and leaks."""

from __future__ import annotations

import json

import pytest
import torch

from contrans_tl.capture import encode, next_token_logits
from contrans_tl.cli import main
from contrans_tl.errors import ConceptFileError, InvalidArgumentError
from contrans_tl.tasks.concept import (
    ChoiceItem,
    Concept,
    ConceptSplit,
    check_held_out,
    concept_from_dict,
    item_scores,
    load_concept,
    save_concept,
    score_items,
    split_concept,
)
from contrans_tl.tasks.scoring import ChoiceLogprobs, choice_logprobs, choice_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_logprob(model, context: list[int], tokens: tuple[int, ...]) -> float:
    """log p(tokens | context) from one unbatched forward of context + tokens, summed over the tokens."""
    ids = torch.tensor([context + list(tokens)])
    with torch.inference_mode():
        lp = torch.log_softmax(model(ids)[0].double(), -1)
    return float(sum(lp[len(context) - 1 + j, t] for j, t in enumerate(tokens)))


def test_choice_scores_match_a_hand_computation_with_a_multi_token_choice(tiny_llama):
    prompt = "The river runs past the old mill and"
    choices = [" the", " turns toward the sea", " a"]
    tokens = [choice_tokens(tiny_llama.tokenizer, prompt, c) for c in choices]
    assert len(tokens[1]) > 2 and len(tokens[0]) == 1  # the test means something: one choice spans several tokens
    got = choice_logprobs(tiny_llama, [prompt], [choices])
    (context,), _ = encode(tiny_llama, [prompt])
    for c, toks, value in zip(choices, tokens, got.logprobs[0]):
        assert value == pytest.approx(_hand_logprob(tiny_llama, context, toks), abs=1e-4), c
    assert got.n_tokens[0] == tuple(len(t) for t in tokens)
    assert got.top[0] == int(next_token_logits(tiny_llama, [prompt])[0].argmax())


def test_choice_scores_after_a_shared_prefix_equal_one_forward_of_prefix_and_prompt(tiny_llama):
    prefix = "Cooking rice takes about twenty minutes.\n"
    prompts = ["The river runs past", "Trains leave every"]
    choices = [[" the old mill", " a"], [" hour", " day of the week"]]
    got = choice_logprobs(tiny_llama, prompts, choices, prefix=prefix, batch_size=1)
    (prefix_ids,), _ = encode(tiny_llama, [prefix])
    for i, prompt in enumerate(prompts):
        context = prefix_ids + list(tiny_llama.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for c, value in zip(choices[i], got.logprobs[i]):
            want = _hand_logprob(tiny_llama, context, choice_tokens(tiny_llama.tokenizer, prompt, c))
            assert value == pytest.approx(want, abs=1e-4)
    batched = choice_logprobs(tiny_llama, prompts, choices, prefix=prefix, batch_size=8)  # other padding, same numbers
    assert all(a == pytest.approx(b, abs=1e-4) for x, y in zip(got.logprobs, batched.logprobs) for a, b in zip(x, y))


def test_item_outcomes_logit_ties_count_as_misses_and_token_reads_the_first_token():
    items = [ChoiceItem("p1", (" a", " b"), 0), ChoiceItem("p2", (" a", " b"), 1), ChoiceItem("p3", (" a", " b"), 0)]
    scored = ChoiceLogprobs(((-1.0, -2.0), (-1.0, -2.0), (-1.5, -1.5)), ((5, 7), (5, 7), (5, 7)), ((1, 1),) * 3, (5, 7, 5))
    out = item_scores(items, scored)
    assert out.logit == (True, False, False)  # p3: a tie is no win
    assert out.token == (True, True, True) and out.predicted == (0, 0, 0)
    from contrans_tl.tasks.frontier import item_values

    assert out.logit_acc == pytest.approx(1 / 3) and list(item_values(out, "both")) == [1.0, 0.5, 0.5]


def test_score_items_is_steered_by_an_open_transplant(tiny_llama):
    import contrans_tl as ct

    items = [ChoiceItem("The river runs past", (" the", " a"), 0), ChoiceItem("Trains leave every", (" hour", " day"), 1)]
    base = choice_logprobs(tiny_llama, [i.prompt for i in items], [list(i.choices) for i in items])
    v = ct.refine(tiny_llama, ["The sun is out"], ["The rain is here"])
    with ct.transplant(tiny_llama, v, alpha=50.0, layers=[1]):
        steered = choice_logprobs(tiny_llama, [i.prompt for i in items], [list(i.choices) for i in items])
        scores = score_items(tiny_llama, items)
    assert steered.logprobs != base.logprobs and scores.n == 2


GOOD = {"name": "sentiment", "description": "d", "positive": ["I love it.", "Great day."],
        "negative": ["I hate it.", "Awful day."],
        "eval": [{"prompt": f"Item {i} is", "choices": [" good", " bad"], "target": i % 2} for i in range(10)]}


def test_concept_file_round_trip_and_split(tmp_path):
    path = save_concept(concept_from_dict(GOOD), tmp_path / "c.json")
    c = load_concept(path)
    assert c.name == "sentiment" and len(c.items) == 10 and c.items[3] == ChoiceItem("Item 3 is", (" good", " bad"), 1)
    split = split_concept(c, seed=1)
    assert len(split.validation) == 3 and len(split.test) == 7
    assert split_concept(c, seed=1) == split and split_concept(c, seed=2).how != split.how  # seeded, recorded
    assert sorted(split.how["validation"] + split.how["test"]) == list(range(10))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("negative"), "negative: missing"),
    (lambda d: d["negative"].pop(), "negative: 1 prompts for 2 positive"),
    (lambda d: d["eval"][4].update(target=2), r"eval\[4\].target"),
    (lambda d: d["eval"][4].update(target=True), r"eval\[4\].target"),
    (lambda d: d.update(eval=d["eval"][:7]), "fewer than the split needs"),
    (lambda d: d["eval"].append(dict(d["eval"][0])), r"eval\[10\]: a duplicate item"),
    (lambda d: d.update(evals=[]), "evals: unknown key"),
    (lambda d: d["negative"].__setitem__(0, "I love it."), r"negative\[0\]: equals positive\[0\]"),
    (lambda d: d["eval"][0].update(prompt="Great day."), "is also a contrast prompt"),
    (lambda d: d["eval"][0].update(choices=[" good"]), "two or more"),
    (lambda d: d["positive"].__setitem__(1, "   "), r"positive\[1\]"),
])
def test_malformed_concept_files_are_one_line_named_errors(tmp_path, capsys, change, message):
    data = json.loads(json.dumps(GOOD))
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConceptFileError, match=message):
        split_concept(load_concept(path))
    assert main(["transfer", "--concept", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("contrans: error:") and "bad.json" in err[0]
    assert not (tmp_path / "out").exists()  # refused before any model loads or folder is claimed


def test_concept_file_not_utf8_or_not_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(ConceptFileError, match="not UTF-8"):
        load_concept(path)
    path.write_text('{"name": ')
    with pytest.raises(ConceptFileError, match="not valid JSON"):
        load_concept(path)


def test_held_out_check_catches_an_item_that_is_a_contrast_prompt_or_a_shot():
    c = concept_from_dict(GOOD)
    split = split_concept(c)
    check_held_out(c, split)
    leaked = ConceptSplit((ChoiceItem("Great day.", (" good", " bad"), 0),), split.test)
    with pytest.raises(InvalidArgumentError, match="contrast prompts"):
        check_held_out(c, leaked)
    shot = Concept(c.name, c.positive, c.negative, c.items, prefix="Item 1 is bad.\n")
    with pytest.raises(InvalidArgumentError, match="prefix"):
        check_held_out(shot, split_concept(shot, seed=0, validation_fraction=0.9, min_test=1))
