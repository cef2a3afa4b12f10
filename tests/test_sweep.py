"""CellStore: computes only missing cells, and refuses to mix cells from other settings."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from contrans_tl.errors import SettingsMismatchError
from contrans_tl.sweep import CellStore, cell_key, settings_fingerprint


def test_only_missing_cells_are_computed(tmp_path):
    calls: list[int] = []

    def square(x: int) -> int:
        calls.append(x)
        return x * x

    store = CellStore(tmp_path)
    first = store.run({cell_key(x=x): x for x in (1, 2)}, square)
    again = CellStore(tmp_path).run({cell_key(x=x): x for x in (1, 2, 3)}, square)
    assert first == {"x=1": 1, "x=2": 4}
    assert again == {"x=1": 1, "x=2": 4, "x=3": 9}
    assert calls == [1, 2, 3]
    with ThreadPoolExecutor(2) as pool:
        assert store.run({cell_key(x=4): 4}, square, executor=pool) == {"x=4": 16}


def test_settings_guard_the_store(tmp_path):
    CellStore(tmp_path, settings={"model": "a", "alpha": [0.1, 0.2]}).put("k=1", 1)
    # the same settings (keys in any order) resume; the settings file is not a cell
    store = CellStore(tmp_path, settings={"alpha": [0.1, 0.2], "model": "a"})
    assert store.all() == {"k=1": 1}
    with pytest.raises(SettingsMismatchError, match="differing: model"):
        CellStore(tmp_path, settings={"model": "b", "alpha": [0.1, 0.2]})
    # a store opened without settings does not check them
    assert CellStore(tmp_path).get("k=1") == 1


def _changed(value):
    """A different value of the same kind (the check only needs the fingerprint to notice)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, tuple):
        return value[:-1] if len(value) > 1 else value + value
    if value is None:
        return 7
    raise AssertionError(f"no changed value for {value!r}")


def _resumable_configs():
    from contrans_tl.analyses import alignment_eval, checkpoint_sweep, emotion_transfer, size_matrix

    return {"demo": emotion_transfer.Config(), "size_matrix": size_matrix.Config(),
            "checkpoint_sweep": checkpoint_sweep.Config(), "align_eval": alignment_eval.Config()}


@pytest.mark.parametrize("name", ["demo", "size_matrix", "checkpoint_sweep", "align_eval"])
def test_every_setting_that_changes_a_cell_changes_the_fingerprint(name):
    """By construction: each Config field is fingerprinted unless declared a grid axis or a run option."""
    cfg = _resumable_configs()[name]
    base = settings_fingerprint(cfg)
    roles = {f.name: f.metadata.get("cell_role") for f in dataclasses.fields(cfg)}
    for field_name, role in roles.items():
        if role is not None:
            assert field_name not in base
            continue
        value = getattr(cfg, field_name)
        if isinstance(value, dict):
            continue
        assert field_name in base
        setattr(cfg, field_name, _changed(value))  # no __post_init__ check: only the fingerprint matters here
        assert settings_fingerprint(cfg) != base, field_name
        setattr(cfg, field_name, value)
    # the fields that made stale cells possible before are guarded now
    if name == "checkpoint_sweep":
        assert {"emotions", "tokens_per_step", "metric"} <= set(base)


def test_grid_axes_are_named_in_every_cell_key():
    """A grid axis may stay out of the fingerprint only because the cell keys name it."""
    from contrans_tl.analyses import checkpoint_sweep as cs
    from contrans_tl.analyses import size_matrix as sm

    assert {f.name for f in dataclasses.fields(sm.Config) if f.metadata.get("cell_role") == "grid"} == \
        {"models", "emotions", "alphas"}
    keys = {sm._steer_key(s, t, e, a) for s in ("A", "B") for t in ("A", "B") for e in ("anger", "fear") for a in (0.1, 0.3)}
    assert len(keys) == 16
    assert {f.name for f in dataclasses.fields(cs.Config) if f.metadata.get("cell_role") == "grid"} == \
        {"checkpoints", "alphas"}
    assert len({cs.cell_name(c, a) for c in ("ckpt_000", "ckpt_100") for a in (0.0, 0.3)}) == 4


def test_settings_of_a_store_cannot_go_stale(tmp_path):
    """A changed fingerprinted setting refuses the folder; an added grid value only adds cells."""
    from contrans_tl.analyses import checkpoint_sweep as cs

    cfg = cs.Config(model="m", checkpoints=("ckpt_000",), out=str(tmp_path))
    CellStore(tmp_path / "cells", settings=settings_fingerprint(cfg))
    with pytest.raises(SettingsMismatchError, match="emotions"):
        CellStore(tmp_path / "cells", settings=settings_fingerprint(dataclasses.replace(cfg, emotions=("fear",))))
    more = dataclasses.replace(cfg, checkpoints=("ckpt_000", "ckpt_100"), alphas=(0.0, 0.3, 0.5), executor="serial")
    CellStore(tmp_path / "cells", settings=settings_fingerprint(more))  # same settings: resumes


def test_long_cell_keys_stay_short_and_distinct(tmp_path):
    """Keys naming deep local model paths are shortened with a hash: storable, stable, still distinct."""
    deep = "/".join(["a-rather-long-folder-name"] * 12)
    keys = [cell_key(source=deep + "/model_a", target=deep + "/model_b", emotion="fear", alpha=0.3),
            cell_key(source=deep + "/model_b", target=deep + "/model_a", emotion="fear", alpha=0.3)]
    assert all(len(k) <= 160 for k in keys) and keys[0] != keys[1]
    assert keys[0] == cell_key(source=deep + "/model_a", target=deep + "/model_b", emotion="fear", alpha=0.3)
    store = CellStore(tmp_path)
    store.put(keys[0], {"v": 1})
    assert store.get(keys[0]) == {"v": 1}
