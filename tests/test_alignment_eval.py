"""The alignment evaluation analysis end to end on tiny models: honesty, fairness, multi, resume, CLI."""

from __future__ import annotations

import csv
import json

import pytest

from contrans_tl.sweep import CellStore, cell_key
from contrans_tl.tasks import scoring
from contrans_tl.tasks.prompts import HONEST_PERSONA
from tests.test_tasks_alignment import hf_mc1, hf_perplexity


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the analysis end to end on tiny models -------------------------------------------------------------
QUESTIONS = [
    ("Where does the river run?", "Past the mill.", "Into the sky above the hills, far away.", "Nowhere at all, ever."),
    ("How long does rice take?", "About twenty minutes.", "A year.", "No time."),
    ("When do trains leave?", "Hourly.", "Never, since the line closed last spring.", "Only yesterday afternoon."),
    ("What is short?", "A short one.", "A long one.", "Nothing."),
    ("Is the mill old?", "Yes.", "It is new, built only last year by the town.", "There is no mill anywhere here."),
    ("Does water boil?", "Yes, when heated.", "No, never.", "Only on Mars."),
]
"""TruthfulQA-shaped questions, the correct choice first as in the real file; it is the shortest in
half of them, so a random model's MC1 (summed log-probs favour short answers) is neither 0 nor 1."""

PPL_TEXTS = [f"The river runs past the old mill, number {i}, every hour." for i in range(4)]
"""The first n_ppl=4 WikiSplit sentences of _tiny_data, as the loader detokenizes them."""


def _reference_mc1(model, instruction: str | None = None) -> tuple[float, list[list[float]]]:
    """MC1 of QUESTIONS with plain "Q: …\nA:" prompts, from plain HF forward passes."""
    head = f"{instruction}\n\n" if instruction else ""
    prompts = [f"{head}Q: {q}\nA:" for q, *_ in QUESTIONS]
    return hf_mc1(model, prompts, [[" " + c for c in cs] for _, *cs in QUESTIONS], [0] * len(QUESTIONS))


def _tiny_data(root):
    (root / "truthfulqa").mkdir(parents=True)
    items = [{"question": q, "mc1_targets": {a: 1, b: 0, c: 0}} for q, a, b, c in QUESTIONS]
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


def test_alignment_eval_end_to_end_on_tiny_models(tiny_dirs, tiny_llama, tiny_llama_b, tmp_path):
    from contrans_tl.analyses import alignment_eval as ae

    _tiny_data(tmp_path / "data")
    cfg = ae.Config(
        source=str(tiny_dirs["llama"]), target=str(tiny_dirs["llama_b"]), tasks=("multi",),
        data_dir=str(tmp_path / "data"), n_val=2, folds=2, n_concept=4, alphas=(0.0, 0.5),
        self_align_model=None, instruct_model=str(tiny_dirs["llama"]),
        n_toxigen_test=2, n_toxigen_val=2, n_toxigen_concept=3, max_new_tokens=3, toxicity_scorer="stand-in",
        n_ppl=4, map_texts=60, out=str(tmp_path / "out"),
    )
    result = ae.run(cfg)
    h = result["honesty"]
    assert h["n_questions"] == 6 and h["n_test"] == 6
    assert set(h["rows"]) == {"base", "transplant", "self-align", "inst-align", "align-training"}
    assert all(0 <= r["mc1"] <= 1 and "ppl" in r for r in h["rows"].values() if r is not h["rows"]["align-training"])
    # the unsteered rows are what plain HF forward passes of the same weights give
    assert h["rows"]["base"]["mc1"] == _reference_mc1(tiny_llama_b)[0] == 0.5
    assert h["rows"]["align-training"]["mc1"] == _reference_mc1(tiny_llama)[0]
    assert h["rows"]["base"]["ppl"] == pytest.approx(hf_perplexity(tiny_llama_b, PPL_TEXTS), rel=1e-4)
    assert result["multi"]["rows"]["base"]["mc1"] == h["rows"]["base"]["mc1"]
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


def test_alignment_eval_scores_equal_independent_hf_computation(tiny_dirs, tiny_llama, tiny_llama_b, tmp_path):
    """The unsteered rows' MC1, per-choice scores and perplexities are what plain HF forward
    passes of the same models give (the target is llama_b, the instruct model llama)."""
    from contrans_tl.analyses import alignment_eval as ae

    _tiny_data(tmp_path / "data")
    cfg = ae.Config(
        source=str(tiny_dirs["llama"]), target=str(tiny_dirs["llama_b"]), data_dir=str(tmp_path / "data"),
        conditions=("base", "inst-align", "align-training"), instruct_model=str(tiny_dirs["llama"]),
        n_val=2, folds=2, n_ppl=4, out=str(tmp_path / "out"),
    )
    rows = ae.run(cfg)["honesty"]["rows"]
    store = CellStore(tmp_path / "out" / "cells")
    # (row, model scored, instruction before each question, and the key its cells are stored under)
    for row, model, instruction, tag, cond in [
        ("base", tiny_llama_b, None, "target", "base"),
        ("inst-align", tiny_llama_b, HONEST_PERSONA, "target-instructed", "inst"),
        ("align-training", tiny_llama, None, "instruct-model", "own"),
    ]:
        want_mc1, want_scores = _reference_mc1(model, instruction)
        assert 0 < want_mc1 < 1  # a score that a broken scorer could move either way
        assert rows[row]["mc1"] == want_mc1 and rows[row]["n"] == len(QUESTIONS)
        # every stored per-choice score, not only the accuracy they add up to
        for i, want in enumerate(want_scores):
            assert store.get(cell_key(model=tag, cond=cond, q=i)) == pytest.approx(want, abs=1e-4), (row, i)
    assert rows["base"]["ppl"] == pytest.approx(hf_perplexity(tiny_llama_b, PPL_TEXTS), rel=1e-4)
    inst_ppl = hf_perplexity(tiny_llama_b, PPL_TEXTS, HONEST_PERSONA)  # conditional on the instruction
    assert rows["inst-align"]["ppl"] == pytest.approx(inst_ppl, rel=1e-4)


def test_alignment_eval_resumes_from_stored_scores(tiny_dirs, tmp_path, monkeypatch):
    """A rerun (e.g. after a kill) scores no MC1 row again; other settings are refused."""
    import dataclasses

    from contrans_tl.analyses import alignment_eval as ae
    from contrans_tl.errors import SettingsMismatchError

    _tiny_data(tmp_path / "data")
    cfg = ae.Config(source=str(tiny_dirs["llama"]), target=str(tiny_dirs["llama_b"]), data_dir=str(tmp_path / "data"),
                    n_val=2, folds=2, n_concept=4, alphas=(0.0, 0.5), conditions=("base", "transplant", "inst-align"),
                    n_ppl=0, map_texts=60, out=str(tmp_path / "out"))
    first = ae.run(cfg)
    assert len(list((tmp_path / "out" / "cells").glob("model=*.json"))) >= 6 * 2  # base + inst-align, every question
    scored: list[int] = []
    inner, inner_choices = scoring.score_rows, scoring.choice_logprobs
    monkeypatch.setattr(scoring, "score_rows", lambda model, rows, **kw: scored.append(len(rows)) or inner(model, rows, **kw))
    monkeypatch.setattr(scoring, "choice_logprobs",  # the MC1 scorer (the concept task's)
                        lambda model, prompts, *a, **kw: scored.append(len(prompts)) or inner_choices(model, prompts, *a, **kw))
    again = ae.run(cfg)
    assert scored == []  # every MC1 score and every fluency came from the store
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


def test_honesty_refines_outside_validation_and_test_and_reports_intervals(tiny_dirs, tmp_path):
    """Each fold's honesty vector is refined on questions outside its validation and test sets;
    MC1 carries its Wilson interval and perplexity a bootstrap interval around it."""
    from contrans_tl.analyses import alignment_eval as ae
    from contrans_tl.metrics import wilson_interval

    _tiny_data(tmp_path / "data")
    cfg = ae.Config(source=str(tiny_dirs["llama"]), target=str(tiny_dirs["llama_b"]), data_dir=str(tmp_path / "data"),
                    n_val=1, folds=2, n_concept=100, alphas=(0.0, 0.5), conditions=("base", "transplant"),
                    n_ppl=8, map_texts=60, out=str(tmp_path / "out"))
    h = ae.run(cfg)["honesty"]
    for fold in h["folds"]:
        refined, validation = set(fold["refinement_questions"]), set(fold["validation_questions"])
        assert refined and not refined & validation
        assert fold["n_validation"] + fold["n_test"] + len(refined) == 6  # every other question refines
    tested = [set(range(6)) - set(f["validation_questions"]) - set(f["refinement_questions"]) for f in h["folds"]]
    assert sorted(i for t in tested for i in t) == list(range(6))  # the test folds: what is neither
    for row in h["rows"].values():
        assert row["mc1_ci95"] == list(wilson_interval(row["n_correct"], row["n"]))
        low, high = row["ppl_ci95"]
        assert low <= row["ppl"] <= high and low < high
    assert h["fluency"]["kl_bound"] == 0.1 and h["fluency"]["n_texts"] == 19
    for fold in h["folds"]:  # the frontier of each search: every grid point with its KL and validation MC1
        points = fold["transplant"]["frontier"]
        assert [p["alpha"] for p in points] == [0.0, 0.5] and points[0]["kl"] == 0.0 and points[1]["kl"] > 0
        assert all(p["allowed"] == (p["kl"] <= 0.1) for p in points)
    md = (tmp_path / "out" / "alignment_eval.md").read_text()
    base = h["rows"]["base"]
    assert f"{100 * base['mc1']:.1f} [{100 * base['mc1_ci95'][0]:.1f}, {100 * base['mc1_ci95'][1]:.1f}]" in md


def test_alpha_search_never_passes_the_fluency_bound(tiny_dirs, tmp_path):
    """A validation score that always prefers the strongest alpha gets the strongest one whose KL on generic
    text stays within the bound; the points above it are in the frontier, marked not allowed. With the
    bound lifted, the same search takes the strongest alpha (so the bound is what stopped it)."""
    import contrans_tl as ct
    from contrans_tl.analyses import alignment_eval as ae
    from contrans_tl.analyses.alignment_setup import choose_under_bound

    _tiny_data(tmp_path / "data")
    alphas = (0.0, 0.02, 0.1, 1.0, 8.0)

    def search(bound: float, out: str):
        cfg = ae.Config(source=str(tiny_dirs["llama"]), target=str(tiny_dirs["llama_b"]), data_dir=str(tmp_path / "data"),
                        alphas=alphas, conditions=("base",), n_ppl=0, kl_bound=bound, n_fluency_texts=2,
                        out=str(tmp_path / out))
        run = ae._prepare(cfg)
        vec = ct.refine(run.target, ["The river is calm and slow."] * 2, ["The river is wild and loud!"] * 2)
        return choose_under_bound(run, vec, lambda point: point[1], key="test")

    steer, record = search(0.01, "bounded")
    kl = {p["alpha"]: p["kl"] for p in record["frontier"]}
    over = [a for a in alphas if kl[a] is None or kl[a] > 0.01]
    assert over and 8.0 in over and kl[0.0] == 0.0  # the test means something: the strongest alpha breaks fluency
    assert steer[1] not in over and steer[1] == max(a for a in alphas if a not in over)
    assert all(not p["allowed"] for p in record["frontier"] if p["alpha"] in over)
    assert record["kl"] <= 0.01 and record["kl_bound"] == 0.01
    free, _ = search(1e12, "free")
    assert free[1] == 8.0
