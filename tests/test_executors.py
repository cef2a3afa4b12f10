"""The checkpoint sweep and the size matrix on real engines: Dask, Ray and submitit (local).

Every run's cells must equal those of the serial run, apart from when and where a cell ran; a
Dask worker killed mid-sweep loses no finished cell, and a serial rerun completes the rest.
Every process pins torch to one thread, so all of them compute the same floats.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import dask
import pytest
import ray
import submitit
from dask.distributed import Client, KilledWorker, LocalCluster

from contrans_tl.analyses import checkpoint_sweep as cs
from contrans_tl.analyses import size_matrix as sm
from contrans_tl.testing import make_tiny_model_dir

# one_thread (conftest): the cells run in this process (the serial references) use one torch thread, as the workers do
pytestmark = [pytest.mark.clients, pytest.mark.usefixtures("one_thread")]

VOLATILE = {"finished", "load_seconds", "pid", "seconds"}  # when and where a cell ran, not what it found
ALPHAS = (0.5, 1.0, 2.0)  # with the baseline: 3 checkpoints x 4 alphas = 12 cells


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    return cs.make_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"), steps=(1, 2, 4))


def _cfg(ckpts, out, **kw) -> cs.Config:
    base = dict(model=str(ckpts[-1]), checkpoints=tuple(str(c) for c in ckpts), out=str(out), alphas=ALPHAS,
                emotions=("happiness",), n_refine=2, n_eval=1, executor="serial", mapping="identity", batch_size=8,
                threads=1)
    base.update(kw)
    return cs.Config(**base)


def _cells(out: Path) -> dict[str, dict]:
    """Each stored cell's values, without the volatile keys."""
    return {p.name: {k: v for k, v in json.loads(p.read_bytes()).items() if k not in VOLATILE}
            for p in (out / "cells").glob("*.json")}


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "cells").glob("*.json")}


@pytest.fixture(scope="module")
def reference(ckpts, tmp_path_factory) -> Path:
    """The serial sweep: its cells are what every executor must reproduce."""
    out = tmp_path_factory.mktemp("serial")
    cs.run(_cfg(ckpts, out))
    assert len(_cells(out)) == 12
    return out


def _sweep_on(executor, ckpts, reference: Path, out: Path, **kw) -> dict:
    """The sweep through ``executor``, reusing the reference's final vectors (refined once)."""
    shutil.copytree(reference / "final", out / "final")
    result = cs.run(_cfg(ckpts, out, **kw), executor=executor)
    cells = _cells(out)
    assert cells and cells == {k: v for k, v in _cells(reference).items() if k in cells}
    return result


@pytest.fixture(scope="module")
def client():
    # allowed-failures 0: a cell whose worker dies fails (KilledWorker) instead of being resubmitted
    # (Dask's default, 3 tries), so the kill test reaches the rerun that must complete it
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def test_sweep_on_dask_equals_serial(client, ckpts, reference, tmp_path):
    result = _sweep_on(client.get_executor(), ckpts, reference, tmp_path)
    assert result["executor"] == "ClientExecutor" and result["cells_computed_this_run"] == 12
    assert len(_cells(tmp_path)) == 12
    pids = {c["pid"] for row in result["rows"] for c in row["cells"].values()}
    assert pids <= set(client.run(os.getpid).values())  # computed in the dask workers, not here


def test_size_matrix_on_dask_equals_serial(client, tmp_path):
    models = [str(make_tiny_model_dir(tmp_path / "a", "llama", seed=1, d_model=48, n_layers=3, n_ctx=1024)),
              str(make_tiny_model_dir(tmp_path / "b", "gpt_neox", seed=2, n_ctx=1024))]
    settings = dict(models=tuple(models), emotions=("happiness",), n_refine=2, n_eval=1, map_corpus="neutral", n_texts=30,
                    alphas=(2.0,), batch_size=8)
    serial = sm.run(sm.Config(out=str(tmp_path / "serial"), **settings))
    on_dask = sm.run(sm.Config(out=str(tmp_path / "dask"), **settings), executor=client.get_executor())
    assert on_dask["executor"] == "ClientExecutor" and serial["executor"] == "serial (this process)"
    # here only phase 1's files: each model loaded once; every cell was evaluated in a worker
    assert [m for m, _ in on_dask["loads"]] == models
    assert _cells(tmp_path / "dask") == _cells(tmp_path / "serial") and len(_cells(tmp_path / "serial")) == 6
    for key in ("matrices", "baseline", "map_r2_heldout", "steering_layers"):
        assert on_dask[key] == serial[key]


def test_dask_worker_killed_mid_sweep_loses_no_finished_cell(client, ckpts, reference, tmp_path):
    """SIGKILL a busy Dask worker once a cell is stored: its cells fail, the sweep stops, and a serial
    rerun computes exactly the missing cells, leaving the finished ones byte-identical."""
    pids = client.run(os.getpid)  # worker address -> pid
    shutil.copytree(reference / "final", tmp_path / "final")
    at_kill: dict[str, tuple[int, bytes]] = {}

    def kill_a_busy_worker_after_the_first_cell() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "cells").glob("*.json")):
            time.sleep(0.01)
        busy = [w for w, keys in client.processing().items() if keys and w in pids] or list(pids)
        at_kill.update(_snapshot(tmp_path))
        os.kill(pids[busy[0]], signal.SIGKILL)

    killer = threading.Thread(target=kill_a_busy_worker_after_the_first_cell)
    killer.start()
    with pytest.raises(KilledWorker):
        cs.run(_cfg(ckpts, tmp_path), executor=client.get_executor())
    killer.join()
    assert 0 < len(at_kill) < 12  # killed mid-sweep
    stored = len(_snapshot(tmp_path))
    assert stored < 12  # the killed worker's cells are missing

    result = cs.run(_cfg(ckpts, tmp_path))  # serial rerun
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in at_kill} == at_kill  # finished cells untouched (bytes and mtime)
    assert result["cells_before_this_run"] == stored and result["cells_computed_this_run"] == 12 - stored
    assert _cells(tmp_path) == _cells(reference)
    client.wait_for_workers(2, timeout=120)  # the nanny restarts the killed worker


def test_sweep_on_ray_equals_serial(ckpts, reference, tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = _sweep_on(cs.RayExecutor(num_cpus=1), ckpts, reference, tmp_path, checkpoints=(str(ckpts[0]),))
    finally:
        ray.shutdown()
    assert result["executor"] == "RayExecutor" and result["cells_computed_this_run"] == 4
    assert os.getpid() not in {c["pid"] for c in result["rows"][0]["cells"].values()}


def test_sweep_on_submitit_local_equals_serial(ckpts, reference, tmp_path):
    """submitit's Jobs are not concurrent Futures: run() wraps the executor in a JobExecutor."""
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    result = _sweep_on(executor, ckpts, reference, tmp_path / "out", checkpoints=(str(ckpts[0]),), alphas=(1.0,))
    assert result["executor"] == "LocalExecutor" and result["cells_computed_this_run"] == 2
    assert len(list((tmp_path / "submitit").glob("*_result.pkl"))) == 2  # one submitit job per cell
