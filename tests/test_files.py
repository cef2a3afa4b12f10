"""Atomic writes: concurrent writers of one path, unwritable targets, corrupt cells and settings."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

import contrans_tl as ct
from contrans_tl.errors import ArtifactError, SettingsMismatchError
from contrans_tl.files import atomic_path, write_json
from contrans_tl.models import ModelIdentity
from contrans_tl.sweep import CellStore

WRITER = r"""
import sys, torch
from contrans_tl.artifacts import ConceptVector
from contrans_tl.models import ModelIdentity
path, value = sys.argv[1], float(sys.argv[2])
ident = ModelIdentity("m", None, 2, 512)
for _ in range(25):
    ConceptVector(vectors=torch.full((2, 512), value), model=ident, layers=(0, 1), method="mean_diff").save(path)
"""


def test_four_processes_writing_one_artifact_leave_one_complete_file(tmp_path):
    path = tmp_path / "vector.safetensors"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(i + 1)], stderr=subprocess.PIPE)
             for i in range(4)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    vector = ct.ConceptVector.load(path)
    values = vector.vectors.unique()
    assert len(values) == 1 and float(values) in {1.0, 2.0, 3.0, 4.0}  # one writer's whole file, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vector.safetensors"]  # no temporary file left


def test_unwritable_folder_is_an_artifact_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    vector = ct.ConceptVector(vectors=torch.ones(2, 4), model=ModelIdentity("m", None, 2, 4), layers=(0, 1), method="mean_diff")
    with pytest.raises(ArtifactError, match="cannot write"):
        vector.save(blocker / "sub" / "v.safetensors")


def test_failed_write_leaves_the_old_file(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_corrupt_cell_is_recomputed_with_a_warning(tmp_path):
    store = CellStore(tmp_path, settings={"k": 1})
    store.run(["a", "b"], lambda key: key.upper())
    store.path("a").write_text('{"trunc')  # a write cut short
    calls = []
    with pytest.warns(UserWarning, match="corrupt"):
        out = store.run(["a", "b"], lambda key: calls.append(key) or key.upper())
    assert out == {"a": "A", "b": "B"} and calls == ["a"]


def test_corrupt_settings_file_is_treated_as_missing(tmp_path):
    CellStore(tmp_path, settings={"k": 1})
    (tmp_path / CellStore.SETTINGS).write_text("{")
    with pytest.warns(UserWarning, match="corrupt"):
        CellStore(tmp_path, settings={"k": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CellStore(tmp_path, settings={"k": 1})  # rewritten whole: no warning now
    with pytest.raises(SettingsMismatchError):
        CellStore(tmp_path, settings={"k": 2})
