"""Every public data loader against bad files: named errors (or a documented correct answer), table-driven.

Each case writes files into a fresh folder, calls one loader and expects either a named error (class and a
message fragment that names the file, the row or the argument) or a result check. The table must list
every public loader (test_table_covers_every_loader), so a new loader comes with its bad-file cases.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any, Callable

import pytest

import contrans_tl.datasets as datasets
import contrans_tl.tasks as tasks
from contrans_tl.errors import DataFormatError, InvalidArgumentError
from contrans_tl.tasks import concept, emotion, perplexity, toxigen, truthfulqa

BAD_UTF8 = b"caf\xe9 \xff\xfe not utf-8\n"
TQA_HEAD = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
WIKI_ROW = "The old mill by the river was rebuilt in the spring of that year .\tThe old mill was rebuilt . <::::> It was spring .\n"


def _json(obj: Any) -> str:
    return json.dumps(obj)


def _mc(question: str, targets: dict[str, Any]) -> dict[str, Any]:
    return {"question": question, "mc1_targets": targets}


def _scenarios(**lists: list[str]) -> dict[str, str]:
    return {f"{e}.json": _json(items) for e, items in lists.items()}


# loader name -> (call(folder, **kwargs), the file or folder it is given)
LOADERS: dict[str, Callable[..., Any]] = {
    "load_truthfulqa": lambda root, **kw: truthfulqa.load_truthfulqa(next(root.iterdir()), **kw),
    "load_facts": lambda root, **kw: truthfulqa.load_facts(root / "facts.csv", **kw),
    "load_toxigen_prompts": lambda root, **kw: toxigen.load_toxigen_prompts(root, **kw),
    "load_wikisplit": lambda root, **kw: perplexity.load_wikisplit(root / "validation.tsv", **kw),
    "emotion_scenarios": lambda root, **kw: emotion.emotion_scenarios(root, ["anger", "fear"], **kw),
    "load_concept": lambda root, **kw: concept.load_concept(root / "c.json", **kw),
}

def _concept(**change: Any) -> dict[str, str]:
    data = {"name": "calm", "positive": ["be calm", "stay calm"], "negative": ["panic", "rush"],
            "eval": [{"prompt": "Q1", "choices": ["calm", "angry"], "target": 0},
                     {"prompt": "Q2", "choices": ["calm", "angry"], "target": 1}]}
    data.update(change)
    return {"c.json": _json(data)}


GOOD_TOXIGEN = {"hate_women_1k.txt": "- a\\n- b\n- c\\n- d\n", "neutral_women_1k.txt": "- e\\n- f\n"}

# id -> (loader, files, kwargs, expected: (error class, fragment) or a check of the result)
CASES: dict[str, tuple[str, dict[str, str | bytes], dict[str, Any], Any]] = {
    # ---- TruthfulQA mc_task.json ----
    "tqa-json-good": ("load_truthfulqa", {"mc_task.json": _json([_mc("Q1?", {"A": 1, "B": 0}), _mc("Q2?", {"C": 0, "D": 1})])},
                      {}, lambda qs: [q.correct for q in qs] == [0, 1]),
    "tqa-json-not-utf8": ("load_truthfulqa", {"mc_task.json": BAD_UTF8}, {}, (DataFormatError, "mc_task.json: not UTF-8")),
    "tqa-json-record-too-short": ("load_truthfulqa", {"mc_task.json": _json([{"question": "Q1?"}])}, {},
                                  (DataFormatError, "record 0")),
    "tqa-json-labels-as-words": ("load_truthfulqa", {"mc_task.json": _json([_mc("Q1?", {"A": "false", "B": "True"})])}, {},
                                 lambda qs: qs[0].correct == 1),
    "tqa-json-labels-as-bools": ("load_truthfulqa", {"mc_task.json": _json([_mc("Q1?", {"A": True, "B": False})])}, {},
                                 lambda qs: qs[0].correct == 0),
    "tqa-json-label-unknown": ("load_truthfulqa", {"mc_task.json": _json([_mc("Q1?", {"A": "maybe", "B": 0})])}, {},
                               (DataFormatError, "label 'maybe'")),
    "tqa-json-blank-question": ("load_truthfulqa", {"mc_task.json": _json([_mc("  ", {"A": 1, "B": 0})])}, {},
                                (DataFormatError, "question is empty")),
    "tqa-json-blank-choice": ("load_truthfulqa", {"mc_task.json": _json([_mc("Q1?", {"A": 1, " ": 0})])}, {},
                              (DataFormatError, "choice 1 is empty")),
    "tqa-json-repeated-question": ("load_truthfulqa", {"mc_task.json": _json([_mc("Q1?", {"A": 1, "B": 0})] * 2)}, {},
                                   (DataFormatError, "question 1 repeats question 0")),
    # ---- TruthfulQA.csv ----
    "tqa-csv-good": ("load_truthfulqa", {"TruthfulQA.csv": TQA_HEAD + "A,M,Q1?,Yes,Yes,No; Maybe,s\n"}, {},
                     lambda qs: qs[0].choices == ("Yes", "No", "Maybe")),
    "tqa-csv-not-utf8": ("load_truthfulqa", {"TruthfulQA.csv": TQA_HEAD.encode() + BAD_UTF8}, {},
                         (DataFormatError, "TruthfulQA.csv: not UTF-8")),
    "tqa-csv-row-too-short": ("load_truthfulqa", {"TruthfulQA.csv": TQA_HEAD + "A,M,Q1?\n"}, {},
                              (DataFormatError, "row 2 is too short")),
    "tqa-csv-blank-question": ("load_truthfulqa", {"TruthfulQA.csv": TQA_HEAD + "A,M,  ,Yes,Yes,No,s\n"}, {},
                               (DataFormatError, "question is empty")),
    "tqa-csv-repeated-question": ("load_truthfulqa", {"TruthfulQA.csv": TQA_HEAD + "A,M,Q1?,Yes,Yes,No,s\n" * 2}, {},
                                  (DataFormatError, "repeats")),
    # ---- facts CSV ----
    "facts-good": ("load_facts", {"facts.csv": "statement,label\nThe sky is blue.,1\nFire is cold.,0\n"}, {},
                   lambda rows: rows == [("The sky is blue.", True), ("Fire is cold.", False)]),
    "facts-not-utf8": ("load_facts", {"facts.csv": b"statement,label\n" + BAD_UTF8}, {}, (DataFormatError, "facts.csv: not UTF-8")),
    "facts-row-too-short": ("load_facts", {"facts.csv": "statement,label\nThe sky is blue.\n"}, {},
                            (DataFormatError, "row 2 is too short")),
    "facts-labels-as-words": ("load_facts", {"facts.csv": "statement,label\nA.,true\nB.,True\nC.,FALSE\nD., 0 \n"}, {},
                              lambda rows: [t for _, t in rows] == [True, True, False, False]),
    "facts-label-unknown": ("load_facts", {"facts.csv": "statement,label\nA.,1\nB.,maybe\n"}, {},
                            (DataFormatError, "row 3: label 'maybe'")),
    "facts-blank-statement": ("load_facts", {"facts.csv": "statement,label\n  ,1\n"}, {}, (DataFormatError, "row 2: the statement is empty")),
    "facts-repeated-kept-once": ("load_facts", {"facts.csv": "statement,label\nA.,1\nA.,1\nB.,0\n"}, {},
                                 lambda rows: rows == [("A.", True), ("B.", False)]),
    "facts-contradicting-left-out": ("load_facts", {"facts.csv": "statement,label\nA.,1\nA.,0\nB.,0\n"}, {},
                                     lambda rows: rows == [("B.", False)]),
    # ---- ToxiGen prompt files ----
    "toxigen-good": ("load_toxigen_prompts", GOOD_TOXIGEN, {}, lambda ps: [p.text for p in ps] == ["- a\n- b", "- c\n- d", "- e\n- f"]),
    "toxigen-not-utf8": ("load_toxigen_prompts", {**GOOD_TOXIGEN, "hate_women_1k.txt": BAD_UTF8}, {},
                         (DataFormatError, "hate_women_1k.txt: not UTF-8")),
    "toxigen-per-file-zero": ("load_toxigen_prompts", GOOD_TOXIGEN, {"per_file": 0}, (InvalidArgumentError, "per_file=0")),
    "toxigen-groups-a-string": ("load_toxigen_prompts", GOOD_TOXIGEN, {"groups": "women"}, (InvalidArgumentError, "groups=")),
    "toxigen-blank-lines-skipped": ("load_toxigen_prompts", {"hate_women_1k.txt": "- a\n   \n\n- b\n"}, {},
                                    lambda ps: [p.text for p in ps] == ["- a", "- b"]),
    "toxigen-repeats-kept-once": ("load_toxigen_prompts", {"hate_women_1k.txt": "- a\n- a\n- b\n"}, {},
                                  lambda ps: [p.text for p in ps] == ["- a", "- b"]),
    # ---- WikiSplit TSV ----
    "wikisplit-good": ("load_wikisplit", {"validation.tsv": WIKI_ROW}, {},
                       lambda s: s == ["The old mill by the river was rebuilt in the spring of that year."]),
    "wikisplit-not-utf8": ("load_wikisplit", {"validation.tsv": WIKI_ROW.encode() + BAD_UTF8}, {},
                           (DataFormatError, "validation.tsv: not UTF-8")),
    "wikisplit-row-too-short": ("load_wikisplit", {"validation.tsv": WIKI_ROW + "one column only with many words in it and no tab\n"},
                                {}, (DataFormatError, "row 2 has one column")),
    "wikisplit-n-zero": ("load_wikisplit", {"validation.tsv": WIKI_ROW}, {"n": 0}, (InvalidArgumentError, "n=0")),
    "wikisplit-min-words-zero": ("load_wikisplit", {"validation.tsv": WIKI_ROW}, {"min_words": 0}, (InvalidArgumentError, "min_words=0")),
    "wikisplit-blank-and-repeated-rows": ("load_wikisplit", {"validation.tsv": WIKI_ROW + "  \n" + WIKI_ROW}, {},
                                          lambda s: len(s) == 1),
    # ---- concept files (docs/concepts.md) ----
    "concept-good": ("load_concept", _concept(), {}, lambda c: [it.target for it in c.items] == [0, 1]),
    "concept-not-utf8": ("load_concept", {"c.json": BAD_UTF8}, {}, (DataFormatError, "c.json: not UTF-8")),
    "concept-item-too-short": ("load_concept", _concept(eval=[{"prompt": "Q1", "choices": ["a", "b"]}]), {},
                               (DataFormatError, "eval[0]")),
    "concept-label-unknown": ("load_concept", _concept(eval=[{"prompt": "Q1", "choices": ["a", "b"], "target": "b"}]), {},
                              (DataFormatError, "eval[0].target")),
    "concept-blank-prompt": ("load_concept", _concept(positive=["be calm", "  "]), {}, (DataFormatError, "positive[1]")),
    "concept-repeated-item": ("load_concept", _concept(eval=[{"prompt": "Q1", "choices": ["a", "b"], "target": 0}] * 2), {},
                              (DataFormatError, "eval[1]: a duplicate item")),
    # ---- emotion scenario folders ----
    "scenarios-good": ("emotion_scenarios", _scenarios(anger=["a", "b"], fear=["c", "d"]), {},
                       lambda d: d == {"anger": ["a", "b"], "fear": ["c", "d"]}),
    "scenarios-not-utf8": ("emotion_scenarios", {**_scenarios(fear=["c"]), "anger.json": BAD_UTF8}, {},
                           (DataFormatError, "anger.json")),
    "scenarios-not-a-list": ("emotion_scenarios", {**_scenarios(fear=["c"]), "anger.json": _json({"a": 1})}, {},
                             (DataFormatError, "anger.json must be a JSON list")),
    "scenarios-blank": ("emotion_scenarios", _scenarios(anger=["a", "  "], fear=["c"]), {},
                        (DataFormatError, "anger.json: scenario 1 is empty")),
    "scenarios-repeated": ("emotion_scenarios", _scenarios(anger=["a", "b", "a "], fear=["c"]), {},
                           (DataFormatError, "anger.json: scenario 2 repeats scenario 0")),
    "scenarios-in-two-emotions": ("emotion_scenarios", _scenarios(anger=["a", "b"], fear=["b"]), {},
                                  (DataFormatError, "also a scenario of 'anger'")),
}

NOT_APPLICABLE = {
    ("load_truthfulqa", "count"): "takes no count",
    ("load_facts", "count"): "takes no count",
    ("load_toxigen_prompts", "too-short"): "a prompt is one line; there are no columns",
    ("load_toxigen_prompts", "labels"): "the file name says hate or neutral",
    ("load_wikisplit", "labels"): "no labels",
    ("emotion_scenarios", "too-short"): "a scenario is one string (not-a-list is its shape error)",
    ("emotion_scenarios", "count"): "takes no count",
    ("emotion_scenarios", "labels"): "the file name is the label",
    ("load_concept", "count"): "takes no count",
}
"""(loader, class of bad input) that cannot occur, with why: every other class needs a case above."""

CLASSES = {"not-utf8": ("not-utf8",), "too-short": ("too-short", "record-too-short", "not-a-list"),
           "labels": ("label-unknown", "labels-as-words"), "count": ("-zero",),
           "blank": ("blank",), "repeated": ("repeat", "in-two-emotions")}

PENDING_LEAD: set[str] = set()
"""Checked by contrans_tl.datasets.check_scenarios once tasks/emotion.py (the lead's) calls it: strict xfail
until then, so the line's arrival turns these into failures that ask for this set to be emptied."""


def _case_params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError,
                                   reason="emotion_scenarios does not call check_scenarios yet")] if case in PENDING_LEAD else []
        yield pytest.param(case, marks=marks, id=case)


@pytest.mark.parametrize("case", _case_params())
def test_loader_on_bad_data(case, tmp_path):
    loader, files, kwargs, expected = CASES[case]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if callable(expected):
        assert expected(LOADERS[loader](tmp_path, **kwargs))
        return
    error, fragment = expected
    try:
        LOADERS[loader](tmp_path, **kwargs)
    except error as err:
        assert fragment in str(err), str(err)
    else:
        raise AssertionError(f"{loader} accepted the bad data of {case}")


def test_table_covers_every_loader_and_every_class_of_bad_data():
    """Every public loader (``load_*`` of contrans_tl.tasks.* and contrans_tl.datasets, and the scenario
    folders) is in the table, with a case for each class of bad data unless it cannot occur."""
    public = {name for mod in [datasets] + [importlib.import_module(f"contrans_tl.tasks.{m.name}")
                                            for m in pkgutil.iter_modules(tasks.__path__)]
              for name in getattr(mod, "__all__", ()) if name.startswith("load_")} | {"emotion_scenarios"}
    assert public == set(LOADERS)
    for loader in LOADERS:
        for klass, markers in CLASSES.items():
            has = any(c.startswith(_prefix(loader)) and any(m in c for m in markers) for c in CASES)
            assert has or (loader, klass) in NOT_APPLICABLE, (loader, klass)


def _prefix(loader: str) -> str:
    return {"load_truthfulqa": "tqa-", "load_facts": "facts-", "load_toxigen_prompts": "toxigen-",
            "load_wikisplit": "wikisplit-", "emotion_scenarios": "scenarios-", "load_concept": "concept-"}[loader]


def test_check_scenarios_directly():
    """The check tasks/emotion.py is to call: blank, repeated, shared across emotions, empty."""
    ok = {"anger": ["a", "b"], "fear": ["c"]}
    assert datasets.check_scenarios(ok, "data") == ok
    for data, fragment in (({"anger": ["a", " "]}, "scenario 1 is empty"), ({"anger": ["a", "a"]}, "repeats"),
                           ({"anger": ["a"], "fear": ["a"]}, "also a scenario of 'anger'"), ({"anger": []}, "no scenarios"),
                           ({"anger": ["a", 3]}, "not text")):
        with pytest.raises(DataFormatError, match=fragment):
            datasets.check_scenarios(data, "data")


def test_parse_label():
    assert [datasets.parse_label(v, "x") for v in (1, 0, True, "true", "True", " TRUE ", "1", "no", "False")] == \
        [True, False, True, True, True, True, True, False, False]
    for bad in ("maybe", "", 2, None, 0.5, "10"):
        with pytest.raises(DataFormatError, match="x: label"):
            datasets.parse_label(bad, "x")


def test_public_data_still_loads(shared_dir):
    """The public files pass the checks: the facts file's one contradictory statement (the Nile) and its
    repeated rows are left out / kept once, not an error."""
    data = shared_dir / "data"
    facts = truthfulqa.load_facts(data / "facts")
    assert len(facts) == len({s for s, _ in facts}) and not any(s.startswith("The Nile River is the longest") for s, _ in facts)
    assert len(truthfulqa.load_truthfulqa(data / "truthfulqa" / "TruthfulQA.csv")) == 817
    assert set(emotion.emotion_scenarios(data / "emotions")) == set(emotion.EMOTIONS)
