"""Resumable runs refuse what they cannot trust: changed input data, damaged metadata, incomplete cells.

Tiny models only: a size matrix of two tiny models runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from contrans_tl.analyses import size_matrix as sm
from contrans_tl.analyses._checkpoints import training_tokens
from contrans_tl.analyses._common import RunSettings
from contrans_tl.datasets import data_dir
from contrans_tl.errors import ArtifactError, ContransError
from contrans_tl.offline import OFFLINE_MODELS, model_key
from contrans_tl.sweep import input_digest, input_path, settings_fingerprint
from contrans_tl.testing import make_tiny_model_dir

SMALL = ["--emotions", "happiness", "--n-refine", "2", "--n-eval", "1", "--map-corpus", "neutral", "--n-texts", "30",
         "--alphas", "2.0", "--batch-size", "8", "--no-plot"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_models")
    return [str(make_tiny_model_dir(root / "a", "llama", seed=1, d_model=48, n_layers=3, n_ctx=1024)),
            str(make_tiny_model_dir(root / "b", "gpt_neox", seed=2, n_ctx=1024))]


def _matrix(two_models, out: Path, scenarios: Path) -> list[str]:
    return ["--models", ",".join(two_models), "--out", str(out), "--data-dir", str(scenarios), *SMALL]


def test_resume_after_the_scenarios_changed_is_refused(two_models, tmp_path, capsys):
    """The fingerprint holds a digest of the scenario folder: a rerun on edited scenarios is refused,
    one on the same scenarios moved elsewhere resumes and loads nothing."""
    scenarios = tmp_path / "scenarios"
    shutil.copytree(data_dir() / "emotions", scenarios)
    out = tmp_path / "run"
    assert sm.main(_matrix(two_models, out, scenarios)) == 0
    moved = tmp_path / "moved"
    shutil.copytree(scenarios, moved)
    assert sm.main(_matrix(two_models, out, moved)) == 0
    assert json.loads((out / "matrix.json").read_text())["model_loads"] == 0
    anger = json.loads((moved / "anger.json").read_text())
    (moved / "anger.json").write_text(json.dumps(["A brand new scenario about a broken promise."] + anger[1:]))
    capsys.readouterr()
    assert sm.main(_matrix(two_models, out, moved)) == 2
    err = capsys.readouterr().err
    assert "SettingsMismatchError" in err and "inputs.data_dir" in err and len(err.strip().splitlines()) == 1


def test_damaged_info_and_incomplete_cells_are_recomputed(two_models, tmp_path):
    """A cut-short info.json is written again (its model reloaded); a cell holding {} or a wrong-typed
    value is recomputed with a warning, never read into a KeyError."""
    scenarios = tmp_path / "scenarios"
    shutil.copytree(data_dir() / "emotions", scenarios)
    out = tmp_path / "run"
    assert sm.main(_matrix(two_models, out, scenarios)) == 0
    info = next((out / "models").glob("*/info.json"))
    info.write_text('{"name": "a", "n_lay')
    cells = sorted((out / "cells").glob("kind=steer*.json"))
    cells[0].write_text("{}")
    cells[1].write_text('{"logit_acc": "many", "token_acc": 0, "n": 3}')
    with pytest.warns(UserWarning, match="complete cell"):
        assert sm.main(_matrix(two_models, out, scenarios)) == 0
    assert json.loads(info.read_text())["layer"] >= 0
    for cell in cells[:2]:
        value = json.loads(cell.read_text())
        assert isinstance(value["logit_acc"], float) and value["n"] > 0


def test_damaged_trainer_state_is_a_named_error(tmp_path):
    ckpt = tmp_path / "step4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"global_step": 4, "num_input')
    with pytest.raises(ArtifactError, match="trainer_state.json: not readable JSON"):
        training_tokens(str(ckpt))
    (ckpt / "trainer_state.json").write_text('{"global_step": "four"}')
    with pytest.raises(ArtifactError, match="numeric"):
        training_tokens(str(ckpt))
    (ckpt / "trainer_state.json").write_text('{"global_step": 4, "num_input_tokens_seen": 1000}')
    assert training_tokens(str(ckpt)) == 1000.0


# ---- the fingerprint: settings, input data (by content), protocol ----------------------------------
@dataclasses.dataclass
class _Cfg:
    seed: int = 0
    corpus: str | None = input_path(None)


def test_fingerprint_digests_inputs_by_content_and_records_the_protocol(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b" / "a.txt"
    a.write_text("one\ntwo\n")
    b.parent.mkdir()
    b.write_text("one\ntwo\n")
    fa, fb = settings_fingerprint(_Cfg(corpus=str(a))), settings_fingerprint(_Cfg(corpus=str(b)))
    assert fa == fb and "corpus" not in fa and fa["inputs"]["corpus"] == input_digest(a)
    b.write_text("one\nthree\n")
    assert settings_fingerprint(_Cfg(corpus=str(b))) != fa
    assert settings_fingerprint(_Cfg())["inputs"] == {"corpus": "built-in", "built-in data": input_digest(data_dir())}
    assert settings_fingerprint(_Cfg())["protocol"] == 1
    assert settings_fingerprint(_Cfg(), protocol=3)["protocol"] == 3

    @dataclasses.dataclass
    class Versioned(_Cfg):
        PROTOCOL = 2

    assert settings_fingerprint(Versioned())["protocol"] == 2
    # a folder: every file's name and content counts, hidden files and caches do not
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.json").write_text("[1]")
    before = input_digest(folder)
    (folder / ".cache").write_text("noise")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "m.pyc").write_bytes(b"\0")
    assert input_digest(folder) == before
    (folder / "y.json").write_text("[2]")
    assert input_digest(folder) != before


def test_every_analysis_input_is_an_input_path():
    """The emotion analyses' scenario folder is fingerprinted by content (RunSettings.data_dir)."""
    roles = {f.name: f.metadata.get("cell_role") for f in dataclasses.fields(RunSettings)}
    assert roles["data_dir"] == "input"
    assert "data_dir" not in settings_fingerprint(sm.Config(models=("a", "b")))


# ---- one model, however it is written ---------------------------------------------------------------
def test_model_key_sees_one_model_written_two_ways(tmp_path):
    folder = make_tiny_model_dir(tmp_path / "m", "llama", seed=0)
    assert model_key(str(folder)) == model_key(str(folder) + "/") == model_key(f"{tmp_path}/./m")
    converted = tmp_path / "cache" / "gemma-3-270m"
    converted.mkdir(parents=True)
    (converted / "contrans_source.json").write_text(json.dumps({"sha256": OFFLINE_MODELS["gemma-3-270m"].sha256}))
    assert model_key(str(converted)) == model_key("gemma-3-270m") == "offline:gemma-3-270m"
    assert model_key("EleutherAI/pythia-14m") != model_key("EleutherAI/pythia-70m")
    with pytest.raises(ContransError, match="are one model"):
        sm.Config(models=("gemma-3-270m", str(converted)))


def test_a_local_folder_has_no_revision(tmp_path):
    """A checkpoint name read as a revision of a local model would silently load the final weights."""
    from contrans_tl import load_model
    from contrans_tl.errors import ModelUnavailableError

    folder = make_tiny_model_dir(tmp_path / "m", "llama", seed=0)
    with pytest.raises(ModelUnavailableError, match="has no revision 'step5'"):
        load_model(str(folder), revision="step5")
