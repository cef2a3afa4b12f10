"""analyses.checkpoint_sweep on a tiny model trained for a few steps: cells, resume after a kill, executors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from contrans_tl.analyses import checkpoint_sweep as cs
from contrans_tl.analyses import _sweep_cell as sweep_cell

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    return cs.make_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"), steps=(1, 2, 4))


def _cfg(ckpts, out, **kw) -> cs.Config:
    base = dict(model=str(ckpts[-1]), checkpoints=tuple(str(c) for c in ckpts), out=str(out), alphas=(1.0,),
                emotions=("happiness",), n_refine=2, n_eval=1, executor="serial", mapping="identity", batch_size=8)
    base.update(kw)
    return cs.Config(**base)


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "cells").glob("*.json")}


def test_checkpoint_specs_and_tokens(ckpts):
    assert cs.resolve_checkpoint("LLM360/Amber", "ckpt_100") == ("LLM360/Amber", {"revision": "ckpt_100"})
    assert cs.resolve_checkpoint("EleutherAI/pythia-70m", "step1000") == ("EleutherAI/pythia-70m", {"checkpoint": 1000})
    assert cs.resolve_checkpoint("x", str(ckpts[0])) == (str(ckpts[0]), {})
    assert cs.training_tokens("step1000") == 1000 * cs.PYTHIA_TOKENS_PER_STEP
    assert cs.training_tokens("ckpt_359") == pytest.approx(cs.AMBER_TOTAL_TOKENS)
    assert cs.training_tokens("ckpt_000") == pytest.approx(cs.AMBER_TOTAL_TOKENS / 360)
    assert cs.training_tokens("main") is None
    seen = [cs.training_tokens(str(c)) for c in ckpts]
    assert seen == sorted(seen) and seen[0] > 0
    state = json.loads((ckpts[1] / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert cs.Config(alphas=(0.5,)).alphas == (0.0, 0.5)  # the baseline is always swept


def test_sweep_resumes_after_a_crash(ckpts, tmp_path, monkeypatch):
    """A cell failing midway stops the sweep; the rerun keeps finished cells and computes the rest."""
    cfg = _cfg(ckpts, tmp_path)
    real = sweep_cell._evaluate_cell
    calls: list[tuple[str, float]] = []

    def crashing(args):
        calls.append((args.checkpoint, args.alpha))
        if len(calls) == 3:
            raise RuntimeError("simulated kill")
        return real(args)

    monkeypatch.setattr(sweep_cell, "_evaluate_cell", crashing)
    with pytest.raises(RuntimeError, match="simulated kill"):
        cs.run(cfg)
    before = _snapshot(tmp_path)
    assert len(before) == 2  # the two cells finished before the crash are on disk
    assert not (tmp_path / "sweep.json").exists()

    calls.clear()
    monkeypatch.setattr(sweep_cell, "_evaluate_cell", lambda args: (calls.append((args.checkpoint, args.alpha)), real(args))[1])
    result = cs.run(cfg)
    assert len(calls) == 4  # only the missing cells ran
    after = _snapshot(tmp_path)
    assert len(after) == 6
    assert {k: after[k] for k in before} == before  # finished cells untouched (bytes and mtime)
    assert result["cells_before_this_run"] == 2 and result["cells_computed_this_run"] == 4
    assert result["model_loads"] == 0  # the final model's vectors were already on disk
    rows = result["rows"]
    assert [r["checkpoint"] for r in rows] == [str(c) for c in ckpts]
    assert all(r["mapping"] == "identity" and r["layer"] == 0 for r in rows)
    assert [r["tokens"] for r in rows] == [cs.training_tokens(str(c)) for c in ckpts]
    assert set(rows[0]["transplanted"]) == {"1"}
    paths = cs.plot(result, tmp_path)
    assert all(p.is_file() for p in paths)


VOLATILE = {"finished", "load_seconds", "pid", "seconds"}  # when and where a cell ran, not what it found


def _sweep_cmd(ckpts, out: Path) -> list[str]:
    return [sys.executable, "-m", "contrans_tl.analyses.checkpoint_sweep", "--model", str(ckpts[-1]),
            "--checkpoints", ",".join(str(c) for c in ckpts), "--out", str(out), "--alphas", "0.5,1.0",
            "--emotions", "happiness", "--n-refine", "2", "--n-eval", "1", "--executor", "serial",
            "--mapping", "identity", "--batch-size", "8", "--no-plot"]


def _values(cell: bytes) -> dict:
    return {k: v for k, v in json.loads(cell).items() if k not in VOLATILE}


def test_sweep_killed_at_five_random_moments_resumes_exactly(ckpts, tmp_path):
    """SIGKILL the command at 5 random moments, then let it finish: every cell is computed exactly once
    (a finished cell is never rewritten) and the cells and rows equal those of an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    done = subprocess.run(_sweep_cmd(ckpts, reference), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = _snapshot(reference)
    total = len(expected)
    assert total == 9  # 3 checkpoints x alphas 0, 0.5, 1

    out, rng = tmp_path / "killed", random.Random(20261202)
    first_seen: dict[str, tuple[int, bytes]] = {}
    for moment in range(5):
        wait_for = rng.randint(0, total - 2)  # kill once this many cells exist, then a random instant later
        proc = subprocess.Popen(_sweep_cmd(ckpts, out), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(list(out.glob("cells/*.json"))) < wait_for:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"moment {moment}: the sweep ended before it was killed"
        for name, cell in _snapshot(out).items():
            assert first_seen.setdefault(name, cell) == cell, f"{name} was computed again after it was finished"

    done = subprocess.run(_sweep_cmd(ckpts, out), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _snapshot(out)
    assert sorted(after) == sorted(expected)  # no cell lost
    assert {k: after[k] for k in first_seen} == first_seen  # none computed twice
    assert {k: _values(v[1]) for k, v in after.items()} == {k: _values(v[1]) for k, v in expected.items()}
    resumed = json.loads((out / "sweep.json").read_text())
    uninterrupted = json.loads((reference / "sweep.json").read_text())
    assert resumed["cells_before_this_run"] == len(first_seen)
    assert [{k: v for k, v in r.items() if k != "cells"} for r in resumed["rows"]] == \
        [{k: v for k, v in r.items() if k != "cells"} for r in uninterrupted["rows"]]


def test_fit_mapping_with_a_swapped_executor(ckpts, tmp_path):
    """Any concurrent.futures.Executor can run the cells; mapping='fit' fits final → checkpoint."""
    cfg = _cfg(ckpts, tmp_path, checkpoints=(str(ckpts[0]),), mapping="fit", n_texts=30)
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = cs.run(cfg, executor=pool)
    assert result["executor"] == "ThreadPoolExecutor"
    (row,) = result["rows"]
    assert row["mapping"] == "fit"
    r2 = row["cells"]["1"]["map_r2_heldout"]
    assert r2 is not None and r2 > 0.5  # one SGD step from the final weights: nearly the same basis
    assert (tmp_path / "final" / "aligned_tokens.safetensors").is_file()
    assert row["cells"]["1"]["map"] == {"r2_heldout": r2, "corpus": "neutral", "n_texts": 30, "estimator": "ridge"}


def test_map_corpus_and_estimator_reach_every_cells_map(ckpts, tmp_path):
    """--map-corpus and --map-estimator reach the map each cell fits (its record says so; the default is neutral
    and ridge, so an ignored option fails here), and an unset sentence count is refused nowhere."""
    cfg = _cfg(ckpts, tmp_path, checkpoints=(str(ckpts[0]),), mapping="fit", map_corpus="concept",
               map_estimator="procrustes")
    assert cfg.n_texts is None and cs.Config().n_texts == 200  # the neutral default keeps its count
    (row,) = cs.run(cfg)["rows"]
    for cell in row["cells"].values():
        assert cell["map"]["corpus"] == "concept" and cell["map"]["estimator"] == "procrustes"
        assert cell["map"]["n_texts"] == 4  # happiness's 2 + 2 contrast prompts, never an evaluation scenario


def test_default_process_pool(ckpts, tmp_path):
    cfg = _cfg(ckpts, tmp_path, checkpoints=(str(ckpts[0]),), executor="process", max_workers=1, threads=1)
    result = cs.run(cfg)
    assert result["executor"] == "ProcessPoolExecutor"
    pids = {c["pid"] for c in result["rows"][0]["cells"].values()}
    assert os.getpid() not in pids and len(pids) == 1  # both cells ran in the one worker process


class _FakeJob:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _FakeSubmitit:
    """Like submitit.AutoExecutor: submit() returns a job handle, not a concurrent Future."""

    def __init__(self):
        self.submitted = 0

    def submit(self, fn, *args, **kwargs):
        self.submitted += 1
        return _FakeJob(fn(*args, **kwargs))


def test_job_executor_adapts_submitit_style_executors():
    from concurrent.futures import Future, as_completed

    inner = _FakeSubmitit()
    ex = cs.JobExecutor(inner)
    futures = [ex.submit(pow, 2, n) for n in range(5)]
    assert all(isinstance(f, Future) for f in futures)
    assert sorted(f.result() for f in as_completed(futures)) == [1, 2, 4, 8, 16]
    assert inner.submitted == 5
    ex.shutdown()
