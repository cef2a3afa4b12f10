"""The alignment tasks: continuation scoring, MC1, perplexity, splits, toxicity scorers, loaders, prompts."""

from __future__ import annotations

import builtins
import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from contrans_tl.capture import encode
from contrans_tl.errors import DataUnavailableError, InvalidArgumentError, ModelUnavailableError
from contrans_tl.tasks import perplexity as ppl
from contrans_tl.tasks import prompts as pr
from contrans_tl.tasks import scoring as sc
from contrans_tl.tasks import selection as sel
from contrans_tl.tasks import toxigen as tg
from contrans_tl.tasks import truthfulqa as tqa


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- references computed without the library's scorer: one plain HF forward per sequence -------
def hf_ids(model, text: str) -> list[int]:
    """Token ids with the library's BOS policy (BOS first when the model prepends one)."""
    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([model.tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []) + ids


def hf_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1 … n−1, from the wrapped HF model (no padding, no batching)."""
    with torch.no_grad():
        logits = model.original_model(torch.tensor([ids])).logits[0].double()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def hf_continuation_logprob(model, prompt: str, continuation: str) -> tuple[float, int]:
    """(log p(continuation | prompt), number of its tokens); the texts used here tokenize as a prefix."""
    head, full = hf_ids(model, prompt), hf_ids(model, prompt + continuation)
    assert full[: len(head)] == head and len(full) > len(head)
    return float(hf_token_logprobs(model, full)[len(head) - 1 :].sum()), len(full) - len(head)


def hf_mc1(model, prompts: list[str], choices: list[list[str]], correct: list[int]) -> tuple[float, list[list[float]]]:
    """MC1 (the correct choice strictly best by summed log-prob) and every choice's score."""
    scores = [[hf_continuation_logprob(model, p, c)[0] for c in cs] for p, cs in zip(prompts, choices)]
    hits = [s[k] > max(x for i, x in enumerate(s) if i != k) for s, k in zip(scores, correct)]
    return sum(hits) / len(hits), scores


def hf_perplexity(model, texts: list[str], prefix: str | None = None) -> float:
    """exp(mean NLL per scored token): every token after the first, or the text after ``prefix``."""
    total, n = 0.0, 0
    for text in texts:
        if prefix is None:
            lp = hf_token_logprobs(model, hf_ids(model, text))
            total, n = total + float(lp.sum()), n + len(lp)
        else:
            value, count = hf_continuation_logprob(model, prefix, " " + text)
            total, n = total + value, n + count
    return math.exp(-total / n)


# ---- MC1 on hand-built cases ------------------------------------------------------------------
def test_mc1_from_scores_known_answer():
    scores = [[-1.0, -3.0, -2.0], [-5.0, -0.5], [-2.0, -2.0, -9.0], [-4.0, -1.0, -3.0]]
    correct = [0, 1, 0, 2]
    res = tqa.mc1_from_scores(scores, correct)
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
    res = tqa.score_mc1(lm, [q for q, _, _ in questions], [c for _, c, _ in questions], [k for _, _, k in questions],
                       batch_size=2)
    assert res.accuracy == 1.0 and res.predictions == [0, 1]
    # each score is exactly the sum of the unigram log-probs of the choice's tokens
    for (prompt, choices, _), got in zip(questions, res.scores):
        for choice, value in zip(choices, got):
            full = encode(lm, [prompt + " " + choice])[0][0]
            head = encode(lm, [prompt])[0][0]
            expected = float(lm.logprobs[full[len(head):]].sum())
            assert value == pytest.approx(expected, abs=1e-4)
    mean = tqa.score_mc1(lm, [questions[0][0]], [questions[0][1]], [0], reduction="mean")
    n_tokens = len(encode(lm, [questions[0][0] + right])[0][0]) - len(encode(lm, [questions[0][0]])[0][0])
    assert mean.scores[0][0] == pytest.approx(res.scores[0][0] / n_tokens, abs=1e-5)


def test_continuation_logprobs_match_unbatched_reference(tiny_llama):
    prompts = ["Q: Where does the river run?\nA:", "Cooking rice", "x"]
    conts = [" past the old mill", " takes about twenty minutes when the water boils", " y"]
    got = sc.continuation_logprobs(tiny_llama, prompts, conts, batch_size=2)
    rows = sc.continuation_rows(tiny_llama, prompts, conts)
    assert torch.allclose(sc.score_rows(tiny_llama, rows, max_logits=1), got, atol=1e-4)  # one row a batch
    with torch.inference_mode():
        for i, (p, c) in enumerate(zip(prompts, conts)):
            full = encode(tiny_llama, [p + c])[0][0]
            n_head = len(encode(tiny_llama, [p])[0][0])
            lp = tiny_llama(torch.tensor([full])).float().log_softmax(-1)[0]
            ref = sum(float(lp[t - 1, full[t]]) for t in range(n_head, len(full)))
            assert got[i].item() == pytest.approx(ref, abs=1e-3)


def test_non_prefix_tokenization_falls_back_to_separate_continuation(tiny_llama):
    rows = sc.continuation_rows(tiny_llama, ["ab"], ["cd"])  # "abcd" may merge across the boundary
    head = encode(tiny_llama, ["ab"])[0][0]
    assert list(rows[0].ids[: len(head)]) == head and rows[0].n_scored == len(rows[0].ids) - len(head)


def test_perplexity_is_exp_of_mean_nll(tiny_llama):
    texts = ["The river runs past the old mill", "Trains leave every hour"]
    res = ppl.perplexity(tiny_llama, texts, batch_size=1)
    assert res.perplexity == pytest.approx(math.exp(res.nll_per_token))
    assert res.n_tokens == sum(len(r) - 1 for r in encode(tiny_llama, texts)[0])
    assert 1 < res.perplexity < 10 * len(tiny_llama.tokenizer)
    # the per-text parts add up to the whole
    assert sum(res.text_tokens) == res.n_tokens and len(res.text_nll) == 2
    assert math.exp(sum(res.text_nll) / res.n_tokens) == pytest.approx(res.perplexity)


def _ppl_of(nll_per_text, tokens):
    n = sum(tokens)
    return ppl.PerplexityResult(math.exp(sum(nll_per_text) / n), sum(nll_per_text) / n, n, len(tokens),
                                tuple(nll_per_text), tuple(tokens))


def test_perplexity_interval_resamples_texts():
    """Equal per-token loss on every text: no spread. Unequal: an interval around the estimate,
    and two results of the same texts are resampled together (the mean of their perplexities)."""
    flat = _ppl_of([2.0, 4.0, 6.0], [1, 2, 3])  # 2 nats per token in every text
    low, high = ppl.perplexity_interval([flat])
    assert low == pytest.approx(math.exp(2)) and high == pytest.approx(math.exp(2))
    spread = _ppl_of([1.0, 3.0, 0.5, 4.0] * 5, [1, 1, 1, 1] * 5)
    low, high = ppl.perplexity_interval([spread], seed=1)
    assert low < spread.perplexity < high
    assert math.exp(0.5) < low and high < math.exp(4.0)
    twice = ppl.perplexity_interval([spread, spread], seed=1)
    assert twice == pytest.approx((low, high))  # paired: the mean of equal results is each of them
    assert ppl.perplexity_interval([spread], seed=1) == (low, high)  # seeded
    with pytest.raises(InvalidArgumentError, match="results"):
        ppl.perplexity_interval([spread, flat])


@pytest.mark.parametrize("prefix", [None, pr.HONEST_PERSONA])
def test_perplexity_equals_independent_hf_computation(tiny_model, prefix):
    """Batched and padded, the scorer gives the perplexity of plain one-text HF forward passes."""
    texts = ["The river runs past the old mill", "Trains leave every hour",
             "Cooking rice takes about twenty minutes when the water boils steadily"]
    want = hf_perplexity(tiny_model, texts, prefix)
    for batch_size in (1, 3):
        got = ppl.perplexity(tiny_model, texts, prefix=prefix, batch_size=batch_size)
        assert got.perplexity == pytest.approx(want, rel=1e-4)
    n_tokens = sum(len(hf_ids(tiny_model, t)) - 1 for t in texts) if prefix is None else sum(
        hf_continuation_logprob(tiny_model, prefix, " " + t)[1] for t in texts)
    assert got.n_tokens == n_tokens


def test_score_mc1_equals_independent_hf_computation(tiny_model):
    questions = [("Where does the river run?", ["Past the old mill.", "Into the sky.", "Nowhere."], 0),
                 ("When do trains leave?", ["Hourly.", "Never, since the line closed last spring.",
                                            "Yesterday at noon, or so they say."], 0),
                 ("Does water boil?", ["Only on Mars.", "Yes, when heated."], 1)]
    prompts = [f"Q: {q}\nA:" for q, _, _ in questions]
    choices = [c for _, c, _ in questions]
    correct = [k for _, _, k in questions]
    want_mc1, want_scores = hf_mc1(tiny_model, prompts, [[" " + c for c in cs] for cs in choices], correct)
    got = tqa.score_mc1(tiny_model, prompts, choices, correct, separator=" ", batch_size=4)
    assert got.accuracy == want_mc1 == 2 / 3  # the long wrong answers lose, the short one wins once
    for got_q, want_q in zip(got.scores, want_scores):
        assert got_q == pytest.approx(want_q, abs=1e-4)


# ---- splits and selection -------------------------------------------------------------------------
@pytest.mark.parametrize("folds", [1, 2, 3])
def test_alpha_selection_split_is_disjoint_from_test(folds):
    splits = sel.selection_splits(817, n_val=50, folds=folds, seed=3)
    assert len(splits) == folds
    for s in splits:
        assert len(s.validation) == 50
        assert not set(s.validation) & set(s.test)
    tested = [i for s in splits for i in s.test]
    assert len(tested) == len(set(tested))  # nothing tested twice
    assert sorted(tested) == (list(range(817)) if folds > 1 else sorted(set(range(817)) - set(splits[0].validation)))
    assert splits == sel.selection_splits(817, n_val=50, folds=folds, seed=3)  # seeded
    assert splits != sel.selection_splits(817, n_val=50, folds=folds, seed=4)


def test_split_too_small_raises():
    with pytest.raises(InvalidArgumentError):
        sel.selection_splits(5, n_val=5)


def test_choose_best_prefers_weakest_intervention_on_ties():
    scores = {0.0: 0.3, 0.1: 0.5, 0.3: 0.5, 0.5: 0.4}
    assert sel.choose_best(scores, cost=abs) == 0.1
    assert sel.choose_best(scores, maximize=False, cost=abs) == 0.0


# ---- toxicity scorers -----------------------------------------------------------------------------
def test_choose_within_bound_never_scores_or_picks_a_point_over_the_bound():
    from contrans_tl.tasks.selection import choose_within_bound

    guard = {0.0: 1.0, 0.1: 1.05, 0.3: 1.19, 0.5: 1.4, 1.0: 3.0}
    scored: list[float] = []

    def score(a: float) -> float:
        scored.append(a)
        return a  # the stronger, the better: only the bound stops it

    best, record = choose_within_bound(list(guard), guard.__getitem__, score, limit=1.2)
    assert best == 0.3 and sorted(scored) == [0.0, 0.1, 0.3]
    assert record[0.5] == {"guard": 1.4, "allowed": False} and record[0.3]["score"] == 0.3
    assert choose_within_bound(list(guard), guard.__getitem__, score, limit=10)[0] == 1.0
    with pytest.raises(InvalidArgumentError, match="points"):
        choose_within_bound([0.5, 1.0], guard.__getitem__, score, limit=1.2)


def test_stand_in_scorer_is_labelled_not_toxicity():
    scorer = tg.StandInScorer(["groupx are vermin vermin vermin"] * 3, ["groupx are people who cook"] * 3)
    assert not scorer.is_toxicity_classifier and "NOT a toxicity classifier" in scorer.name
    assert scorer(["vermin everywhere", "people cook"]) == [0.5, 0.0]
    summary = tg.toxicity_summary(scorer, ["vermin", "people cook"])
    assert summary["is_toxicity"] is False and summary["metric"] != "toxic_percent"
    assert summary["percent_above"] == 50.0 and summary["n_empty"] == 0


def test_callable_scorer_wraps_any_function():
    scorer = tg.CallableScorer(lambda t: 1.0 if "bad" in t else 0.0, name="keyword")
    assert isinstance(scorer, tg.ToxicityScorer)
    assert tg.toxicity_summary(scorer, ["bad", "good", "good", "good"])["percent_above"] == 25.0


# ---- loaders on the public data -----------------------------------------------------------------------
def test_truthfulqa_loaders(shared_dir):
    root = shared_dir / "data" / "truthfulqa"
    from_json = tqa.load_truthfulqa(root / "mc_task.json")
    from_csv = tqa.load_truthfulqa(root / "TruthfulQA.csv")
    assert len(from_json) == 817 and len(from_csv) == 817
    assert tqa.load_truthfulqa(root) == from_json  # a folder prefers the JSON
    q = from_json[0]
    assert q.question.startswith("What happens") and q.choices[q.correct].startswith("Nothing in particular")
    assert all(len(q.choices) >= 2 for q in from_csv)


def test_facts_toxigen_wikisplit_loaders(shared_dir):
    data = shared_dir / "data"
    facts = tqa.load_facts(data / "facts")
    assert len(facts) > 500 and {t for _, t in facts} == {True, False}
    prompts = tg.load_toxigen_prompts(data / "toxigen", groups=["women"], per_file=5)
    assert len(prompts) == 10 and {p.toxic for p in prompts} == {True, False}
    assert all("\\n" not in p.text and p.text.startswith("-") for p in prompts)
    pos, neg = tg.fairness_prompts(prompts)
    assert len(pos) == len(neg) == 5 and all(p.endswith("\n-") for p in pos)
    sentences = ppl.load_wikisplit(data / "wikisplit", n=20)
    assert len(sentences) == 20 and not any(" , " in s or " ." in s for s in sentences)


def test_missing_data_is_a_named_error(tmp_path):
    with pytest.raises(DataUnavailableError):
        tqa.load_truthfulqa(tmp_path)
    with pytest.raises(DataUnavailableError):
        ppl.load_wikisplit(tmp_path / "none.tsv")


def test_prompt_builders_use_chat_template_only_when_present(tiny_llama):
    plain = tqa.honesty_prompts(["Is the sky green?"], tiny_llama.tokenizer, honest=True)
    assert plain == [f"{pr.HONEST_PERSONA}\n\nQ: Is the sky green?\nA:"]
    chat_tok = SimpleNamespace(chat_template="x", apply_chat_template=lambda msgs, **kw: f"<u>{msgs[0]['content']}</u><a>")
    assert tqa.honesty_prompts(["Is it?"], chat_tok, honest=False) == [f"<u>{pr.DISHONEST_PERSONA} Is it?</u><a>"]
    assert tqa.mc_prompt("Is it?", tokenizer=chat_tok) == ("<u>Is it?</u><a>", "")
    assert tqa.mc_prompt("Is it?", instruction="Be honest.") == ("Be honest.\n\nQ: Is it?\nA:", " ")


# ---- the offline toxicity scorer is independent of the refinement prompts -------------------------
OFFENSIVE = ["You are a stupid idiot.", "Shut up, you worthless moron.", "What a dumb piece of crap.",
             "Get lost, you pathetic loser."]
NEUTRAL = ["Have a nice day.", "The library opens at nine on weekdays.", "She cooked pasta for her friends.",
           "The train to the coast leaves at noon."]


def _offline(monkeypatch) -> None:
    """The hub is unreachable: ToxiGen RoBERTa cannot load (and no network is tried)."""
    def unavailable(*_args, **_kwargs):
        raise ModelUnavailableError("hub unreachable (test)")
    monkeypatch.setattr(tg, "HubToxicityClassifier", unavailable)


def _prompt_files(root, hateful: list[str], neutral: list[str]):
    """A ToxiGen prompt folder with one group: each list becomes one prompt line per item pair."""
    root.mkdir()
    for kind, items in (("hate", hateful), ("neutral", neutral)):
        lines = ["\\n".join(f"- {a}" for a in (x, y)) for x, y in zip(items, items[1:])]
        (root / f"{kind}_groupx_1k.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts = tg.load_toxigen_prompts(root)
    return [p.text for p in prompts if p.toxic], [p.text for p in prompts if not p.toxic]


def test_profanity_check_scores_offensive_text_higher():
    scorer = tg.ProfanityCheckScorer()
    assert isinstance(scorer, tg.ToxicityScorer) and scorer.is_toxicity_classifier
    assert "alt-profanity-check" in scorer.name and "independent" in scorer.name
    offensive, neutral = scorer(OFFENSIVE), scorer(NEUTRAL)
    assert all(0.0 <= s <= 1.0 for s in offensive + neutral)
    assert min(offensive) > 0.8 and max(neutral) < 0.3
    assert scorer([]) == []
    summary = tg.toxicity_summary(scorer, OFFENSIVE + NEUTRAL)
    assert summary["is_toxicity"] is True and summary["metric"] == "toxic_percent"
    assert summary["percent_above"] == 50.0 and summary["scorer"] == scorer.name


def test_offline_default_scorer_is_independent_of_the_toxigen_prompts(monkeypatch, tmp_path):
    """Updated default: offline, "auto" is ProfanityCheckScorer (it was the circular stand-in).
    Its scores do not move when the refinement prompts change; the stand-in's do."""
    _offline(monkeypatch)
    a = _prompt_files(tmp_path / "a", ["groupx are vermin", "groupx are vermin and thieves", "vermin all"] * 2,
                      ["groupx cook dinner", "groupx are neighbours", "groupx like music"] * 2)
    b = _prompt_files(tmp_path / "b", ["groupx ruin towns", "groupx ruin schools", "they ruin it"] * 2,
                      ["groupx plant trees", "groupx are teachers", "groupx read books"] * 2)
    probe = ["groupx are vermin", "groupx ruin towns", *OFFENSIVE[:1], *NEUTRAL[:1]]
    with pytest.warns(UserWarning, match="RoBERTa unavailable"):
        scorer_a, scorer_b = tg.toxicity_scorer("auto", *a), tg.default_toxicity_scorer(*b)
    assert isinstance(scorer_a, tg.ProfanityCheckScorer) and isinstance(scorer_b, tg.ProfanityCheckScorer)
    assert scorer_a(probe) == scorer_b(probe)
    assert not inspect.signature(tg.ProfanityCheckScorer).parameters  # nothing to build it from
    # the circular stand-in, by contrast, learns its words from the prompts it is given
    assert tg.StandInScorer(*a)(probe) != tg.StandInScorer(*b)(probe)
    assert "circular" in tg.StandInScorer(*a).name
    assert isinstance(tg.toxicity_scorer("profanity-check"), tg.ProfanityCheckScorer)


def test_stand_in_only_on_request_and_no_silent_fallback(monkeypatch):
    _offline(monkeypatch)
    assert isinstance(tg.toxicity_scorer("stand-in", ["vermin vermin vermin"], ["people cook"]), tg.StandInScorer)
    with pytest.raises(ModelUnavailableError):
        tg.toxicity_scorer("roberta")
    with pytest.raises(InvalidArgumentError):
        tg.default_toxicity_scorer(prefer="lexicon")
    real_import = builtins.__import__

    def no_profanity_check(name, *args, **kwargs):
        if name == "profanity_check":
            raise ImportError("not installed (test)")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_profanity_check)
    with pytest.raises(ModelUnavailableError, match="RoBERTa is unavailable.*contrans_tl\\[toxicity\\]"):
        tg.toxicity_scorer("auto", ["vermin vermin vermin"], ["people cook"])
