"""contrans_tl.reports: the transfer report, the layer-pair search and auto layers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import contrans_tl as ct
from contrans_tl import plotting
from contrans_tl.pairing import capture_paired
from contrans_tl.capture import capture
from contrans_tl.cli import main
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import InvalidArgumentError, ModelMismatchError
from contrans_tl.lens import concept_readout
from contrans_tl.reports.layer_search import (
    auto_layers,
    drop_outlier_samples,
    layer_pair_search,
    layer_pair_search_from_states,
    strided_layers,
)
from contrans_tl.reports.transfer import _flag, transfer_report
from contrans_tl.metrics import layer_cosine
from contrans_tl.testing import make_tiny_model_dir
from tests.conftest import hooks_attached

POS = ["I love this sunny day", "What a wonderful gift", "The party was great fun"]
NEG = ["The rain ruined everything", "I lost my keys again", "The train was late again"]
TEXTS = neutral_sentences()[:60]


@pytest.fixture(scope="module")
def states(tiny_llama, tiny_llama_b):
    return capture_paired(tiny_llama, TEXTS), capture_paired(tiny_llama_b, TEXTS)


@pytest.fixture(scope="module")
def amap(states):
    xs, ys = states
    return ct.fit_map_from_states(xs, ys, layers=[(0, 0), (1, 1), (1, 2)])


@pytest.fixture(scope="module")
def src_vec(tiny_llama):
    return ct.refine(tiny_llama, POS, NEG)


@pytest.fixture(scope="module")
def native(tiny_llama_b):
    return ct.refine(tiny_llama_b, POS, NEG)


def _probe_metric(direction: torch.Tensor, layer: int):
    """Mean projection of resid_post[layer] (last token) on ``direction``: reads the offset exactly."""

    def metric(model) -> float:
        return float((capture(model, POS, layers=[layer])[:, 0] @ direction).mean())

    return metric


def test_drop_outlier_samples(states):
    xs, ys = states
    same, same_y, n = drop_outlier_samples(xs, ys, factor=10.0)
    assert n == 0 and same is xs and same_y is ys
    spiked = dataclasses.replace(xs, states=xs.states.clone())
    spiked.states[7, 1] *= 1000  # one massive activation in the source
    a, b, n = drop_outlier_samples(spiked, ys, factor=10.0)
    assert n == 1 and a.states.shape[0] == b.states.shape[0] == xs.states.shape[0] - 1
    assert torch.equal(a.text_index, b.text_index) and torch.equal(a.states[7], spiked.states[8])
    assert drop_outlier_samples(spiked, ys, factor=0)[2] == 0
    # the spike wrecks held-out R² only when its text is held out; filtered, the fit is the clean one
    clean = ct.fit_map_from_states(a, b, layers=[(1, 1)])
    assert float(clean.r2_heldout[0]) > 0
    # fit_map_from_states filters itself when asked (the demo's outlier-robust map), and only then
    robust = ct.fit_map_from_states(spiked, ys, layers=[(1, 1)], outlier_factor=10.0)
    assert robust.provenance["outliers_dropped"] == 1 and torch.equal(robust.weight, clean.weight)
    assert ct.fit_map_from_states(spiked, ys, layers=[(1, 1)]).provenance["outliers_dropped"] == 0


def test_strided_layers():
    assert strided_layers(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert strided_layers(18, 1) == list(range(18))
    assert strided_layers(1, 4) == [0]


def test_geometry_rows(tiny_llama_b, amap, src_vec, native):
    rep = transfer_report(tiny_llama_b, amap, src_vec, native, concept="joy")
    mapped = amap.apply(src_vec)
    cos = layer_cosine(mapped.vectors, native.vectors)
    assert [(r["source_layer"], r["target_layer"]) for r in rep.pairs] == amap.pairs
    for i, row in enumerate(rep.pairs):
        assert row["r2_heldout"] == pytest.approx(float(amap.r2_heldout[i]))
        assert row["cosine"] == pytest.approx(float(cos[row["target_layer"]]))
    assert rep.combined is None and rep.metric_base is None and rep.warnings == []
    assert rep.cosine_mean == pytest.approx(float(cos[[0, 1, 2]].mean()), abs=1e-6)
    json.dumps(rep.to_dict())


def test_causal_ratio_one_when_native_is_the_mapped_vector(tiny_llama_b, amap, src_vec):
    mapped = amap.apply(src_vec)
    twin = dataclasses.replace(mapped, method="mean_diff", vectors=3.0 * mapped.vectors)  # same direction, other norm
    direction = torch.randn(48)
    rep = transfer_report(tiny_llama_b, amap, src_vec, twin, metric=_probe_metric(direction, 2), metric_name="probe",
                          alpha=0.2, unit="norm", per_layer=[2])
    assert rep.combined["causal_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert rep.per_layer[0]["causal_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert rep.combined["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rep.warnings == []
    assert hooks_attached(tiny_llama_b) == 0


def test_warning_when_cosine_high_but_effect_nil(tiny_llama_b, amap, src_vec):
    mapped = amap.apply(src_vec)
    v = mapped.vectors[2]
    d = torch.randn(48)
    d = d - (d @ v) / (v @ v) * v  # the metric reads d, which the mapped vector lacks
    d = d / d.norm() * v.norm()
    rows = torch.zeros_like(mapped.vectors)
    rows[2] = v + 0.5 * d  # cosine to the mapped vector 1/sqrt(1.25) ≈ 0.89
    native = dataclasses.replace(mapped, vectors=rows, layers=(2,), method="mean_diff")
    rep = transfer_report(tiny_llama_b, amap, src_vec, native, metric=_probe_metric(d, 2), metric_name="probe",
                          alpha=1.0, unit="raw", layers=[2], per_layer=[2])
    assert rep.combined["cosine"] == pytest.approx(1 / math.sqrt(1.25), abs=1e-4)
    assert abs(rep.combined["effect_mapped"]) < 1e-3 * abs(rep.combined["effect_native"])
    assert rep.combined["effect_native"] > 0 and abs(rep.combined["causal_ratio"]) < 1e-3
    # matched norm: the native offset has the transplanted offset's norm
    assert len(rep.warnings) == 2 and all("barely moves" in w for w in rep.warnings)


def test_undefined_ratio_is_flagged(tiny_llama_b, amap, src_vec, native):
    rep = transfer_report(tiny_llama_b, amap, src_vec, native, metric=lambda m: 0.5, metric_name="constant")
    assert math.isnan(rep.combined["causal_ratio"])
    assert any("undefined" in w for w in rep.warnings)
    assert _flag({"causal_ratio": 0.9, "cosine": 0.9}, "x", 0.5, 0.2) is None
    assert _flag({"causal_ratio": 0.05, "cosine": 0.2}, "x", 0.5, 0.2) is None


def test_native_from_another_model_is_refused(tiny_llama_b, amap, src_vec):
    with pytest.raises(ModelMismatchError):
        transfer_report(tiny_llama_b, amap, src_vec, src_vec)


def test_layer_search_grid_matches_single_fits(tiny_llama, tiny_llama_b, states, src_vec, native):
    xs, ys = states
    readout = concept_readout(tiny_llama_b, [5], [7, 9])
    search = layer_pair_search_from_states(xs, ys, source_vector=src_vec, readout=readout, native_vector=native)
    assert search.source_layers == [0, 1] and search.target_layers == [0, 1, 2]
    single = ct.fit_map_from_states(xs, ys, layers=[(1, 2)])
    assert search.r2[1][2] == pytest.approx(float(single.r2_heldout[0]), abs=1e-5)
    mapped = single.apply(src_vec)
    cos = float(torch.nn.functional.cosine_similarity(mapped.vectors[2], readout, dim=0))
    assert search.proxy[1][2] == pytest.approx(cos, abs=1e-5)
    assert len(search.native_proxy) == 3 and len(search.native_cosine) == 2
    best = search.best_pairs(3)
    assert len(best) == 3 and best[0]["score"] >= best[1]["score"] >= best[2]["score"]
    assert len(search.best_source_for_target()) == 3
    d = search.to_dict()
    assert d["score"] == search.score and json.dumps(d)
    # the wrapper captures and gives the same grid
    again = layer_pair_search(tiny_llama, tiny_llama_b, TEXTS, source_stride=1, source_vector=src_vec, readout=readout,
                              native_vector=native, alignment="words")
    assert torch.allclose(torch.tensor(again.r2), torch.tensor(search.r2), atol=1e-5)
    # without a concept: R² only
    plain = layer_pair_search_from_states(xs, ys, target_layers=[2])
    assert plain.proxy is None and plain.score == plain.r2


def test_auto_layers(tiny_llama_b, amap, src_vec, native, states):
    mapped = amap.apply(src_vec)
    r2 = {t: float(r) for (_, t), r in zip(amap.pairs, amap.r2_heldout)}
    want = sorted(t for t, r in r2.items() if r >= 0.0)
    assert auto_layers(mapped, min_r2=0.0) == (want or [max(r2, key=r2.get)])
    assert auto_layers(mapped, min_r2=2.0) == [max(r2, key=r2.get)]  # none passes: the best one
    assert auto_layers(mapped, min_r2=-1e9, top_k=1) == [max(r2, key=r2.get)]
    assert auto_layers(native) == [0, 1, 2]  # no map provenance: the vector's own layers
    assert auto_layers([mapped, native], min_r2=2.0) == [0, 1, 2]
    xs, ys = states
    search = layer_pair_search_from_states(xs, ys, source_vector=src_vec, readout=concept_readout(tiny_llama_b, [5]))
    assert auto_layers(mapped, search=search, top_k=2) == sorted(search.target_ranking()[:2])
    with pytest.raises(ModelMismatchError):
        auto_layers(src_vec, search=search)


def test_auto_layers_survives_save_load(tmp_path, amap, src_vec):
    mapped = amap.apply(src_vec)
    loaded = ct.ConceptVector.load(mapped.save(tmp_path / "m.safetensors"))
    assert auto_layers(loaded, min_r2=-1.0) == auto_layers(mapped, min_r2=-1.0)


def test_plots(tiny_llama_b, amap, src_vec, native, states, tmp_path):
    rep = transfer_report(tiny_llama_b, amap, src_vec, native, metric=lambda m: float(len(m.cfg.model_name)),
                          per_layer=[1])
    assert len(plotting.transfer_report(rep).axes) == 2  # geometry + causal panels
    assert len(plotting.transfer_report(transfer_report(tiny_llama_b, amap, src_vec, native)).axes) == 1
    xs, ys = states
    search = layer_pair_search_from_states(xs, ys, source_vector=src_vec, readout=concept_readout(tiny_llama_b, [5]))
    fig = plotting.layer_search(search)
    assert len(fig.axes) == 6  # R², proxy and score panels, each with its colour bar
    written = plotting.save_figure(fig, tmp_path / "search")
    assert all(p.stat().st_size > 0 for p in written)


@pytest.fixture(scope="module")
def long_context_dirs(tmp_path_factory):
    """Tiny models whose context holds the emotion task's few-shot block."""
    root = tmp_path_factory.mktemp("tiny_long")
    return (make_tiny_model_dir(root / "src", "llama", seed=3, n_ctx=1024),
            make_tiny_model_dir(root / "tgt", "llama", seed=4, d_model=48, n_layers=3, n_ctx=1024))


def test_cli_report_and_layer_search(tmp_path, long_context_dirs):
    out = tmp_path / "run"
    src, tgt = long_context_dirs
    common = ["--source", str(src), "--target", str(tgt), "--n-texts", "40",
              "--n-refine", "4", "--out", str(out), "--device", "cpu"]
    assert main(["report", *common, "--n-eval", "6", "--per-layer", "2", "--metric", "label_prob",
                 "--pairs", "search", "--stride", "1", "--steer-layers", "auto", "--per-layer-alpha", "0.3"]) == 0
    rep = json.loads((out / "report_search.json").read_text())
    assert rep["metric_name"] == "label_prob" and rep["combined"] is not None and len(rep["per_layer"]) == 1
    assert rep["per_layer"][0]["alpha"] == 0.3 and rep["alpha"] == 0.1
    search = json.loads((out / "layer_search.json").read_text())
    assert [[p["source_layer"], p["target_layer"]] for p in rep["pairs"]] == search["best_source_for_target"]
    assert (out / "report_search.png").is_file() and (out / "map_search.safetensors").is_file()
    assert main(["layer-search", *common, "--stride", "1"]) == 0
    grid = json.loads((out / "layer_search.json").read_text())
    assert grid["source_layers"] == [0, 1] and grid["target_layers"] == [0, 1, 2] and grid["proxy"] is not None
    assert (out / "layer_search.png").is_file()
    # reuse saved artifacts
    assert main(["report", *common, "--n-eval", "6", "--map", str(out / "map_search.safetensors"),
                 "--vector", str(out / "fear_source.safetensors"), "--native", str(out / "fear_native.safetensors"),
                 "--alpha", "auto", "--kl-budget", "100"]) == 0
    rep2 = json.loads((out / "report.json").read_text())
    assert "alpha_sweep" in rep2["settings"] and rep2["alpha"] == rep2["settings"]["alpha_sweep"]["chosen"]
    assert ct.AffineMap.load(out / "map_search.safetensors").provenance["corpus"]["n_texts"] == 40


def test_cli_report_map_corpus_and_estimator_reach_the_map(tmp_path, long_context_dirs):
    """--map-corpus and --map-estimator reach the report's map (the defaults are neutral and ridge, so an ignored
    option fails here)."""
    src, tgt = long_context_dirs
    assert main(["report", "--source", str(src), "--target", str(tgt), "--n-refine", "4", "--n-eval", "6",
                 "--map-corpus", "concept", "--map-estimator", "procrustes", "--out", str(tmp_path), "--device", "cpu"]) == 0
    amap = ct.AffineMap.load(tmp_path / "map.safetensors")
    assert amap.provenance["corpus"]["spec"] == "concept" and amap.provenance["estimator"] == "procrustes"
    assert amap.provenance["corpus"]["n_texts"] == 8  # fear's 4 + 4 contrast prompts, no evaluation scenario


def test_transplant_layers_from_auto_layers(tiny_llama_b, amap, src_vec):
    """transplant() takes block indices only: the caller asks auto_layers and passes its result,
    and exactly those layers' residual streams move, each by alpha · v[l]."""
    mapped = amap.apply(src_vec)
    chosen = auto_layers(mapped)
    # the check below means something only if auto_layers dropped some of the vector's layers
    assert chosen and set(chosen) < set(mapped.layers)
    alpha = 0.7
    all_layers = list(range(tiny_llama_b.cfg.n_layers))
    plain = capture(tiny_llama_b, POS, layers=all_layers)
    with ct.transplant(tiny_llama_b, mapped, alpha=alpha, layers=chosen) as offsets:
        assert sorted(offsets) == chosen
        for layer in chosen:
            assert torch.allclose(offsets[layer], alpha * mapped.vectors[layer], atol=1e-6)
        steered = capture(tiny_llama_b, POS, layers=all_layers)
    first = min(chosen)
    assert torch.allclose(steered[:, :first], plain[:, :first], atol=1e-6)  # layers before it are untouched
    assert torch.allclose(steered[:, first] - plain[:, first], alpha * mapped.vectors[first].expand(len(POS), -1),
                          atol=1e-4)
    assert hooks_attached(tiny_llama_b) == 0
    with pytest.raises(InvalidArgumentError, match="auto_layers"):
        with ct.transplant(tiny_llama_b, mapped, alpha=1.0, layers="auto"):
            pass
    assert hooks_attached(tiny_llama_b) == 0
