"""Every bad input gets a named error that names the argument: through the API and the `contrans` CLI.

Each case is (what is called, the exception class expected, text the message must contain, which
names the argument or the file). Tiny random models only: the whole file runs in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import contrans_tl as ct
from contrans_tl import flags
from contrans_tl import validate
from contrans_tl.cli import build_parser, main
from contrans_tl.errors import (
    ArtifactError,
    ContransError,
    DataFormatError,
    EmptyPromptsError,
    InvalidArgumentError,
    LayerIndexError,
    ModelUnavailableError,
    SettingsMismatchError,
)
from contrans_tl.export import export_gguf, export_lm_eval
from contrans_tl.reformulate import fit_map_from_states
from contrans_tl.sweep import CellStore, settings_fingerprint
from contrans_tl.tasks.emotion import contrast_prompts, emotion_scenarios, emotion_task

POS = ["a happy day in the sun", "we won the match"]
NEG = ["rain on the road", "the bus was late"]
TEXTS = ["The river runs past the old mill.", "Trains leave every hour.", "A cat sat on the mat today."]


@pytest.fixture(scope="module")
def vec(tiny_llama):
    return ct.refine(tiny_llama, POS, NEG)


@pytest.fixture(scope="module")
def amap(tiny_llama, tiny_llama_b):
    corpus = TEXTS + ["one more line of text", "and another one here", "the last of them all"]
    return ct.fit_map(tiny_llama, tiny_llama_b, corpus, ridge=0.1, holdout=0.2)


# (id, lambda(fixtures) -> call, exception, message fragment)
API_CASES = {
    # ---- refine -------------------------------------------------------------------------------
    "refine-positive-is-a-string": (lambda f: ct.refine(f["m"], "text", NEG), InvalidArgumentError, "positive="),
    "refine-negative-is-a-string": (lambda f: ct.refine(f["m"], POS, "text"), InvalidArgumentError, "negative="),
    "refine-positive-empty": (lambda f: ct.refine(f["m"], [], NEG), EmptyPromptsError, "positive"),
    "refine-negative-empty": (lambda f: ct.refine(f["m"], POS, []), EmptyPromptsError, "negative"),
    "refine-empty-string-prompt": (lambda f: ct.refine(f["m"], ["ok", ""], NEG), EmptyPromptsError, "positive[1]"),
    "refine-whitespace-prompt": (lambda f: ct.refine(f["m"], POS, ["ok", "  \n"]), EmptyPromptsError, "negative[1]"),
    "refine-none-prompt": (lambda f: ct.refine(f["m"], [None, "x"], NEG), InvalidArgumentError, "positive[0]"),
    "refine-none-list": (lambda f: ct.refine(f["m"], None, NEG), InvalidArgumentError, "positive="),
    "refine-method-bogus": (lambda f: ct.refine(f["m"], POS, NEG, method="bogus"), InvalidArgumentError, "method="),
    "refine-pca-one-pair": (lambda f: ct.refine(f["m"], POS[:1], NEG[:1], method="pca"), InvalidArgumentError, "method="),
    "refine-pca-unequal": (lambda f: ct.refine(f["m"], POS, NEG[:1], method="pca"), InvalidArgumentError, "method="),
    "refine-batch-size-0": (lambda f: ct.refine(f["m"], POS, NEG, batch_size=0), InvalidArgumentError, "batch_size="),
    "refine-batch-size-str": (lambda f: ct.refine(f["m"], POS, NEG, batch_size="8"), InvalidArgumentError, "batch_size="),
    "refine-batch-size-float": (lambda f: ct.refine(f["m"], POS, NEG, batch_size=2.5), InvalidArgumentError, "batch_size="),
    # ---- fit_map ------------------------------------------------------------------------------
    "fit-texts-empty": (lambda f: ct.fit_map(f["m"], f["mb"], []), EmptyPromptsError, "texts"),
    "fit-texts-a-string": (lambda f: ct.fit_map(f["m"], f["mb"], "one text"), InvalidArgumentError, "texts="),
    "fit-texts-whitespace": (lambda f: ct.fit_map(f["m"], f["mb"], ["  ", "\n"]), EmptyPromptsError, "texts[0]"),
    "fit-ridge-negative": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, ridge=-1.0), InvalidArgumentError, "ridge="),
    "fit-ridge-bogus": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, ridge="bogus"), InvalidArgumentError, "ridge="),
    "fit-ridge-nan": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, ridge=float("nan")), InvalidArgumentError, "ridge="),
    "fit-holdout-negative": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, holdout=-0.1), InvalidArgumentError, "holdout="),
    "fit-holdout-one": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, holdout=1.0), InvalidArgumentError, "holdout="),
    "fit-holdout-str": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, holdout="0.2"), InvalidArgumentError, "holdout="),
    "fit-layers-empty": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, layers=[]), InvalidArgumentError, "layers="),
    "fit-layers-not-pairs": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, layers=[(0,)]), InvalidArgumentError, "layers[0]"),
    "fit-layers-repeated": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, layers=[(0, 1), (0, 1)]), InvalidArgumentError, "layers="),
    "fit-layers-out-of-range": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, layers=[(99, 0)]), LayerIndexError, "layers"),
    "fit-alignment-bogus": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, alignment="chars"), InvalidArgumentError, "alignment="),
    "fit-batch-size-0": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, batch_size=0), InvalidArgumentError, "batch_size="),
    "fit-from-states-models": (lambda f: fit_map_from_states(f["m"], f["mb"]), InvalidArgumentError, "source/target"),
    "fit-too-few-texts-for-holdout": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS[:1], holdout=0.5), InvalidArgumentError, "holdout="),
    "fit-estimator-bogus": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, estimator="ols"), InvalidArgumentError, "estimator="),
    "fit-rrr-without-rank": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, estimator="rrr"), InvalidArgumentError, "rank="),
    "fit-rank-above-width": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, estimator="rrr", rank=49), InvalidArgumentError, "rank="),
    "fit-procrustes-with-ridge": (lambda f: ct.fit_map(f["m"], f["mb"], TEXTS, estimator="procrustes", ridge=0.1), InvalidArgumentError, "ridge="),
    # ---- transplant ---------------------------------------------------------------------------
    "transplant-unit-bogus": (lambda f: ct.transplant(f["m"], f["v"], alpha=1.0, unit="bogus").__enter__(), InvalidArgumentError, "unit="),
    "transplant-unit-wrong-case": (lambda f: ct.transplant(f["m"], f["v"], alpha=1.0, unit="Norm").__enter__(), InvalidArgumentError, "unit="),
    "transplant-alpha-str": (lambda f: ct.transplant(f["m"], f["v"], alpha="1").__enter__(), InvalidArgumentError, "alpha="),
    "transplant-alpha-none": (lambda f: ct.transplant(f["m"], f["v"], alpha=None).__enter__(), InvalidArgumentError, "alpha="),
    "transplant-alpha-tensor": (lambda f: ct.transplant(f["m"], f["v"], alpha=torch.tensor(1.0)).__enter__(), InvalidArgumentError, "alpha"),
    "transplant-alpha-inf": (lambda f: ct.transplant(f["m"], f["v"], alpha=float("inf")).__enter__(), InvalidArgumentError, "alpha="),
    "transplant-alpha-count": (lambda f: ct.transplant(f["m"], f["v"], alpha=[1.0, 2.0]).__enter__(), InvalidArgumentError, "alpha="),
    "transplant-layers-empty": (lambda f: ct.transplant(f["m"], f["v"], alpha=1.0, layers=[]).__enter__(), InvalidArgumentError, "layers="),
    "transplant-layers-repeated": (lambda f: ct.transplant(f["m"], f["v"], alpha=1.0, layers=[1, 1]).__enter__(), InvalidArgumentError, "layers="),
    "transplant-layers-auto": (lambda f: ct.transplant(f["m"], f["v"], alpha=1.0, layers="auto").__enter__(), InvalidArgumentError, "layers="),
    "transplant-layers-out-of-range": (lambda f: ct.transplant(f["m"], f["v"], alpha=1.0, layers=[99]).__enter__(), LayerIndexError, "layers"),
    "transplant-vector-a-path": (lambda f: ct.transplant(f["m"], "v.safetensors", alpha=1.0).__enter__(), InvalidArgumentError, "vector="),
    "transplant-vector-empty": (lambda f: ct.transplant(f["m"], [], alpha=1.0).__enter__(), InvalidArgumentError, "vector="),
    "transplant-norm-without-norms": (lambda f: ct.transplant(f["m"], dataclasses.replace(f["v"], layer_norms=None), alpha=0.1, unit="norm").__enter__(), InvalidArgumentError, "unit="),
    # ---- generate and scoring -----------------------------------------------------------------
    "generate-no-prompts": (lambda f: ct.generate(f["m"], []), EmptyPromptsError, "prompts"),
    "generate-none": (lambda f: ct.generate(f["m"], None), InvalidArgumentError, "prompts="),
    "generate-empty-string": (lambda f: ct.generate(f["m"], ""), EmptyPromptsError, "prompts[0]"),
    "generate-max-new-tokens-0": (lambda f: ct.generate(f["m"], "hi", max_new_tokens=0), InvalidArgumentError, "max_new_tokens="),
    "generate-max-new-tokens-negative": (lambda f: ct.generate(f["m"], "hi", max_new_tokens=-1), InvalidArgumentError, "max_new_tokens="),
    "generate-max-new-tokens-float": (lambda f: ct.generate(f["m"], "hi", max_new_tokens=2.5), InvalidArgumentError, "max_new_tokens="),
    "capture-no-prompts": (lambda f: ct.capture(f["m"], []), EmptyPromptsError, "prompts"),
    "capture-a-string": (lambda f: ct.capture(f["m"], "one prompt"), InvalidArgumentError, "prompts="),
    "capture-padding-side": (lambda f: ct.capture(f["m"], POS, padding_side="middle"), InvalidArgumentError, "padding_side="),
    "capture-layers-bogus": (lambda f: ct.capture(f["m"], POS, layers=["x"]), InvalidArgumentError, "layers[0]"),
    "logits-empty-prompt": (lambda f: ct.next_token_logits(f["m"], [""]), EmptyPromptsError, "prompts[0]"),
    # ---- export -------------------------------------------------------------------------------
    "gguf-alpha-str": (lambda f: export_gguf(f["v"], f["tmp"] / "a.gguf", alpha="x"), InvalidArgumentError, "alpha="),
    "gguf-alpha-zero": (lambda f: export_gguf(f["v"], f["tmp"] / "a.gguf", alpha=0.0), InvalidArgumentError, "alpha="),
    "gguf-unit-bogus": (lambda f: export_gguf(f["v"], f["tmp"] / "a.gguf", unit="bogus"), InvalidArgumentError, "unit="),
    "gguf-layer-0": (lambda f: export_gguf(f["v"], f["tmp"] / "a.gguf", layers=[0]), InvalidArgumentError, "layers="),
    "gguf-layers-out-of-range": (lambda f: export_gguf(f["v"], f["tmp"] / "a.gguf", layers=[99]), LayerIndexError, "layers"),
    "gguf-vector-a-path": (lambda f: export_gguf("v.safetensors", f["tmp"] / "a.gguf"), InvalidArgumentError, "vector="),
    "gguf-into-a-file": (lambda f: export_gguf(f["v"], f["file"] / "a.gguf", layers=[1]), ArtifactError, "cannot write"),
    "lm-eval-template": (lambda f: export_lm_eval(f["v"], f["tmp"] / "a.pt", hookpoint_template="layers"), InvalidArgumentError, "hookpoint_template="),
    "lm-eval-alpha-none": (lambda f: export_lm_eval(f["v"], f["tmp"] / "a.pt", alpha=None), InvalidArgumentError, "alpha="),
    # ---- artifacts ----------------------------------------------------------------------------
    "load-missing": (lambda f: ct.ConceptVector.load(f["tmp"] / "missing.safetensors"), ArtifactError, "missing.safetensors"),
    "load-truncated": (lambda f: ct.ConceptVector.load(f["truncated"]), ArtifactError, "truncated.safetensors"),
    "load-wrong-kind": (lambda f: ct.ConceptVector.load(f["map_path"]), ArtifactError, "map.safetensors"),
    "load-map-missing": (lambda f: ct.AffineMap.load(f["tmp"] / "none.safetensors"), ArtifactError, "none.safetensors"),
    "load-not-a-file": (lambda f: ct.ConceptVector.load(f["file"]), ArtifactError, "a_file"),
    "load-map-layer-the-model-lacks": (lambda f: ct.AffineMap.load(f["header"]("map", target_layers=[0, 1, 99])), LayerIndexError,
                                       "target_layers: layer(s) [99]"),
    "load-map-layers-not-ints": (lambda f: ct.AffineMap.load(f["header"]("map", source_layers=["1"])), ArtifactError,
                                 "source_layers"),
    "load-vector-n-prompts-many": (lambda f: ct.ConceptVector.load(f["header"]("vector", n_prompts="many")), ArtifactError,
                                   "n_prompts='many'"),
    "load-vector-layers-out-of-range": (lambda f: ct.ConceptVector.load(f["header"]("vector", layers=[0, 99])), LayerIndexError,
                                        "layers"),
    "load-vector-model-width-text": (lambda f: ct.ConceptVector.load(f["header"]("vector", model={"name": "m", "revision": None,
                                     "n_layers": "4", "d_model": 64})), ArtifactError, "n_layers='4'"),
    "load-vector-nan-layer-norms": (lambda f: ct.ConceptVector.load(f["nan_norms"]), ct.NonFiniteError, "layer_norms"),
    "vector-nan-layer-norms": (lambda f: dataclasses.replace(f["v"], layer_norms=torch.full_like(f["v"].layer_norms, float("nan"))),
                               ct.NonFiniteError, "layer_norms"),
    "gguf-alpha-overflow": (lambda f: export_gguf(f["v"], f["tmp"] / "a.gguf", alpha=1e300), ct.NonFiniteError, "alpha=1e+300"),
    "lm-eval-alpha-overflow": (lambda f: export_lm_eval(f["v"], f["tmp"] / "a.pt", alpha=-1e300), ct.NonFiniteError, "alpha=-1e+300"),
    "refine-same-prompts-both-sides": (lambda f: ct.refine(f["m"], POS, list(reversed(POS))), InvalidArgumentError, "negative="),
    "load-model-device-bogus": (lambda f: ct.load_model(f["dirs"]["llama"], device="bogus"), InvalidArgumentError, "device='bogus'"),
    "load-model-local-with-revision": (lambda f: ct.load_model(f["dirs"]["llama"], revision="step5"), ModelUnavailableError,
                                       "no revision"),
    "vector-list-not-tensor": (lambda f: ct.ConceptVector([[1.0]], f["v"].model, (0,), "mean_diff"), InvalidArgumentError, "vectors="),
    "vector-model-a-string": (lambda f: ct.ConceptVector(f["v"].vectors, "m", (0,), "mean_diff"), InvalidArgumentError, "model="),
    "vector-layers-out-of-range": (lambda f: dataclasses.replace(f["v"], layers=(99,)), LayerIndexError, "layers"),
    "vector-layers-repeated": (lambda f: dataclasses.replace(f["v"], layers=(0, 0)), InvalidArgumentError, "layers="),
    "vector-layer-norms-shape": (lambda f: dataclasses.replace(f["v"], layer_norms=torch.ones(f["v"].model.n_layers + 1)), InvalidArgumentError, "layer_norms="),
    "vector-times-string": (lambda f: f["v"] * "x", InvalidArgumentError, "scale="),
    "vector-divided-by-zero": (lambda f: f["v"] / 0, InvalidArgumentError, "scale="),
    "vector-restrict-empty": (lambda f: f["v"].restrict([]), InvalidArgumentError, "layers="),
    "vector-save-into-a-file": (lambda f: f["v"].save(f["file"] / "v.safetensors"), ArtifactError, "cannot write"),
    "vector-save-onto-a-folder": (lambda f: f["v"].save(f["tmp"]), ArtifactError, "cannot write"),
    "map-apply-not-a-vector": (lambda f: f["amap"].apply("v"), InvalidArgumentError, "vector="),
    # ---- load_model ---------------------------------------------------------------------------
    "load-model-empty-folder": (lambda f: ct.load_model(f["empty"]), ModelUnavailableError, "config.json"),
    "load-model-missing-folder": (lambda f: ct.load_model(str(f["tmp"] / "no" / "such")), ModelUnavailableError, "no such local"),
    "load-model-none": (lambda f: ct.load_model(None), InvalidArgumentError, "name_or_path="),
    "load-model-empty-name": (lambda f: ct.load_model(""), InvalidArgumentError, "name_or_path="),
    "load-model-two-checkpoints": (lambda f: ct.load_model("EleutherAI/pythia-14m", revision="step1", checkpoint=1), InvalidArgumentError, "revision/checkpoint"),
    "load-model-negative-checkpoint": (lambda f: ct.load_model("EleutherAI/pythia-14m", checkpoint=-1), InvalidArgumentError, "checkpoint="),
    "load-model-missing-gguf": (lambda f: ct.load_model(str(f["tmp"] / "m.gguf")), ModelUnavailableError, "m.gguf"),
    "load-model-local-with-checkpoint": (lambda f: ct.load_model(f["dirs"]["llama"], checkpoint=5), ModelUnavailableError, "local checkpoint"),
    # ---- the sweep store and the tasks --------------------------------------------------------
    "store-settings-changed": (lambda f: CellStore(f["tmp"] / "cells", settings={"seed": 1}), SettingsMismatchError, "seed"),
    "store-root-is-a-file": (lambda f: CellStore(f["file"]), ArtifactError, "a_file"),
    "fingerprint-not-a-config": (lambda f: settings_fingerprint({"seed": 0}), ContransError, "dataclass"),
    "emotion-task-unknown-emotion": (lambda f: emotion_task(["joy"]), InvalidArgumentError, "emotions="),
    "emotion-data-dir-missing": (lambda f: emotion_scenarios(f["tmp"] / "nowhere"), InvalidArgumentError, "data_dir="),
    "emotion-data-file-not-a-list": (lambda f: emotion_scenarios(f["bad_data"], ["anger"]), DataFormatError, "anger.json"),
    "contrast-unknown-emotion": (lambda f: contrast_prompts({"anger": ["a"]}, "joy"), InvalidArgumentError, "emotion="),
    "contrast-too-few-negatives": (lambda f: contrast_prompts({"anger": ["a", "b"], "fear": ["c"]}, "anger"),
                                   InvalidArgumentError, "n=None"),
}


def _with_header(path: Path, tmp: Path, change: dict[str, Any], tensor: tuple[str, float] | None = None) -> Path:
    """A copy of an artifact with header fields replaced (or one tensor filled with a value), bypassing the checks of save."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["contrans_tl"])
    header.update(change)
    if tensor is not None:
        tensors[tensor[0]] = torch.full_like(tensors[tensor[0]], tensor[1])
    out = tmp / f"edited-{len(list(tmp.glob('edited-*')))}-{path.name}"
    save_file(tensors, str(out), metadata={"contrans_tl": json.dumps(header)})
    return out


@pytest.fixture(scope="module")
def fx(tiny_llama, tiny_llama_b, tiny_dirs, vec, amap, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "a_file").write_text("not a folder")
    truncated = vec.save(tmp / "truncated.safetensors")
    truncated.write_bytes(truncated.read_bytes()[:50])
    (tmp / "empty_model").mkdir()
    (tmp / "bad_data").mkdir()
    (tmp / "bad_data" / "anger.json").write_text('{"not": "a list"}')
    CellStore(tmp / "cells", settings={"seed": 0})
    vector_path, map_path = vec.save(tmp / "vector.safetensors"), amap.save(tmp / "map.safetensors")
    return {"header": lambda kind, **change: _with_header(vector_path if kind == "vector" else map_path, tmp, change),
            "nan_norms": _with_header(vector_path, tmp, {}, tensor=("layer_norms", float("nan"))),"m": tiny_llama, "mb": tiny_llama_b, "v": vec, "amap": amap, "tmp": tmp, "file": tmp / "a_file",
            "truncated": truncated, "map_path": amap.save(tmp / "map.safetensors"), "empty": tmp / "empty_model",
            "bad_data": tmp / "bad_data", "dirs": tiny_dirs}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_bad_input_is_named(case, fx):
    call, error, fragment = API_CASES[case]
    with pytest.raises(error) as info:
        call(fx)
    assert isinstance(info.value, ContransError)
    assert fragment in str(info.value), str(info.value)


# ---- the `contrans` command: one line `contrans: error: ...`, exit 2, the flag named, no traceback ----
@pytest.fixture
def no_model_loads(monkeypatch):
    """Every argument check of load_model still runs (a bad --device is its named error), but an actual
    load fails the test: a bad value must be refused before any model loads."""
    from contrans_tl import models

    check = models._check_load_args

    def guard(*args, **kwargs):
        check(*args, **kwargs)
        raise AssertionError("a model load was reached: the bad value was not refused before it")

    monkeypatch.setattr(models, "_check_load_args", guard)


@pytest.fixture
def cli_files(tmp_path, vec, amap):
    """Paths the CLI cases name: {file} (prompts), {other} (other prompts), {vector}, {map}, {nan_norms},
    {a_file} (a regular file), {tiny} (a tiny model folder)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    (tmp_path / "prompts.txt").write_text("one prompt\nanother prompt\n")
    (tmp_path / "same.txt").write_text("another prompt\none prompt\n")
    (tmp_path / "other.txt").write_text("a third prompt\n")
    (tmp_path / "a_file").write_text("x")
    vector = vec.save(tmp_path / "v.safetensors")
    with safe_open(str(vector), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["layer_norms"] = torch.full_like(tensors["layer_norms"], float("nan"))
    save_file(tensors, str(tmp_path / "nan_norms.safetensors"), metadata=meta)
    return {"file": tmp_path / "prompts.txt", "same": tmp_path / "same.txt", "other": tmp_path / "other.txt",
            "vector": vector, "map": amap.save(tmp_path / "map.safetensors"), "nan_norms": tmp_path / "nan_norms.safetensors",
            "a_file": tmp_path / "a_file", "tiny": amap.source.name}


CLI_CASES = {
    # the examples (the walker below covers every flag; these pin the ones users hit)
    "report-n-texts-zero": (["report", "--out", "r", "--n-texts", "0"], "--n-texts"),
    "report-per-layer-not-ints": (["report", "--out", "r", "--per-layer", "a,b"], "--per-layer"),
    "report-outlier-factor-nan": (["report", "--out", "r", "--outlier-factor", "nan"], "--outlier-factor"),
    "report-n-eval-zero": (["report", "--out", "r", "--n-eval", "0"], "--n-eval"),
    "token-shift-k-zero": (["token-shift", "--k", "0"], "--k"),
    "checkpoint-sweep-max-workers-zero": (["checkpoint-sweep", "--max-workers", "0"], "--max-workers"),
    "checkpoint-sweep-threads-negative": (["checkpoint-sweep", "--threads", "-1"], "--threads"),
    "checkpoint-sweep-missing-folder": (["checkpoint-sweep", "--checkpoints", "ckpt_000,./no/such/ckpt"],
                                        "checkpoints[1]='./no/such/ckpt'"),
    "layer-search-top-k-negative": (["layer-search", "--out", "r", "--top-k", "-1"], "--top-k"),
    "export-layers-empty-item": (["export", "{vector}", "--format", "gguf", "--out", "x.gguf", "--layers", "1,,2"], "--layers"),
    "export-out-is-its-input": (["export", "{vector}", "--format", "gguf", "--out", "{vector}"], "--out="),
    "export-out-is-the-map": (["export", "{vector}", "--map", "{map}", "--format", "lm-eval", "--out", "{map}"], "--out="),
    "export-alpha-overflows": (["export", "{vector}", "--format", "gguf", "--out", "x.gguf", "--alpha", "1e300"],
                               "NonFiniteError: alpha=1e+300"),
    "export-alpha-overflows-lm-eval": (["export", "{vector}", "--format", "lm-eval", "--out", "x.pt", "--alpha", "1e300"],
                                       "NonFiniteError: alpha=1e+300"),
    "export-nan-layer-norms": (["export", "{nan_norms}", "--format", "gguf", "--out", "x.gguf", "--unit", "norm"],
                               "NonFiniteError"),
    "export-out-under-a-file": (["export", "{vector}", "--format", "gguf", "--out", "{a_file}/x.gguf"], "--out"),
    "export-out-a-folder": (["export", "{vector}", "--format", "gguf", "--out", "."], "--out"),
    "report-out-is-a-file": (["report", "--out", "{a_file}"], "--out"),
    "size-matrix-out-under-a-file": (["size-matrix", "--out", "{a_file}/run"], "--out"),
    "size-matrix-same-model-twice": (["size-matrix", "--models", "{tiny},{tiny}/"], "expected distinct model"),
    "size-matrix-same-model-relative": (["size-matrix", "--models", "{tiny},{tiny}/../" + "{tiny_name}"], "are one model"),
    "refine-same-file-both-sides": (["refine", "m", "--positive", "{file}", "--negative", "{file}", "--out", "v2.safetensors"],
                                    "--negative"),
    "refine-same-prompts-both-sides": (["refine", "m", "--positive", "{file}", "--negative", "{same}", "--out", "v2.safetensors"],
                                       "--negative"),
    # --device: a named error before any load, on every command that takes one
    "report-device-bogus": (["report", "--out", "r", "--device", "bogus"], "--device"),
    "size-matrix-device-bogus": (["size-matrix", "--device", "cuda:x"], "--device"),
    "align-eval-device-bogus": (["align-eval", "--device", "gpu"], "--device"),
    "demo-device-bogus": (["demo", "--device", "bogus"], "device='bogus'"),  # demo: checked by load_model
    "demo-device-cuda-999": (["demo", "--device", "cuda:999"], "device='cuda:999'"),
    # more
    "generate-layers-not-ints": (["generate", "m", "p", "--layers", "x,y"], "--layers"),
    "generate-alpha-not-a-number": (["generate", "m", "p", "--alpha", "x"], "--alpha"),
    "generate-max-new-tokens-negative": (["generate", "m", "p", "--max-new-tokens", "-1"], "--max-new-tokens"),
    "generate-missing-model-folder": (["generate", "./no/such/model", "p"], "no such local model folder"),
    "refine-missing-prompt-file": (["refine", "m", "--positive", "missing.txt", "--negative", "missing.txt",
                                    "--out", "v.safetensors"], "--positive"),
    "refine-batch-size-zero": (["refine", "m", "--positive", "{file}", "--negative", "{other}", "--batch-size", "0",
                                "--out", "v.safetensors"], "--batch-size"),
    "fit-ridge-not-a-number": (["fit", "a", "b", "--ridge", "abc", "--out", "m.safetensors"], "--ridge"),
    "fit-holdout-out-of-range": (["fit", "a", "b", "--holdout", "1.5", "--out", "m.safetensors"], "--holdout"),
    "fit-missing-texts-file": (["fit", "a", "b", "--texts", "missing.txt", "--out", "m.safetensors"], "--texts"),
    "export-format-bogus": (["export", "{vector}", "--format", "onnx", "--out", "x"], "--format"),
    "export-missing-vector": (["export", "missing.safetensors", "--format", "gguf", "--out", "x"], "missing.safetensors"),
    "models-prepare-unknown": (["models", "--prepare", "./no/such/model"], "no such local model folder"),
    "fit-estimator-bogus": (["fit", "a", "b", "--estimator", "ols", "--out", "m.safetensors"], "--estimator"),
    "fit-corpus-bogus": (["fit", "a", "b", "--corpus", "neutral:0", "--out", "m.safetensors"], "--corpus"),
    "fit-texts-and-corpus": (["fit", "a", "b", "--texts", "{file}", "--corpus", "neutral", "--out", "m.safetensors"], "--corpus"),
    "fit-rank-zero": (["fit", "a", "b", "--estimator", "rrr", "--rank", "0", "--out", "m.safetensors"], "--rank"),
    "demo-alphas-not-numbers": (["demo", "--alphas", "x,y"], "--alphas"),
    "demo-alphas-empty-item": (["demo", "--alphas", "0.1,,0.2"], "--alphas"),
    "demo-layers-not-ints": (["demo", "--layers", "a"], "--layers"),
    "demo-n-negatives-negative": (["demo", "--n-negatives", "-3"], "--n-negatives"),
    "demo-kl-bound-zero": (["demo", "--kl-bound", "0"], "kl_bound=0.0"),
    "demo-outlier-factor-negative": (["demo", "--outlier-factor", "-1"], "--outlier-factor"),
    "demo-no-positive-alpha": (["demo", "--alphas", "0,0.1"], "alphas[0]=0.0"),
    "demo-fluency-texts-zero": (["demo", "--n-fluency-texts", "0"], "--n-fluency-texts"),
    "demo-te-range-one-number": (["demo", "--te-kl-range", "0.1"], "te_kl_range"),
    "transfer-missing-concept-file": (["transfer", "--concept", "no/such.json", "--out", "o"], "--concept"),
    "demo-select-on-bogus": (["demo", "--select-on", "foo"], "--select-on"),
    "size-matrix-alphas-empty": (["size-matrix", "--alphas", ","], "--alphas"),
    "size-matrix-batch-size-text": (["size-matrix", "--batch-size", "many"], "--batch-size"),
    "checkpoint-sweep-alphas-not-numbers": (["checkpoint-sweep", "--alphas", "x"], "--alphas"),
    "token-shift-alpha-not-a-number": (["token-shift", "--alpha", "x"], "--alpha"),
    "align-eval-alphas-not-numbers": (["align-eval", "--alphas", "x"], "--alphas"),
    "align-eval-layers-not-ints": (["align-eval", "--layers", "a,b"], "--layers"),
    "layer-search-unknown-flag": (["layer-search", "--out", "r", "--bogus"], "--bogus"),
    # --n-texts counts neutral sentences: beside another map corpus it would be ignored, so it is refused
    "size-matrix-n-texts-with-concept": (["size-matrix", "--n-texts", "30"], "n_texts=30"),
    "checkpoint-sweep-n-texts-with-concept": (["checkpoint-sweep", "--n-texts", "30", "--map-corpus", "concept"],
                                              "n_texts=30"),
    "report-n-texts-with-file-corpus": (["report", "--out", "r", "--n-texts", "30", "--map-corpus", "file:{file}"],
                                        "n_texts=30"),
    "unknown-command": (["transmogrify"], "transmogrify"),
}


def _fill(arg: str, files: dict[str, Path]) -> str:
    for key, path in files.items():
        arg = arg.replace("{" + key + "}", str(path))
    return arg.replace("{tiny_name}", Path(files["tiny"]).name)


def _one_error_line(code: int, err: str) -> str:
    """The single `contrans: error:` line of a refused command (asserts there is exactly that)."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("contrans: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line(case, cli_files, no_model_loads, tmp_path, monkeypatch, capsys):
    argv, fragment = CLI_CASES[case]
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    line = _one_error_line(main([_fill(a, cli_files) for a in argv]), capsys.readouterr().err)
    assert fragment in line, line
    assert before == {p: p.stat().st_mtime_ns for p in before}  # no input overwritten


# ---- the walker: every flag of every subcommand, by construction ----------------------------------
V = validate
BAD_VALUES: dict[Any, list[str]] = {
    flags.positive_int_flag: ["0", "-1", "1.5", "x", "", "nan"],
    flags.nonnegative_int_flag: ["-1", "1.5", "x", ""],
    flags.finite_float_flag: ["nan", "inf", "-inf", "1e400", "x", ""],
    flags.positive_float_flag: ["0", "-1", "nan", "inf", "x"],
    flags.nonnegative_float_flag: ["-0.5", "nan", "inf", "x"],
    flags.fraction_flag: ["-0.1", "1", "1.5", "nan", "x"],
    flags.depth_flag: ["0", "-0.1", "1.5", "nan", "x"],
    flags.ratio_flag: ["0.5", "nan", "inf", "x"],
    flags.ridge_flag: ["-1", "nan", "inf", "x"],
    flags.alpha_or_auto_flag: ["nan", "inf", "x", "", "Auto"],
    flags.int_list_flag: ["1,,2", "a,b", ",", "", "1.5", "1,"],
    flags.layer_list_flag: ["1,,2", "a,b", "-1", "1,1", ",", "", "1,"],
    flags.layers_or_auto_flag: ["1,,2", "a,b", "-1", "", "AUTO"],
    flags.float_list_flag: ["x,y", "0,,1", "nan", "0.1,inf", ",", ""],
    flags.name_list_flag: [",", "a,,b", "", " , ", "a,a"],
    flags.text_flag: ["", "   "],
    flags.model_flag: ["", "  ", "./no/such/model", "{missing}.gguf", "{a_file}/model"],
    flags.model_list_flag: ["", "a,,b", "a,a", "./no/such/model", "{missing}.gguf"],
    flags.hookpoint_template_flag: ["layers", "", "{layers}"],
    flags.device_flag: ["bogus", "gpu", "cuda:x", "cuda:-1", "cuda:999", "CPU", ""],
    flags.existing_file_flag: ["{missing}", "{empty}", "{dir}", ""],
    flags.text_file_flag: ["{missing}", "{empty}", "{binary}", "{dir}", "{blank}", ""],
    flags.existing_dir_flag: ["{missing}", "{a_file}", ""],
    flags.existing_path_flag: ["{missing}", "{empty}", ""],
    flags.data_path_flag: ["{missing}", "{empty}", ""],
    flags.out_dir_flag: ["{a_file}", "{a_file}/sub", ""],
    flags.out_file_flag: ["{dir}", "{a_file}/x.safetensors", ""],
    flags.estimator_flag: ["ols", "", "Ridge"],
    flags.corpus_flag: ["neutral:0", "file:", "bogus", "", "neutral+"],
}
"""Values each flag type must refuse. A flag type without an entry fails test_every_flag_type_has_bad_values."""

GOOD_VALUES: dict[Any, str] = {
    flags.positive_int_flag: "2", flags.nonnegative_int_flag: "0", flags.finite_float_flag: "0.5", flags.positive_float_flag: "0.5",
    flags.nonnegative_float_flag: "0", flags.fraction_flag: "0.2", flags.depth_flag: "1", flags.ratio_flag: "1.2",
    flags.ridge_flag: "auto", flags.alpha_or_auto_flag: "auto", flags.int_list_flag: "1,2", flags.layer_list_flag: "1,2",
    flags.layers_or_auto_flag: "auto", flags.float_list_flag: "0,0.1", flags.name_list_flag: "a,b", flags.text_flag: "some text",
    flags.model_flag: "smollm2-135m-instruct", flags.model_list_flag: "a,b", flags.hookpoint_template_flag: "layers.{layer}",
    flags.device_flag: "cpu", flags.existing_file_flag: "{a_file}", flags.text_file_flag: "{text}", flags.existing_dir_flag: "{dir}",
    flags.existing_path_flag: "{dir}", flags.data_path_flag: "hub", flags.out_dir_flag: "{dir}/out", flags.out_file_flag: "{dir}/out.x",
    flags.estimator_flag: "ridge", flags.corpus_flag: "concept+neutral:10",
}

FREE_TEXT: dict[tuple[str, str], str] = {}
"""(command, dest) of flags that take any text on purpose, with the reason. Empty: every flag validates."""

PENDING_LEAD: dict[tuple[str, str], Any] = {}
"""Flags of the lead's demo and transfer commands (analyses/_transfer_run.py ``add_transfer_args``,
analyses/emotion_transfer.py ``--data-dir``) that still lack a validator, with the ``type=`` they should declare. Their values are checked in the demo's Config or by load_model (see the demo
cases above); each entry must go once the flag declares its type (the test says so)."""


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every `contrans` subcommand's parser, and the flags `contrans bench` hands to bench.run."""
    import bench
    from contrans_tl.entry import CommandParser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = dict(sub.choices)
    parsers["bench"] = CommandParser(prog="contrans bench")
    bench.add_arguments(parsers["bench"])
    return parsers


def _flags() -> list[tuple[str, argparse.Action]]:
    return [(cmd, a) for cmd, p in _parsers().items() for a in p._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.nargs != 0]


def _flag_id(cmd: str, action: argparse.Action) -> str:
    return f"{cmd} {action.option_strings[0] if action.option_strings else action.dest}"


def test_every_flag_declares_a_validator():
    """By construction: a flag that takes a value declares a type from contrans_tl.validate (or choices);
    a new flag without one fails here, before any user meets its traceback."""
    bare, fixed = [], []
    for cmd, action in _flags():
        key = (cmd, action.dest)
        validated = action.choices is not None or action.type in flags.FLAG_TYPES
        if key in PENDING_LEAD:
            if validated:
                fixed.append(_flag_id(cmd, action))
        elif not validated and key not in FREE_TEXT:
            bare.append(f"{_flag_id(cmd, action)} (type={getattr(action.type, '__name__', action.type)})")
    assert not bare, f"flags without a validating type= from contrans_tl.validate (or choices): {bare}"
    assert not fixed, f"these flags validate now: remove them from PENDING_LEAD: {fixed}"


def test_every_flag_type_has_bad_values():
    """Each flag type comes with the values it must refuse and one it must take; they do."""
    assert set(BAD_VALUES) == set(flags.FLAG_TYPES) == set(GOOD_VALUES)


@pytest.fixture
def flag_paths(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    (tmp_path / "blank").write_text("  \n\n \t\n")
    (tmp_path / "text").write_text("one line\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "dir").mkdir()
    return {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "binary": tmp_path / "binary",
            "blank": tmp_path / "blank", "text": tmp_path / "text", "a_file": tmp_path / "a_file", "dir": tmp_path / "dir"}


@pytest.mark.parametrize("flag_type", list(BAD_VALUES), ids=lambda f: f.__name__)
def test_flag_types_refuse_their_bad_values(flag_type, flag_paths):
    assert flag_type(_fill_paths(GOOD_VALUES[flag_type], flag_paths)) is not None
    for bad in BAD_VALUES[flag_type]:
        with pytest.raises(argparse.ArgumentTypeError):
            flag_type(_fill_paths(bad, flag_paths))


def _fill_paths(value: str, paths: dict[str, Path]) -> str:
    for key, path in paths.items():
        value = value.replace("{" + key + "}", str(path))
    return value


def _minimal_argv(parser: argparse.ArgumentParser, skip: argparse.Action, paths: dict[str, Path]) -> list[str]:
    """The required arguments of ``parser`` with good values (``skip`` left out)."""
    argv: list[str] = []
    for action in parser._actions:
        if action is skip or isinstance(action, argparse._HelpAction) or action.nargs == 0:
            continue
        if action.option_strings and not action.required:
            continue
        good = _fill_paths(GOOD_VALUES[action.type], paths) if action.choices is None else str(list(action.choices)[0])
        values = [good] * (action.nargs if isinstance(action.nargs, int) else 1)
        argv += [action.option_strings[0], *values] if action.option_strings else values
    return argv


def _with_bad(action: argparse.Action, bad: str, paths: dict[str, Path], parser: argparse.ArgumentParser) -> list[str]:
    rest = _minimal_argv(parser, action, paths)
    if not action.option_strings:  # a positional: in its place among the other positionals
        positionals = [a for a in parser._actions if not a.option_strings and a.nargs != 0
                       and not isinstance(a, argparse._HelpAction)]
        head = []
        for a in positionals:
            if a is action:
                break
            head.append(rest.pop(0))
        return head + [bad] + rest
    n = action.nargs if isinstance(action.nargs, int) else 1
    if n == 1:
        return rest + [f"{action.option_strings[0]}={bad}"]
    good = _fill_paths(GOOD_VALUES[action.type], paths)
    return rest + [action.option_strings[0], bad] + [good] * (n - 1)


def _run_command(cmd: str, argv: list[str]) -> int:
    if cmd == "bench":  # `contrans bench` runs bench.run in a process of its own; its parser is this one
        from bench.run import main as bench_main

        return bench_main(argv)
    return main([cmd, *argv])


@pytest.mark.parametrize("cmd,action", [f for f in _flags() if (f[0], f[1].dest) not in PENDING_LEAD],
                         ids=[_flag_id(*f) for f in _flags() if (f[0], f[1].dest) not in PENDING_LEAD])
def test_every_flag_refuses_its_bad_values(cmd, action, flag_paths, no_model_loads, tmp_path, monkeypatch, capsys):
    """Each bad value of the flag's type: exit 2, one `contrans: error:` line naming the flag, no model loaded."""
    monkeypatch.chdir(tmp_path)
    parser = _parsers()[cmd]
    action = next(a for a in parser._actions if (a.dest, a.option_strings) == (action.dest, action.option_strings))
    bads = ["no-such-choice"] if action.choices is not None else BAD_VALUES.get(action.type, [])
    if not bads:
        assert (cmd, action.dest) in FREE_TEXT
    names = action.option_strings or [f"argument {action.dest}", f"argument {action.metavar}"]
    for bad in bads:
        line = _one_error_line(_run_command(cmd, _with_bad(action, _fill_paths(bad, flag_paths), flag_paths, parser)),
                               capsys.readouterr().err)
        assert any(name in line for name in names), (bad, line)


def test_cli_internal_error_points_at_a_traceback_file(monkeypatch, capsys):
    """An unexpected exception prints one line naming a file with the full traceback; --debug raises it."""
    import contrans_tl.cli as cli

    def broken(args):
        raise KeyError("deep inside")

    monkeypatch.setitem(cli.COMMANDS, "models", ("list", cli.COMMANDS["models"][1], broken))
    assert main(["models"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("contrans: internal error: KeyError") and "traceback" in line
    path = Path(line.split("full traceback: ")[1].split(";")[0])
    assert "deep inside" in path.read_text() and "Traceback" in path.read_text()
    with pytest.raises(KeyError):
        main(["models", "--debug"])


def test_os_errors_about_user_paths_are_one_line(tmp_path, capsys):
    """The net under commands whose path flags do not validate yet: FileExistsError and friends are a
    user error in one line (exit 2) naming the path, not an internal error."""
    from contrans_tl.entry import run_reporting_errors

    (tmp_path / "a_file").write_text("x")
    assert run_reporting_errors(lambda: (tmp_path / "a_file").mkdir(parents=True, exist_ok=True), debug=False) == 2
    line = _one_error_line(2, capsys.readouterr().err)
    assert "FileExistsError" in line and "a_file" in line
    with pytest.raises(FileExistsError):
        run_reporting_errors(lambda: (tmp_path / "a_file").mkdir(exist_ok=True), debug=True)


def test_bench_and_analysis_scripts_report_one_line(tmp_path):
    """`contrans bench` (its own process) and `python -m contrans_tl.analyses.X` answer a bad flag the same way."""
    import subprocess
    import sys

    for argv in ([sys.executable, "-m", "contrans_tl.cli", "bench", "--threads", "x"],
                 [sys.executable, "-m", "contrans_tl.analyses.size_matrix", "--alphas", "x"]):
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("contrans: error:"), done.stderr
        assert ("--threads" if "bench" in argv else "--alphas") in lines[0]
    # the demo benchmark alone: a bad flag, and a folder holding an earlier run (it would be resumed, not timed)
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "old" / "cells").mkdir(parents=True)
    for argv, named in (([sys.executable, "-m", "bench.demo", "--threads", "0"], "--threads"),
                        ([sys.executable, "-m", "bench.demo", "--demo-out", str(tmp_path / "old")], "demo_out")):
        done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.strip().splitlines() if line.startswith("contrans:")]
        assert done.returncode == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr, done.stderr
