"""CellStore: computes only missing cells, and refuses to mix cells from other settings."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from contrans_tl.errors import SettingsMismatchError
from contrans_tl.sweep import CellStore, cell_key


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
