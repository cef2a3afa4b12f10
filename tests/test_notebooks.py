"""The analysis notebooks execute end to end in their quick form (tiny random models), so they cannot break unseen.

``emotion_transfer.ipynb`` runs in tests/test_demo.py, where it resumes the quick demo's cells.
"""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

# notebook -> text its outputs must show (a value the notebook computed, not a heading)
EXPECTED = {
    "size_matrix.ipynb": "model loads: 5 (bound: <= 2N - 1 = 5",
    "checkpoint_sweep.ipynb": "finished cells unchanged: True",
    "token_shift.ipynb": "happiness",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_quick_form(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRANS_QUICK", "1")
    monkeypatch.setenv("CONTRANS_NOTEBOOK_OUT", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert EXPECTED[name] in outputs, outputs[-2000:]
