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


@pytest.mark.parametrize("damaged", ["{", "[]", "", "null", '"k"'])
def test_damaged_settings_file_is_refused_not_reclaimed(tmp_path, damaged):
    """A .settings cut short (or not an object) leaves the cells' settings unknown: the folder is
    refused with a named error, never claimed anew with whatever settings come next."""
    store = CellStore(tmp_path, settings={"k": 1})
    store.put("a", 1)
    (tmp_path / CellStore.SETTINGS).write_text(damaged)
    for settings in ({"k": 1}, {"k": 2}):
        with pytest.raises(SettingsMismatchError, match="damaged.*another output directory, or delete"):
            CellStore(tmp_path, settings=settings)
    assert (tmp_path / CellStore.SETTINGS).read_text() == damaged  # left as it was


def test_incomplete_cell_is_recomputed_when_the_store_checks_cells(tmp_path):
    """`{}` or a wrong-typed value in a cell is corrupt for a store with `valid`: recomputed, with a warning."""
    store = CellStore(tmp_path, valid=lambda v: isinstance(v, dict) and isinstance(v.get("x"), int))
    store.run(["a", "b"], lambda key: {"x": 1})
    store.path("a").write_text("{}")
    store.path("b").write_text('{"x": "many"}')
    with pytest.warns(UserWarning, match="complete cell"):
        out = store.run(["a", "b"], lambda key: {"x": 2})
    assert out == {"a": {"x": 2}, "b": {"x": 2}}
    assert CellStore(tmp_path).get("a") == {"x": 2}


def test_damaged_time_record_counts_as_none(tmp_path):
    """A cell's .time record only feeds the time table: a wrong-typed one counts as no record."""
    store = CellStore(tmp_path)
    store.run(["a", "b"], lambda key: 1)
    (tmp_path / "a.time").write_text('{"wall_s": "many", "cpu_s": null}')
    (tmp_path / "b.time").write_text('{"wall_s": 2.5, "cpu_s": 1.0}')
    again = CellStore(tmp_path)
    again.run(["a", "b"], lambda key: 1)
    assert (again.reused_wall_s, again.reused_cpu_s) == (2.5, 1.0)


def test_settings_key_on_one_side_only_is_named_even_when_the_other_holds_none(tmp_path):
    CellStore(tmp_path / "cells", settings={"seed": 0, "data_dir": None})
    with pytest.raises(SettingsMismatchError, match=r"differing: data_dir; stored \[None\], now \['\(absent\)'\]"):
        CellStore(tmp_path / "cells", settings={"seed": 0})
