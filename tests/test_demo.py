"""The main job end to end in its quick form on the real offline pair, and the notebooks (marker ``e2e``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from contrans_tl.cli import main

EMOTIONS = ["happiness", "sadness", "anger", "fear", "disgust", "surprise"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, smollm, gemma) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def _result(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_quick_demo_writes_the_instrument_keys_figures_and_summary(quick_demo):
    result = _result(quick_demo)
    rows = result["frontier"]
    assert {r["emotion"] for r in rows} == set(EMOTIONS) and all("concept" not in r for r in rows)
    assert {r["condition"] for r in rows} == {"baseline", "mapped", "native", "random", "prompting"}
    for r in rows:
        assert r["split"] in ("validation", "test") and 0 <= r["logit_acc"] <= 1 and 0 <= r["token_acc"] <= 1
        assert r["condition"] in ("baseline", "prompting") or r["kl"] is None or r["kl"] >= 0
    te = result["transfer_efficiency"]
    assert set(te) >= {"value", "ci95", "kl_range"}
    assert set(result["tests"]) == set(EMOTIONS)
    assert all({"vs_baseline_p", "vs_random_p"} <= set(t) for t in result["tests"].values())
    assert set(result["operating_point"]["concepts"]) == set(EMOTIONS)
    for e in EMOTIONS:
        assert Path(result["artifacts"][e]).name == f"mapped_{e}.safetensors" and Path(result["artifacts"][e]).is_file()
    assert "Q4_K" in result["target"]["weights"] and "Q4_1" in result["source"]["weights"]  # what the models are
    for stem in ("frontier", "frontier_validation", "fig2b_pca_before_after", "fig5_accuracy_vs_examples",
                 "fig7_8_hidden_states_2d"):
        for suffix in (".png", ".pdf"):
            assert (quick_demo / "figures" / f"{stem}{suffix}").stat().st_size > 1000
    summary = (quick_demo / "summary.md").read_text()
    assert "smollm2-135m-instruct → gemma-3-270m" in summary and "| fear |" in summary
    assert "Transfer efficiency" in summary and "Transplant matrix" in summary and "Sample continuations" in summary


def test_every_emotion_has_its_own_random_directions_each_with_its_own_kl(quick_demo):
    result = _result(quick_demo)
    n = result["config"]["n_random"]
    rnd = [r for r in result["frontier"] if r["condition"] == "random" and r["split"] == "test"]
    assert {r["direction"] for r in rnd} == {f"{e}/{s}" for e in EMOTIONS for s in range(n)}
    per_direction = {r["direction"]: r["kl"] for r in rnd if r["emotion"] == "fear"}
    assert len(set(per_direction.values())) == len(per_direction)  # distinct directions, distinct costs


def test_operating_points_are_the_best_validation_rows_within_the_bound(quick_demo):
    result = _result(quick_demo)
    bound = result["operating_point"]["kl_bound"]
    for e in EMOTIONS:
        val = [r for r in result["frontier"] if r["emotion"] == e and r["condition"] == "mapped" and r["split"] == "validation"]
        allowed = [r for r in val if r["kl"] is not None and r["kl"] <= bound]
        score = lambda r: (r["logit_acc"] + r["token_acc"]) / 2  # noqa: E731
        want = min((r["alpha"] for r in allowed if score(r) == max(map(score, allowed))), default=0.0)
        assert result["operating_point"]["concepts"][e]["alpha"] == want


def test_native_and_mapped_vectors_share_one_alpha_unit(quick_demo):
    import torch

    from contrans_tl.artifacts import ConceptVector

    reference = json.loads((quick_demo / "artifacts" / "reference_norms.json").read_text())["norms"]
    for e in EMOTIONS:
        mapped = ConceptVector.load(quick_demo / "artifacts" / f"mapped_{e}.safetensors")
        assert torch.allclose(mapped.layer_norms, torch.tensor(reference))
        assert mapped.provenance["norm_reference"].startswith("target's mean resid_post norm")


def test_rerun_resumes_from_finished_cells(quick_demo):
    cells = {p.name: p.stat().st_mtime_ns for p in (quick_demo / "cells").glob("*.json")}
    before = _result(quick_demo)
    assert main(["demo", "--quick", "--no-plots", "--out", str(quick_demo)]) == 0
    after = _result(quick_demo)
    assert {p.name: p.stat().st_mtime_ns for p in (quick_demo / "cells").glob("*.json")} == cells
    assert after["frontier"] == before["frontier"] and after["tests"] == before["tests"]
    first, again = before["phases"], after["phases"]
    for name in ("map: corpus", "validation: mapped frontier, operating point", "test: native frontier"):
        assert first[name]["reused_wall_s"] == 0 and first[name]["wall_s"] > 0
        assert again[name]["reused_wall_s"] > 0.5 * first[name]["wall_s"]  # recorded cost, not this run's


@pytest.mark.parametrize("name, marker", [("emotion_transfer", "held-out R2"), ("own_concept", "transfer efficiency")])
def test_notebook_runs(quick_demo, tmp_path, name, marker):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    os.environ["CONTRANS_QUICK"] = "1"
    os.environ["CONTRANS_NOTEBOOK_OUT"] = str(quick_demo if name == "emotion_transfer" else tmp_path)
    nbclient.NotebookClient(nb, timeout=900, resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert marker in outputs
