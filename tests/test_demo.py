"""The main job end to end in its quick form, on the real offline pair, and the notebook (marker ``e2e``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from contrans_tl.cli import main

E2E = pytest.mark.e2e
"""The quick demo on the real offline pair runs minutes: its tests are their own CI step (`pytest -m e2e`)."""

EMOTIONS = ["happiness", "sadness", "anger", "fear", "disgust", "surprise"]


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, smollm, gemma) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


@E2E
def test_quick_demo_writes_results_figures_and_summary(quick_demo):
    result = json.loads((quick_demo / "results.json").read_text())
    assert set(result["results"]) == set(EMOTIONS)
    assert result["layers"] and 0 < result["alpha"]
    for e in EMOTIONS:
        row = result["results"][e]
        for cond in ("mapped", "native"):
            for a in ("0", f"{result['alpha']:g}"):
                for side in ("negatives", "positives"):
                    metrics = row[cond][a][side]
                    assert 0.0 <= metrics["token_acc"] <= 1.0 and 0.0 <= metrics["logit_acc"] <= 1.0
        headline_random = row["random"][f"{result['alpha']:g}"]
        assert len(headline_random["seeds"]) == result["config"]["random_seeds"]
        assert "negatives" in headline_random
    # the map is fitted at the layers the run may transplant into (the validation grid's candidates), no others
    candidates = {int(k.split(":")[0]) for k in result["selection"]["grid"]}
    assert {t for _, t in result["map"]["pairs"]} == candidates and len(result["map"]["r2_heldout"]) == len(candidates)
    assert set(result["norm_reference"]["layers"]) == {str(t) for t in candidates}
    # the transplant matrix: one row per emotion, every negative counted once, the diagonal = Logit Acc
    rows = result["confusion"]["transplanted"]["counts"]
    for e in EMOTIONS:
        transplanted = result["headline"][e]["transplanted"]
        assert sum(rows[e].values()) == transplanted["n"]
        assert rows[e][e] == round(transplanted["logit_acc"] * transplanted["n"])
        low, high = result["measurability"][e]["transplanted"]
        assert low <= transplanted["logit_acc"] <= high
        assert isinstance(result["measurability"][e]["measurable"], bool)
    for stem in ("fig2a_accuracy_vs_alpha", "fig2b_pca_before_after", "fig5_accuracy_vs_examples",
                 "fig7_8_hidden_states_2d"):
        for suffix in (".png", ".pdf"):
            assert (quick_demo / "figures" / f"{stem}{suffix}").stat().st_size > 1000
    summary = (quick_demo / "summary.md").read_text()
    assert "smollm2-135m-instruct → gemma-3-270m" in summary and "| fear |" in summary
    assert "Fluency:" in summary and "Sample continuations" in summary and "causal ratio" in summary


@E2E
def test_demo_chooses_within_the_fluency_bound_and_reports_it(quick_demo):
    """The chosen (layer, alpha) is the best validation score among points within the perplexity
    bound; the fluency table, the samples and the goals are computed from the run's own cells."""
    result = json.loads((quick_demo / "results.json").read_text())
    sel, flu = result["selection"], result["fluency"]
    chosen = sel["grid"][f"{'-'.join(map(str, result['layers']))}:{result['alpha']:g}"]
    assert chosen["allowed"] and chosen["max_ppl_ratio"] <= sel["max_ppl_ratio"]
    allowed = [row for row in sel["grid"].values() if row["allowed"]]
    assert chosen["score"] == max(row["score"] for row in allowed)
    assert all("score" not in row for row in sel["grid"].values() if not row["allowed"])
    assert chosen["score"] == pytest.approx((chosen["token_acc"] + chosen["logit_acc"]) / 2)  # select_on="both"
    # the fluency table's mapped column at the chosen alpha is what the grid's guard read (its maximum)
    a = f"{result['alpha']:g}"
    assert max(flu["mapped"][e][a] for e in EMOTIONS) == pytest.approx(chosen["max_ppl_ratio"])
    assert flu["base_ppl"] > 1 and all(r > 0 for r in flu["native"].values())
    # samples: the transplanted answers are the steered model's own words, not a copy of the unsteered ones
    rows = result["samples"]["emotions"]
    assert set(rows) == set(EMOTIONS)
    assert any(rows[e]["transplanted"]["answer"] != rows[e]["unsteered"]["answer"] for e in EMOTIONS)
    # goals: margins over the larger of baseline and random, from the headline rows
    for e in EMOTIONS:
        h = result["headline"][e]
        want = h["transplanted"]["token_acc"] - max(h["baseline"]["token_acc"], h["random"]["token_acc"])
        assert result["goals"]["per_emotion"][e]["token_acc_margin"] == pytest.approx(want)
    mean = lambda c, m: sum(result["headline"][e][c][m] for e in EMOTIONS) / len(EMOTIONS)  # noqa: E731
    gain = mean("native", "logit_acc") - mean("baseline", "logit_acc")
    assert result["goals"]["causal_ratio"]["logit_acc"] == pytest.approx(
        (mean("transplanted", "logit_acc") - mean("baseline", "logit_acc")) / gain)
    assert result["map"]["outlier_factor"] == 10.0 and result["map"]["outliers_dropped"] >= 0


@E2E
def test_native_and_mapped_vectors_share_one_alpha_unit(quick_demo, smollm, gemma):
    """At one alpha the native skyline and the transplanted vector get offsets of the same length."""
    import torch

    from contrans_tl.analyses import _common as cm
    from contrans_tl.analyses import emotion_transfer as et
    from contrans_tl.artifacts import AffineMap
    from contrans_tl.sweep import CellStore
    from contrans_tl.transplant import steering_offsets

    cfg = et.Config(quick=True, out=str(quick_demo)).effective()
    task = et.emotion_task(cfg.emotions, n_refine=cfg.n_refine or None, n_eval=cfg.n_negatives, seed=cfg.seed)
    r = et._Run(cfg, task, smollm, gemma, CellStore(quick_demo / "cells"), quick_demo / "artifacts", cm.PhaseTimes())
    amap = AffineMap.load(quick_demo / "artifacts" / "map.safetensors")
    mapped, native = et._refine_vectors(r, amap)
    reference = json.loads((quick_demo / "artifacts" / "reference_norms.json").read_text())["norms"]
    for e in EMOTIONS:
        assert torch.equal(mapped[e].layer_norms, native[e].layer_norms)
        assert mapped[e].provenance["norm_reference"] == native[e].provenance["norm_reference"] == et.NORM_REFERENCE
        for layer in amap.target_layers:
            lengths = [steering_offsets([v], [0.3], layers=[layer], unit="norm")[layer].norm() for v in (mapped[e], native[e])]
            assert float(lengths[0]) == pytest.approx(float(lengths[1]), rel=1e-5)
            assert float(lengths[0]) == pytest.approx(0.3 * reference[layer], rel=1e-5)


@E2E
def test_rerun_resumes_from_finished_cells(quick_demo):
    cells = {p.name: p.stat().st_mtime_ns for p in (quick_demo / "cells").glob("*.json")}
    before = json.loads((quick_demo / "results.json").read_text())
    assert main(["demo", "--quick", "--no-plots", "--out", str(quick_demo)]) == 0
    after = json.loads((quick_demo / "results.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in (quick_demo / "cells").glob("*.json")} == cells
    assert after["results"] == before["results"] and after["headline"] == before["headline"]
    # where the time went: the resumed run reused every cell and artifact, and reports their recorded cost
    first, again = before["phases"], after["phases"]
    assert {"load models", "map: corpus", "map: fit", "refine vectors", "validation grid", "figures",
            "evaluate fear: random", "Fig 5: refinement sizes"} <= set(first)
    for name in ("map: corpus", "map: fit", "refine vectors", "validation grid", "evaluate fear: mapped"):
        assert first[name]["reused_wall_s"] == 0 and first[name]["wall_s"] > 0
        assert again[name]["reused_wall_s"] > 0.5 * first[name]["wall_s"]  # recorded cost, not this run's
        assert again[name]["total_wall_s"] >= again[name]["reused_wall_s"]


@E2E
def test_notebook_runs(quick_demo):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = Path(__file__).resolve().parents[1]
    nb = nbformat.read(root / "notebooks" / "emotion_transfer.ipynb", as_version=4)
    os.environ["CONTRANS_QUICK"] = "1"
    os.environ["CONTRANS_NOTEBOOK_OUT"] = str(quick_demo)  # resumes the quick run's cells
    nbclient.NotebookClient(nb, timeout=900, resources={"metadata": {"path": str(root)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "transplant" in outputs and "held-out R2" in outputs


def test_installed_command_offers_the_demo_from_any_directory(tmp_path):
    """The README's `contrans demo` goes through the console script, not this checkout's sys.path."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "contrans"
    assert script.is_file(), f"no console script at {script}: install the project with pip"
    done = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("demo", "size-matrix", "checkpoint-sweep", "token-shift", "align-eval"):
        assert command in done.stdout
