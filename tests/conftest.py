"""Shared fixtures: tiny random models built offline, and the real SmolLM2 from its PyPI wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import contrans_tl as ct
from contrans_tl.testing import make_tiny_model_dir

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine run much faster on one thread than on two spinning
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": make_tiny_model_dir(root / "llama", "llama", seed=0),
        "llama_b": make_tiny_model_dir(root / "llama_b", "llama", seed=1, d_model=48, n_layers=3),
        "gpt_neox": make_tiny_model_dir(root / "gpt_neox", "gpt_neox", seed=2),
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs):
    return ct.load_model(tiny_dirs["llama"], device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_b(tiny_dirs):
    return ct.load_model(tiny_dirs["llama_b"], device="cpu")


@pytest.fixture(scope="session")
def tiny_neox(tiny_dirs):
    return ct.load_model(tiny_dirs["gpt_neox"], device="cpu")


@pytest.fixture(scope="session", params=["llama", "gpt_neox"])
def tiny_model(request, tiny_llama, tiny_neox):
    return {"llama": tiny_llama, "gpt_neox": tiny_neox}[request.param]


def _require_offline(name: str) -> None:
    entry = ct.OFFLINE_MODELS[name]
    if importlib.util.find_spec(entry.probe_module) is None:
        pytest.skip(f"{name} not installed ({entry.install})")


@pytest.fixture(scope="session")
def smollm():
    _require_offline("smollm2-135m-instruct")
    return ct.load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def gemma():
    _require_offline("gemma-3-270m")
    return ct.load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside this checkout")
    return SHARED


def hooks_attached(model) -> int:
    """Number of forward hooks currently attached anywhere on the model."""
    unique = {id(hp): hp for hp in model.hook_dict.values()}  # aliases share a HookPoint
    return sum(len(hp.fwd_hooks) for hp in unique.values())


PROMPTS = [
    "The river runs past the old mill",
    "A short one",
    "Cooking rice takes about twenty minutes when the water boils steadily",
    "Trains leave every hour",
    "x",
]


@pytest.fixture
def prompts() -> list[str]:
    return list(PROMPTS)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
