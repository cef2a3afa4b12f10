"""analyses.size_matrix on two tiny models: 2N − 1 loads, consistent matrices, resume."""

from __future__ import annotations

import json

import pytest

from contrans_tl.analyses import size_matrix as sm
from contrans_tl.errors import ContransError
from contrans_tl.testing import make_tiny_model_dir

SMALL = ["--emotions", "happiness", "--n-refine", "2", "--n-eval", "1", "--alphas", "2.0", "--batch-size", "8"]
NEUTRAL = ["--map-corpus", "neutral", "--n-texts", "30"]  # the paper's corpus, 30 sentences: a map with samples to spare


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sm_models")
    # n_ctx 1024: the emotion evaluation's few-shot block is longer than the fixtures' 128
    return [str(make_tiny_model_dir(root / "a", "llama", seed=1, d_model=48, n_layers=3, n_ctx=1024)),
            str(make_tiny_model_dir(root / "b", "gpt_neox", seed=2, n_ctx=1024))]


@pytest.fixture(scope="module")
def first_run(two_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("sm_out")
    assert sm.main(["--models", ",".join(two_models), "--out", str(out), *SMALL, *NEUTRAL]) == 0
    return out


def test_matrix_json_loads_and_figures(first_run, two_models):
    result = json.loads((first_run / "matrix.json").read_text())
    a, b = two_models
    # phase 1 loads both; phase 2 reuses the last one and loads the first again: 2N - 1
    assert result["model_loads"] == 3
    assert [m for m, _ in result["loads"]] == [a, b, a]
    assert result["loads"][0][1].startswith("capture") and result["loads"][2][1].startswith("evaluate")
    assert result["models"] == two_models
    mat = result["matrices"]["2"]
    for kind in ("transplanted", "improvement_ratio", "absolute_improvement"):
        assert len(mat[kind]) == 2 and all(len(row) == 2 for row in mat[kind])
    for j, target in enumerate(two_models):
        base = result["baseline"][target]["mean_logit_acc"]
        for i in range(2):
            assert mat["absolute_improvement"][i][j] == pytest.approx(mat["transplanted"][i][j] - base)
            ratio = mat["improvement_ratio"][i][j]
            assert ratio is None if base == 0 else ratio == pytest.approx(mat["transplanted"][i][j] / base)
            low, high = mat["transplanted_ci95"][i][j]  # the pooled negatives' Wilson interval holds the mean
            assert 0 <= low <= mat["transplanted"][i][j] <= high <= 1 and high - low > 0
    assert result["map_r2_heldout"][a][a] is None and result["map_r2_heldout"][a][b] is not None
    assert result["steering_layers"] == {a: 1, b: 0}
    assert (first_run / "models").is_dir() and len(list((first_run / "maps").glob("*.safetensors"))) == 2
    for kind in ("improvement_ratio", "absolute_improvement"):
        assert (first_run / f"size_matrix_{kind}_alpha2.png").is_file()
        assert (first_run / f"size_matrix_{kind}_alpha2.pdf").is_file()


def test_rerun_loads_nothing_and_keeps_cells(first_run, two_models):
    cells = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (first_run / "cells").glob("*.json")}
    assert len(cells) == 2 + 4  # baselines + every (source, target) pair, one emotion, one alpha
    cfg = sm.Config(models=tuple(two_models), out=str(first_run), emotions=("happiness",), n_refine=2, n_eval=1,
                    map_corpus="neutral", n_texts=30, alphas=(2.0,), batch_size=8)
    again = sm.run(cfg)
    assert again["model_loads"] == 0
    assert again["model_loads_all_runs"] == 3
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (first_run / "cells").glob("*.json")} == cells


def test_resume_reloads_only_the_missing_target(first_run, two_models):
    a, b = two_models
    victim = sm._steer_key(b, a, "happiness", 2.0)
    (first_run / "cells" / f"{victim}.json").unlink()
    cfg = sm.Config(models=tuple(two_models), out=str(first_run), emotions=("happiness",), n_refine=2, n_eval=1,
                    map_corpus="neutral", n_texts=30, alphas=(2.0,), batch_size=8)
    again = sm.run(cfg)
    assert again["loads"] == [[a, "evaluate incoming vectors"]]
    assert (first_run / "cells" / f"{victim}.json").is_file()


def test_other_settings_refuse_the_same_out(first_run, two_models):
    cfg = sm.Config(models=tuple(two_models), out=str(first_run), emotions=("happiness",), n_refine=3, n_eval=1,
                    map_corpus="neutral", n_texts=30, alphas=(2.0,))
    with pytest.raises(ContransError, match="other settings"):
        sm.run(cfg)


def test_quick_flags_and_overrides():
    import argparse

    p = argparse.ArgumentParser()
    sm.add_args(p)
    cfg = sm.config_from_args(p.parse_args(["--quick", "--models", "x,y", "--n-eval", "3"]))
    assert cfg.models == ("x", "y") and cfg.n_eval == 3 and cfg.emotions == sm.QUICK["emotions"]
    assert cfg.n_refine == sm.QUICK["n_refine"]
    with pytest.raises(ValueError):
        sm.Config(models=("x", "x"))


def test_keep_loaded_needs_n_loads_and_gives_the_same_cells(first_run, two_models, tmp_path):
    cfg = sm.Config(models=tuple(two_models), out=str(tmp_path), emotions=("happiness",), n_refine=2, n_eval=1,
                    map_corpus="neutral", n_texts=30, alphas=(2.0,), batch_size=8, keep_loaded=True)
    result = sm.run(cfg)
    assert result["model_loads"] == 2 and result["load_bound"].startswith("<= 2 (N")
    assert all(p.startswith("capture") for _, p in result["loads"])
    # same settings, same numbers as the 2N - 1 route
    first = json.loads((first_run / "matrix.json").read_text())
    assert result["matrices"]["2"]["transplanted"] == first["matrices"]["2"]["transplanted"]
    assert result["map_r2_heldout"] == first["map_r2_heldout"]


def test_map_corpus_and_estimator_options_reach_the_maps(first_run, two_models, tmp_path):
    """--map-corpus neutral (against the concept default) and --map-estimator reach every map's provenance: a run
    that ignored them would record concept and ridge."""
    import torch

    from contrans_tl.artifacts import AffineMap

    for path in (first_run / "maps").glob("*.safetensors"):  # the fixture's --map-corpus neutral --n-texts 30
        assert AffineMap.load(path).provenance["corpus"]["spec"] == "neutral"
        assert AffineMap.load(path).provenance["corpus"]["n_texts"] == 30
    out = tmp_path / "concept"
    assert sm.main(["--models", ",".join(two_models), "--out", str(out), *SMALL, "--map-estimator", "procrustes"]) == 0
    for path in (out / "maps").glob("*.safetensors"):
        amap = AffineMap.load(path)
        assert amap.provenance["estimator"] == "procrustes" and amap.provenance["corpus"]["spec"] == "concept"
        w = amap.weight[0].double() / amap.provenance["scale"][0]
        small, large = sorted(w.shape)
        gram = w @ w.T if w.shape[0] == small else w.T @ w
        assert torch.allclose(gram, torch.eye(small, dtype=torch.float64), atol=1e-6)  # orthonormal, as recorded


def test_maps_fit_on_the_concept_by_default_and_n_texts_needs_the_neutral_corpus():
    """Fig 4's rerun chose the concept corpus (docs/analyses.md); a sentence count with another corpus would be
    ignored, so it is refused by name."""
    assert sm.Config(models=("x", "y")).map_corpus == "concept"
    with pytest.raises(ContransError, match="n_texts"):
        sm.Config(models=("x", "y"), n_texts=30)
    assert sm.Config(models=("x", "y"), map_corpus="neutral", n_texts=30).n_texts == 30
