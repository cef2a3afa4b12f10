"""Alignment evaluations: MC1 scoring, splits, loaders, perplexity, toxicity scorers, the analysis."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from contrans_tl import alignment_data as ad
from contrans_tl import evaluation as ev
from contrans_tl.capture import encode
from contrans_tl.errors import EmptyPromptsError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine run much faster on one thread than on two spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- MC1 on hand-built cases ------------------------------------------------------------------
def test_mc1_from_scores_known_answer():
    scores = [[-1.0, -3.0, -2.0], [-5.0, -0.5], [-2.0, -2.0, -9.0], [-4.0, -1.0, -3.0]]
    correct = [0, 1, 0, 2]
    res = ev.mc1_from_scores(scores, correct)
    assert res.n_correct == 2 and res.n == 4 and res.accuracy == 0.5
    assert res.n_ties == 1  # question 3: correct choice ties for best, counted wrong
    assert res.predictions == [0, 1, 0, 1]


class UnigramLM(torch.nn.Module):
    """A fake LM with the bridge's call signature whose next-token distribution ignores context:
    log p(v) is known in closed form, so every choice's score is known exactly."""

    def __init__(self, tokenizer, favoured: list[int]):
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = SimpleNamespace(default_prepend_bos=True, n_ctx=256)
        logits = torch.zeros(len(tokenizer))
        logits[favoured] = 20.0
        self.logits = torch.nn.Parameter(logits, requires_grad=False)
        self.logprobs = logits.log_softmax(-1)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        b, n = input_ids.shape
        keep = n if not logits_to_keep else int(logits_to_keep)
        return self.logits.expand(b, keep, -1).clone()


def test_score_mc1_known_answer_with_fake_model(tiny_llama):
    tok = tiny_llama.tokenizer
    right = " the old mill"
    right_ids = tok(right, add_special_tokens=False)["input_ids"]
    lm = UnigramLM(tok, favoured=right_ids)
    questions = [
        ("Q: Where does the river run?\nA:", ["the old mill", "Trains leave every hour", "x"], 0),
        ("Q: What is short?\nA:", ["A short one", "the old mill"], 1),
    ]
    res = ev.score_mc1(lm, [q for q, _, _ in questions], [c for _, c, _ in questions], [k for _, _, k in questions],
                       batch_size=2)
    assert res.accuracy == 1.0 and res.predictions == [0, 1]
    # each score is exactly the sum of the unigram log-probs of the choice's tokens
    for (prompt, choices, _), got in zip(questions, res.scores):
        for choice, value in zip(choices, got):
            full = encode(lm, [prompt + " " + choice])[0][0]
            head = encode(lm, [prompt])[0][0]
            expected = float(lm.logprobs[full[len(head):]].sum())
            assert value == pytest.approx(expected, abs=1e-4)
    mean = ev.score_mc1(lm, [questions[0][0]], [questions[0][1]], [0], reduction="mean")
    n_tokens = len(encode(lm, [questions[0][0] + right])[0][0]) - len(encode(lm, [questions[0][0]])[0][0])
    assert mean.scores[0][0] == pytest.approx(res.scores[0][0] / n_tokens, abs=1e-5)


def test_continuation_logprobs_match_unbatched_reference(tiny_llama):
    prompts = ["Q: Where does the river run?\nA:", "Cooking rice", "x"]
    conts = [" past the old mill", " takes about twenty minutes when the water boils", " y"]
    got = ev.continuation_logprobs(tiny_llama, prompts, conts, batch_size=2)
    rows = ev.continuation_rows(tiny_llama, prompts, conts)
    assert torch.allclose(ev.score_rows(tiny_llama, rows, max_logits=1), got, atol=1e-4)  # one row a batch
    with torch.inference_mode():
        for i, (p, c) in enumerate(zip(prompts, conts)):
            full = encode(tiny_llama, [p + c])[0][0]
            n_head = len(encode(tiny_llama, [p])[0][0])
            lp = tiny_llama(torch.tensor([full])).float().log_softmax(-1)[0]
            ref = sum(float(lp[t - 1, full[t]]) for t in range(n_head, len(full)))
            assert got[i].item() == pytest.approx(ref, abs=1e-3)


def test_non_prefix_tokenization_falls_back_to_separate_continuation(tiny_llama):
    rows = ev.continuation_rows(tiny_llama, ["ab"], ["cd"])  # "abcd" may merge across the boundary
    head = encode(tiny_llama, ["ab"])[0][0]
    assert list(rows[0].ids[: len(head)]) == head and rows[0].n_scored == len(rows[0].ids) - len(head)


def test_perplexity_is_exp_of_mean_nll(tiny_llama):
    texts = ["The river runs past the old mill", "Trains leave every hour"]
    res = ev.perplexity(tiny_llama, texts, batch_size=1)
    assert res.perplexity == pytest.approx(math.exp(res.nll_per_token))
    assert res.n_tokens == sum(len(r) - 1 for r in encode(tiny_llama, texts)[0])
    assert 1 < res.perplexity < 10 * len(tiny_llama.tokenizer)


# ---- splits and selection -------------------------------------------------------------------------
@pytest.mark.parametrize("folds", [1, 2, 3])
def test_alpha_selection_split_is_disjoint_from_test(folds):
    splits = ev.selection_splits(817, n_val=50, folds=folds, seed=3)
    assert len(splits) == folds
    for s in splits:
        assert len(s.validation) == 50
        assert not set(s.validation) & set(s.test)
    tested = [i for s in splits for i in s.test]
    assert len(tested) == len(set(tested))  # nothing tested twice
    assert sorted(tested) == (list(range(817)) if folds > 1 else sorted(set(range(817)) - set(splits[0].validation)))
    assert splits == ev.selection_splits(817, n_val=50, folds=folds, seed=3)  # seeded
    assert splits != ev.selection_splits(817, n_val=50, folds=folds, seed=4)


def test_split_too_small_raises():
    with pytest.raises(EmptyPromptsError):
        ev.selection_splits(5, n_val=5)


def test_choose_best_prefers_weakest_intervention_on_ties():
    scores = {0.0: 0.3, 0.1: 0.5, 0.3: 0.5, 0.5: 0.4}
    assert ev.choose_best(scores, cost=abs) == 0.1
    assert ev.choose_best(scores, maximize=False, cost=abs) == 0.0


# ---- toxicity scorers -----------------------------------------------------------------------------
def test_stand_in_scorer_is_labelled_not_toxicity():
    scorer = ev.StandInScorer(["groupx are vermin vermin vermin"] * 3, ["groupx are people who cook"] * 3)
    assert not scorer.is_toxicity_classifier and "NOT a toxicity classifier" in scorer.name
    assert scorer(["vermin everywhere", "people cook"]) == [0.5, 0.0]
    summary = ev.toxicity_summary(scorer, ["vermin", "people cook"])
    assert summary["is_toxicity"] is False and summary["metric"] != "toxic_percent"
    assert summary["percent_above"] == 50.0 and summary["n_empty"] == 0


def test_callable_scorer_wraps_any_function():
    scorer = ev.CallableScorer(lambda t: 1.0 if "bad" in t else 0.0, name="keyword")
    assert isinstance(scorer, ev.ToxicityScorer)
    assert ev.toxicity_summary(scorer, ["bad", "good", "good", "good"])["percent_above"] == 25.0


# ---- loaders on the public data -----------------------------------------------------------------------
def test_truthfulqa_loaders(shared_dir):
    root = shared_dir / "data" / "truthfulqa"
    from_json = ad.load_truthfulqa(root / "mc_task.json")
    from_csv = ad.load_truthfulqa(root / "TruthfulQA.csv")
    assert len(from_json) == 817 and len(from_csv) == 817
    assert ad.load_truthfulqa(root) == from_json  # a folder prefers the JSON
    q = from_json[0]
    assert q.question.startswith("What happens") and q.choices[q.correct].startswith("Nothing in particular")
    assert all(len(q.choices) >= 2 for q in from_csv)


def test_facts_toxigen_wikisplit_loaders(shared_dir):
    data = shared_dir / "data"
    facts = ad.load_facts(data / "facts")
    assert len(facts) > 500 and {t for _, t in facts} == {True, False}
    prompts = ad.load_toxigen_prompts(data / "toxigen", groups=["women"], per_file=5)
    assert len(prompts) == 10 and {p.toxic for p in prompts} == {True, False}
    assert all("\\n" not in p.text and p.text.startswith("-") for p in prompts)
    pos, neg = ad.fairness_prompts(prompts)
    assert len(pos) == len(neg) == 5 and all(p.endswith("\n-") for p in pos)
    sentences = ad.load_wikisplit(data / "wikisplit", n=20)
    assert len(sentences) == 20 and not any(" , " in s or " ." in s for s in sentences)


def test_missing_data_is_a_named_error(tmp_path):
    with pytest.raises(ad.DataUnavailableError):
        ad.load_truthfulqa(tmp_path)
    with pytest.raises(ad.DataUnavailableError):
        ad.load_wikisplit(tmp_path / "none.tsv")


def test_prompt_builders_use_chat_template_only_when_present(tiny_llama):
    plain = ad.honesty_prompts(["Is the sky green?"], tiny_llama.tokenizer, honest=True)
    assert plain == [f"{ad.HONEST_PERSONA}\n\nQ: Is the sky green?\nA:"]
    chat_tok = SimpleNamespace(chat_template="x", apply_chat_template=lambda msgs, **kw: f"<u>{msgs[0]['content']}</u><a>")
    assert ad.honesty_prompts(["Is it?"], chat_tok, honest=False) == [f"<u>{ad.DISHONEST_PERSONA} Is it?</u><a>"]
    assert ad.mc_prompt("Is it?", tokenizer=chat_tok) == ("<u>Is it?</u><a>", "")
    assert ad.mc_prompt("Is it?", instruction="Be honest.") == ("Be honest.\n\nQ: Is it?\nA:", " ")


# ---- the analysis end to end on tiny models -------------------------------------------------------------
def _tiny_data(root):
    (root / "truthfulqa").mkdir(parents=True)
    items = [
        {"question": q, "mc1_targets": {a: 1, b: 0, c: 0}}
        for q, a, b, c in [
            ("Where does the river run?", "Past the old mill.", "Into the sky.", "Nowhere."),
            ("How long does rice take?", "About twenty minutes.", "A year.", "No time."),
            ("When do trains leave?", "Every hour.", "Never.", "Yesterday."),
            ("What is short?", "A short one.", "A long one.", "Nothing."),
            ("Is the mill old?", "Yes, it is old.", "It is new.", "There is no mill."),
            ("Does water boil?", "Yes, when heated.", "No, never.", "Only on Mars."),
        ]
    ]
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps(items))
    prompts = root / "toxigen" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "hate_group_1k.txt").write_text(
        "\n".join(f"- those people are awful {i}\\n- they ruin everything {i}" for i in range(8)))
    (prompts / "neutral_group_1k.txt").write_text(
        "\n".join(f"- those people cook rice {i}\\n- they take the train {i}" for i in range(8)))
    (root / "wikisplit").mkdir()
    (root / "wikisplit" / "validation.tsv").write_text(
        "\n".join(f"The river runs past the old mill , number {i} , every hour .\tsplit" for i in range(30)))
    (root / "facts").mkdir()
    with (root / "facts" / "facts_true_false.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["statement", "label"])
        for i in range(6):
            w.writerow([f"The river runs past the old mill {i}.", 1])
            w.writerow([f"The river runs into the sky {i}.", 0])


def test_alignment_eval_end_to_end_on_tiny_models(tiny_dirs, tmp_path):
    from contrans_tl.analyses import alignment_eval as ae

    _tiny_data(tmp_path / "data")
    cfg = ae.Config(
        source=str(tiny_dirs["llama"]), target=str(tiny_dirs["llama_b"]), tasks=("multi",),
        data_dir=str(tmp_path / "data"), n_val=2, folds=2, n_concept=4, alphas=(0.0, 0.5),
        self_align_model=None, instruct_model=str(tiny_dirs["llama"]),
        n_toxigen_test=2, n_toxigen_val=2, n_toxigen_concept=3, max_new_tokens=3, toxicity_scorer="stand-in",
        n_ppl=4, map_texts=60, out_dir=str(tmp_path / "out"),
    )
    result = ae.run(cfg)
    h = result["honesty"]
    assert h["n_questions"] == 6 and h["n_test"] == 6
    assert set(h["rows"]) == {"base", "transplant", "self-align", "inst-align", "align-training"}
    assert all(0 <= r["mc1"] <= 1 and "ppl" in r for r in h["rows"].values() if r is not h["rows"]["align-training"])
    for fold in h["folds"]:
        assert fold["transplant"]["alpha"] in (0.0, 0.5)
    f = result["fairness"]
    assert f["scorer"]["is_toxicity_classifier"] is False
    assert all(r["is_toxicity"] is False for r in f["rows"].values())
    assert set(result["multi"]["rows"]) == {"base", "honesty", "fairness", "honesty+fairness"}
    md = (tmp_path / "out" / "alignment_eval.md").read_text()
    assert "TruthfulQA MC1" in md and "NOT toxicity" in md and "Toxic %" not in md
    assert "ConTrans" in md and "Self-Align" in md and "Inst-Align" in md
    saved = json.loads((tmp_path / "out" / "alignment_eval.json").read_text())
    assert saved["honesty"]["rows"]["base"]["mc1"] == h["rows"]["base"]["mc1"]


def test_alignment_eval_resumes_from_stored_scores(tiny_dirs, tmp_path, monkeypatch):
    """A rerun (e.g. after a kill) scores no MC1 row again; other settings are refused."""
    import dataclasses

    from contrans_tl.analyses import alignment_eval as ae
    from contrans_tl.errors import SettingsMismatchError

    _tiny_data(tmp_path / "data")
    cfg = ae.Config(source=str(tiny_dirs["llama"]), target=str(tiny_dirs["llama_b"]), data_dir=str(tmp_path / "data"),
                    n_val=2, folds=2, n_concept=4, alphas=(0.0, 0.5), conditions=("base", "transplant", "inst-align"),
                    n_ppl=0, map_texts=60, out_dir=str(tmp_path / "out"))
    first = ae.run(cfg)
    assert len(list((tmp_path / "out" / "cells").glob("model=*.json"))) >= 6 * 2  # base + inst-align, every question
    scored: list[int] = []
    inner = ae.ev.score_rows
    monkeypatch.setattr(ae.ev, "score_rows", lambda model, rows, **kw: scored.append(len(rows)) or inner(model, rows, **kw))
    again = ae.run(cfg)
    assert scored == []  # every MC1 score came from the store
    assert again["honesty"]["rows"] == first["honesty"]["rows"]
    with pytest.raises(SettingsMismatchError, match="n_concept"):
        ae.run(dataclasses.replace(cfg, n_concept=5))


def test_alignment_eval_cli_honesty_fact(tiny_dirs, tmp_path, capsys):
    from contrans_tl.analyses import alignment_eval as ae
    from contrans_tl.cli import main

    _tiny_data(tmp_path / "data")
    argv = ["align-eval", "--source", str(tiny_dirs["llama"]), "--target", str(tiny_dirs["llama_b"]),
            "--data-dir", str(tmp_path / "data"), "--honesty-concept", "facts", "--folds", "1", "--n-val", "2",
            "--alphas", "0,0.3", "--conditions", "base,transplant,inst-align", "--n-ppl", "0", "--map-texts", "60",
            "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| Base |" in out and "| ConTrans |" in out
    saved = json.loads((tmp_path / "out" / "alignment_eval.json").read_text())
    assert saved["honesty"]["concept"] == "honesty-fact" and saved["honesty"]["n_test"] == 4
    assert ae.main(["--data-dir", str(tmp_path / "none"), "--target", str(tiny_dirs["llama_b"]),
                    "--conditions", "base", "--out-dir", str(tmp_path / "o2"), "--truthfulqa",
                    str(tmp_path / "none")]) == 2
