"""`contrans transfer` end to end on tiny models, and the rules of the instrument it shares with the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contrans_tl.cli import main
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.tasks.concept import ChoiceItem, ConceptSplit, concept_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["river", "mill", "train", "rice", "bridge", "garden", "market", "road", "school", "harbour", "valley", "tower"]
CONCEPT = {"name": "calm", "description": "calm rather than loud", "instruction": "Everything is calm.",
           "positive": [f"The {w} is calm and quiet." for w in WORDS[:6]],
           "negative": [f"The {w} is loud and busy." for w in WORDS[:6]],
           "eval": [{"prompt": f"Near the {w}, the evening was", "choices": [" calm", " loud"], "target": 0} for w in WORDS]}


def _run(tmp_path: Path, tiny_dirs, *extra: str) -> dict:
    path = tmp_path / "calm.json"
    path.write_text(json.dumps(CONCEPT))
    argv = ["transfer", "--concept", str(path), "--source", str(tiny_dirs["llama"]), "--target", str(tiny_dirs["llama_b"]),
            "--out", str(tmp_path / "out"), "--quick", "--layers", "1", "--n-fluency-texts", "2", "--n-random", "3",
            "--map-corpus", "neutral:80", *extra]
    assert main(argv) == 0
    return json.loads((tmp_path / "out" / "results.json").read_text())


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, tiny_dirs):
    tmp = tmp_path_factory.mktemp("transfer")
    return tmp, _run(tmp, tiny_dirs)


def test_transfer_writes_the_frontier_efficiency_operating_point_tests_and_vectors(transfer_run):
    tmp, result = transfer_run
    rows = result["frontier"]
    assert {r["condition"] for r in rows} == {"baseline", "mapped", "native", "random", "prompting"}
    for r in rows:
        assert {"concept", "condition", "alpha", "kl", "dce", "logit_acc", "token_acc", "split"} <= set(r)
        assert r["concept"] == "calm" and r["split"] in ("validation", "test")
    alphas = result["config"]["alphas"]
    for cond in ("mapped", "native"):
        for split in ("validation", "test"):
            assert sorted(r["alpha"] for r in rows if r["condition"] == cond and r["split"] == split) == sorted(alphas)
    te = result["transfer_efficiency"]
    assert set(te) >= {"value", "ci95", "kl_range"} and te["kl_range"] == list(result["config"]["te_kl_range"])
    op = result["operating_point"]
    assert op["layers"] == [1] and "calm" in op["concepts"]
    assert set(result["tests"]["calm"]) >= {"vs_baseline_p", "vs_random_p"}
    split = result["concepts"]["calm"]["split"]
    assert len(split["validation"]) + len(split["test"]) == len(CONCEPT["eval"]) and not set(split["validation"]) & set(split["test"])
    from contrans_tl.artifacts import ConceptVector
    from contrans_tl.export import export_gguf

    vector = ConceptVector.load(result["artifacts"]["calm"])
    assert vector.layers == (1,) and vector.layer_norms is not None
    assert vector.provenance["operating_point"]["alpha"] == op["concepts"]["calm"]["alpha"]
    export_gguf(vector, tmp / "calm.gguf", alpha=0.1, unit="norm")  # ready for llama.cpp
    assert (tmp / "out" / "figures" / "frontier.png").stat().st_size > 1000
    assert "Transfer efficiency" in (tmp / "out" / "summary.md").read_text()


def test_operating_point_is_the_best_validation_row_within_the_bound(transfer_run):
    _, result = transfer_run
    bound = result["operating_point"]["kl_bound"]
    val = [r for r in result["frontier"] if r["condition"] == "mapped" and r["split"] == "validation"]
    allowed = [r for r in val if r["kl"] is not None and r["kl"] <= bound]
    score = lambda r: (r["logit_acc"] + r["token_acc"]) / 2  # noqa: E731 — select_on "both"
    if allowed:
        best = max(score(r) for r in allowed)
        want = min(r["alpha"] for r in allowed if score(r) == best)
    else:
        want = 0.0
    assert result["operating_point"]["concepts"]["calm"]["alpha"] == want


def test_random_directions_are_distinct_per_concept_and_seed_each_with_its_own_kl(transfer_run):
    _, result = transfer_run
    rnd = [r for r in result["frontier"] if r["condition"] == "random" and r["split"] == "test"]
    assert sorted({r["direction"] for r in rnd}) == [f"calm/{s}" for s in range(3)]
    kl = {(r["direction"], r["alpha"]): r["kl"] for r in rnd}
    assert len(set(kl.values())) == len(kl)  # one direction shared by all would repeat its KL at a shared alpha
    from contrans_tl.analyses._transfer_run import random_vector
    import contrans_tl as ct

    like = ct.ConceptVector(torch.ones(3, 48), ct.ModelIdentity("m", None, 3, 48), (0, 1, 2), "mapped", torch.ones(3))
    a, b, c = (random_vector(like, concept, seed).vectors for concept, seed in (("anger", 0), ("fear", 0), ("anger", 1)))
    for x, y in ((a, b), (a, c)):
        assert float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0)).__abs__() < 0.2
    assert torch.equal(a, random_vector(like, "anger", 0).vectors)  # seeded: the same direction on a rerun


def test_a_rerun_recomputes_no_cell(transfer_run, tiny_dirs):
    tmp, first = transfer_run
    cells = {p.name: p.stat().st_mtime_ns for p in (tmp / "out" / "cells").glob("*.json")}
    again = _run(tmp, tiny_dirs)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "out" / "cells").glob("*.json")} == cells
    assert again["frontier"] == first["frontier"] and again["transfer_efficiency"] == first["transfer_efficiency"]


def test_validation_stage_scores_no_test_item(tiny_dirs, tmp_path, monkeypatch):
    """The operating point is chosen before any test item is scored: every scoring call of the validation
    stage is on validation items (a choice made on test items would have to score them here)."""
    from contrans_tl.analyses import _frontier_run as fr_mod
    from contrans_tl.analyses import concept_transfer as ctr
    from contrans_tl.analyses._transfer_run import start_run

    path = tmp_path / "calm.json"
    path.write_text(json.dumps(CONCEPT))
    cfg = ctr.Config(concept=str(path), source=str(tiny_dirs["llama"]), target=str(tiny_dirs["llama_b"]),
                     out=str(tmp_path / "o"), quick=True, layers=(1,), n_fluency_texts=1,
                     map_corpus="neutral:60").effective(ctr.QUICK)
    concepts = ctr.concept_runs(cfg)
    run = start_run(cfg, concepts, ctr.PROTOCOL)
    mapped, native = run.refine_vectors(run.fit_or_load_map())
    frontier = fr_mod.Frontier(run, mapped, native)
    test_prompts = {it.prompt for it in concepts[0].split.test}
    seen: list[set[str]] = []
    inner = frontier.scores
    monkeypatch.setattr(frontier, "scores", lambda steering, name, entries: seen.append({it.prompt for _, it in entries})
                        or inner(steering, name, entries))
    selection = frontier.choose()
    assert seen and not set().union(*seen) & test_prompts and selection["layers"] == [1]


def test_an_item_that_is_a_contrast_prompt_is_refused_before_models_load(tmp_path):
    from contrans_tl.analyses import concept_transfer as ctr
    from contrans_tl.analyses._transfer_run import ConceptRun, start_run

    c = concept_from_dict(CONCEPT)
    leak = ConceptSplit((ChoiceItem(CONCEPT["positive"][0], (" calm", " loud"), 0),), c.items[:5])
    cfg = ctr.Config(concept="x.json", source="no-such-model", target="no-such-model", out=str(tmp_path / "o"))
    with pytest.raises(InvalidArgumentError, match="contrast prompts"):
        start_run(cfg, [ConceptRun(c, leak)], ctr.PROTOCOL)  # a model load would fail with another error


def test_installed_command_offers_the_jobs_from_any_directory(tmp_path):
    """The README's `contrans demo` goes through the console script, not this checkout's sys.path."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "contrans"
    assert script.is_file(), f"no console script at {script}: install the project with pip"
    done = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("demo", "transfer", "size-matrix", "checkpoint-sweep", "token-shift", "align-eval"):
        assert command in done.stdout


def test_source_layer_option_sets_the_layer_the_map_reads(tmp_path, tiny_dirs):
    result = _run(tmp_path, tiny_dirs, "--source-layer", "0", "--n-random", "1")
    assert [tuple(p) for p in result["map"]["pairs"]] == [(0, 1)]  # depth-matched would read source layer 1


def test_source_layer_past_the_source_model_is_a_named_error(tmp_path, tiny_dirs, capsys):
    path = tmp_path / "calm.json"
    path.write_text(json.dumps(CONCEPT))
    argv = ["transfer", "--concept", str(path), "--source", str(tiny_dirs["llama"]), "--target", str(tiny_dirs["llama_b"]),
            "--out", str(tmp_path / "out"), "--quick", "--layers", "1", "--source-layer", "99"]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("contrans: error:")]
    assert len(errors) == 1 and "source_layer: layer 99 out of range" in errors[0]
