"""analyses.token_shift on two tiny models: tables, CSV, figure, overlap, two loads."""

from __future__ import annotations

import csv
import json

import pytest

from contrans_tl.analyses import token_shift as ts


@pytest.fixture(scope="module")
def shift_run(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("token_shift")
    argv = ["--source", str(tiny_dirs["llama"]), "--target", str(tiny_dirs["gpt_neox"]), "--out", str(out),
            "--emotions", "happiness,anger", "--n-refine", "3", "--n-eval", "1", "--n-texts", "40",
            "--alpha", "2.0", "--k", "5", "--top", "4", "--lens-layers", "steer,final"]
    assert ts.main(argv) == 0
    return out, json.loads((out / "token_shift.json").read_text())


def test_outputs_and_structure(shift_run, tiny_dirs):
    out, result = shift_run
    assert result["model_loads"] == 2
    assert [m for m, _ in result["loads"]] == [str(tiny_dirs["llama"]), str(tiny_dirs["gpt_neox"])]
    assert set(result["layers"]) == {"steer", "final"}
    assert result["layers"]["steer"]["block"] == result["target_layer"] == 0
    assert result["layers"]["final"]["block"] == 1
    n_prompts = result["task"]["n_negatives_per_emotion"]
    assert n_prompts == 5  # one scenario from each other emotion
    for section in result["layers"].values():
        for name in ("transplanted", "native"):
            for emotion in ("happiness", "anger"):
                for side in ("rising", "falling"):
                    pairs = section[name][emotion][side]
                    counts = [n for _, n in pairs]
                    assert counts == sorted(counts, reverse=True)
                    assert 1 <= max(counts) <= n_prompts
                    # every prompt contributes at most k labels
                    assert sum(counts) <= n_prompts * result["k"]
        for emotion, ov in section["overlap"].items():
            assert 0.0 <= ov["per_prompt_rising"]["mean_shared_fraction"] <= 1.0
            assert ov["aggregate_top"]["rising"]["of"] == 4
        ex = section["examples"]["happiness"][0]
        assert len(ex["rising"]) == 5 and all(d > 0 for _, d in ex["rising"])
        assert all(d < 0 for _, d in ex["falling"])
    md = (out / "token_shift.md").read_text()
    assert "| happiness |" in md and "Native vector" in md and "per-prompt shared rising" in md
    rows = list(csv.DictReader((out / "token_shift.csv").open()))
    assert {r["layer"] for r in rows} == {"steer", "final"}
    assert {r["vector"] for r in rows} == {"transplanted", "native"}
    first = rows[0]
    assert int(first["count"]) == result["layers"][first["layer"]][first["vector"]][first["concept"]][first["direction"]][0][1]
    for spec in ("steer", "final"):
        assert (out / f"token_shift_{spec}.png").is_file() and (out / f"token_shift_{spec}.pdf").is_file()


def test_config_checks():
    with pytest.raises(ValueError):
        ts.Config(lens_layers=("middle",))
    assert ts._lens_index("final", 3, 10) == 9
    assert ts._lens_index("-2", 3, 10) == 8
    assert ts._lens_index("steer", 3, 10) == 3
