"""Every bad input gets a named error that names the argument: through the API and the `contrans` CLI.

Each case is (what is called, the exception class expected, text the message must contain, which
names the argument or the file). Tiny random models only: the whole file runs in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import contrans_tl as ct
from contrans_tl.cli import main
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
    return {"m": tiny_llama, "mb": tiny_llama_b, "v": vec, "amap": amap, "tmp": tmp, "file": tmp / "a_file",
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
CLI_CASES = {
    "generate-layers-not-ints": (["generate", "m", "p", "--layers", "x,y"], "--layers"),
    "generate-alpha-not-a-number": (["generate", "m", "p", "--alpha", "x"], "--alpha"),
    "generate-max-new-tokens-negative": (["generate", "m", "p", "--max-new-tokens", "-1"], "--max-new-tokens"),
    "generate-missing-model-folder": (["generate", "./no/such/model", "p"], "no such local model folder"),
    "refine-missing-prompt-file": (["refine", "m", "--positive", "missing.txt", "--negative", "missing.txt",
                                    "--out", "v.safetensors"], "--positive"),
    "refine-batch-size-zero": (["refine", "m", "--positive", "{file}", "--negative", "{file}", "--batch-size", "0",
                                "--out", "v.safetensors"], "--batch-size"),
    "fit-ridge-not-a-number": (["fit", "a", "b", "--ridge", "abc", "--out", "m.safetensors"], "--ridge"),
    "fit-holdout-out-of-range": (["fit", "a", "b", "--holdout", "1.5", "--out", "m.safetensors"], "--holdout"),
    "fit-missing-texts-file": (["fit", "a", "b", "--texts", "missing.txt", "--out", "m.safetensors"], "--texts"),
    "fit-estimator-bogus": (["fit", "a", "b", "--estimator", "ols", "--out", "m.safetensors"], "--estimator"),
    "fit-corpus-bogus": (["fit", "a", "b", "--corpus", "neutral:0", "--out", "m.safetensors"], "--corpus"),
    "fit-texts-and-corpus": (["fit", "a", "b", "--texts", "{file}", "--corpus", "neutral", "--out", "m.safetensors"], "--corpus"),
    "fit-rank-zero": (["fit", "a", "b", "--estimator", "rrr", "--rank", "0", "--out", "m.safetensors"], "--rank"),
    "export-alpha-not-a-number": (["export", "v.safetensors", "--format", "gguf", "--out", "x", "--alpha", "x"], "--alpha"),
    "export-format-bogus": (["export", "v.safetensors", "--format", "onnx", "--out", "x"], "--format"),
    "export-missing-vector": (["export", "missing.safetensors", "--format", "gguf", "--out", "x"], "missing.safetensors"),
    "models-prepare-unknown": (["models", "--prepare", "./no/such/model"], "no such local model folder"),
    "demo-alphas-not-numbers": (["demo", "--alphas", "x,y"], "--alphas"),
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
    "report-n-eval-zero": (["report", "--out", "r", "--n-eval", "0"], "--n-eval"),
    "layer-search-unknown-flag": (["layer-search", "--out", "r", "--bogus"], "--bogus"),
    "unknown-command": (["transmogrify"], "transmogrify"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line(case, tmp_path, monkeypatch, capsys):
    argv, fragment = CLI_CASES[case]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\nanother prompt\n")
    monkeypatch.chdir(tmp_path)
    code = main([a.replace("{file}", str(prompts)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("contrans: error:"), err
    assert fragment in lines[0] and "Traceback" not in err


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
