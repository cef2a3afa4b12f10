"""The hub path without a hub: Pythia steps and Amber revisions from a local cache in the hub's own layout.

A Hugging Face cache (``$HF_HOME/hub/models--ORG--NAME/{blobs,snapshots/<commit>,refs/<revision>}``)
holds a tiny random checkpoint per revision, each from its own seed, under the real repo ids
``EleutherAI/pythia-14m`` (``main``, ``step1000``, ``step4``) and ``LLM360/Amber`` (``main``,
``ckpt_000``, ``ckpt_100``). With the hub offline, the unchanged code path — ``load_model`` →
TransformerLens ``boot_transformers`` → transformers → ``huggingface_hub`` resolving
``refs/<revision>`` to a snapshot — must load the weights stored under the requested revision,
and the checkpoint sweep and the size matrix must run on the hub ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file

import contrans_tl as ct
from contrans_tl import models
from contrans_tl.analyses import checkpoint_sweep as cs
from contrans_tl.analyses._common import slug
from contrans_tl.analyses import size_matrix as sm
from contrans_tl.errors import InvalidArgumentError, ModelUnavailableError
from contrans_tl.testing import make_tiny_model_dir

pytestmark = pytest.mark.clients

PYTHIA, AMBER = "EleutherAI/pythia-14m", "LLM360/Amber"
REPOS: dict[str, tuple[str, dict[str, int]]] = {
    PYTHIA: ("gpt_neox", {"main": 10, "step1000": 11, "step4": 12}),
    AMBER: ("llama", {"main": 20, "ckpt_000": 21, "ckpt_100": 22}),
}
"""repo id -> (tiny architecture, {revision: seed}); one seed per revision so each is recognisable."""

TINY = dict(emotions=("happiness",), n_refine=2, n_eval=1, batch_size=8, device="cpu")
"""Smallest analysis settings (one emotion, two refinement prompts per side, one scenario per other emotion)."""


def _commit(repo: str, revision: str) -> str:
    """A made-up 40-hex commit hash, one per (repo, revision), as the hub's snapshot folder name."""
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


def _publish(hub: Path, repo: str, revision: str, checkpoint: Path) -> None:
    """Store ``checkpoint``'s files as the hub cache does: content-named blobs, a snapshot of
    symlinks to them named by commit, and ``refs/<revision>`` holding the commit (no newline:
    huggingface_hub reads the file as it is)."""
    store = hub / f"models--{repo.replace('/', '--')}"
    snapshot = store / "snapshots" / _commit(repo, revision)
    snapshot.mkdir(parents=True)
    (store / "blobs").mkdir(exist_ok=True)
    for file in checkpoint.iterdir():
        data = file.read_bytes()
        blob = store / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (store / "refs").mkdir(exist_ok=True)
    (store / "refs" / revision).write_text(_commit(repo, revision))


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``HF_HOME`` of a cache holding every revision of :data:`REPOS` (built checkpoints kept aside)."""
    root = tmp_path_factory.mktemp("hf_home")
    for repo, (arch, revisions) in REPOS.items():
        for revision, seed in revisions.items():
            # n_ctx 1024: the emotion task's few-shot block is longer than the default 128
            built = make_tiny_model_dir(root / "built" / repo / revision, arch, seed=seed, n_ctx=1024)
            _publish(root / "hub", repo, revision, built)
    return root


@pytest.fixture(scope="module")
def stored(hub_home: Path) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """The weights under each (repo, revision), read from the built checkpoints, not the cache."""
    return {(repo, rev): load_file(hub_home / "built" / repo / rev / "model.safetensors")
            for repo, (_, revisions) in REPOS.items() for rev in revisions}


@pytest.fixture
def offline_hub(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, Any]]:
    """The hub offline and pointed at :func:`hub_home`; returns the log of every model load_model registers.

    huggingface_hub reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is imported
    (already done by the time a test runs), so its constants are patched as well as the
    environment. The log entries are (name, revision, model) as ``load_model`` registers them.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(hub_home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    loads: list[tuple[str, str | None, Any]] = []
    register = models._register

    def logged(model: Any, name: str, revision: str | None) -> None:
        loads.append((name, revision, model))
        register(model, name, revision)

    monkeypatch.setattr(models, "_register", logged)
    return loads


def _revisions_matching(model: Any, repo: str, stored: dict[tuple[str, str], dict[str, torch.Tensor]]) -> list[str]:
    """The revisions of ``repo`` whose stored weights equal the model's HF weights, every shared tensor.

    Shared: the bridge wraps modules (``._original_component`` in the keys) and transformers 5
    renames a few on load (GPT-NeoX's ``embed_out`` is ``lm_head``); all the others must match.
    """
    own = {k.replace("._original_component", ""): v for k, v in model.original_model.state_dict().items()}
    matching = []
    for rev in REPOS[repo][1]:
        saved = stored[repo, rev]
        shared = saved.keys() & own.keys()
        assert len(shared) >= len(saved) - 1, sorted(saved.keys() - own.keys())
        if all(torch.equal(own[k].cpu(), saved[k]) for k in shared):
            matching.append(rev)
    return matching


def test_cache_resolves_revisions_through_refs(offline_hub, hub_home):
    """The layout is the hub's: a revision name resolves through refs/ to its commit's snapshot."""
    assert huggingface_hub.constants.is_offline_mode()
    path = huggingface_hub.try_to_load_from_cache(AMBER, "config.json", revision="ckpt_100")
    assert isinstance(path, str) and f"/snapshots/{_commit(AMBER, 'ckpt_100')}/" in path
    assert huggingface_hub.try_to_load_from_cache(AMBER, "config.json", revision="ckpt_200") is None


@pytest.mark.parametrize(("kwargs", "revision"), [
    ({"checkpoint": 1000}, "step1000"),
    ({"checkpoint_index": 3}, "step4"),  # TransformerLens's Pythia schedule: 0, 1, 2, 4, 8, ...
    ({}, None),
])
def test_pythia_checkpoint_loads_that_revision(offline_hub, stored, kwargs, revision):
    model = ct.load_model(PYTHIA, device="cpu", **kwargs)
    assert _revisions_matching(model, PYTHIA, stored) == [revision or "main"]
    assert ct.identity(model).name == PYTHIA and ct.identity(model).revision == revision
    if kwargs:
        assert model.cfg.checkpoint_value == int(revision.removeprefix("step"))


def test_checkpoint_index_and_step_are_one_identity(offline_hub):
    """checkpoint_index=3, checkpoint=4 and revision="step4" name one model, so artifacts accept each."""
    by_index = ct.identity(ct.load_model(PYTHIA, checkpoint_index=3, device="cpu"))
    assert by_index == ct.identity(ct.load_model(PYTHIA, revision="step4", device="cpu"))


def test_amber_revision_loads_that_revision(offline_hub, stored):
    model = ct.load_model(AMBER, revision="ckpt_100", device="cpu")
    assert _revisions_matching(model, AMBER, stored) == ["ckpt_100"]
    assert ct.identity(model) == models.ModelIdentity(AMBER, "ckpt_100", 2, 64)
    assert [(name, rev) for name, rev, _ in offline_hub] == [(AMBER, "ckpt_100")]


def test_missing_revision_fails_offline_naming_it(offline_hub):
    """A step the cache lacks fails at once (offline, no retries), naming the revision it looked for."""
    with pytest.raises(ModelUnavailableError, match="revision 'step2000'"):
        ct.load_model(PYTHIA, checkpoint=2000, device="cpu")


@pytest.mark.parametrize(("name", "kwargs", "argument"), [
    (PYTHIA, {"checkpoint": 1500}, "checkpoint="),  # not in Pythia's schedule
    (PYTHIA, {"checkpoint_index": 10_000}, "checkpoint_index="),
    (AMBER, {"checkpoint": 100}, "checkpoint="),  # Amber's checkpoints are revisions, not steps
])
def test_unknown_checkpoint_is_an_argument_error(offline_hub, name, kwargs, argument):
    with pytest.raises(InvalidArgumentError, match=argument):
        ct.load_model(name, device="cpu", **kwargs)


@pytest.mark.parametrize(("repo", "checkpoints"), [(AMBER, ("ckpt_000", "ckpt_100")), (PYTHIA, ("step4", "step1000"))])
def test_checkpoint_sweep_on_hub_revisions(offline_hub, stored, tmp_path, repo, checkpoints):
    """The final model from main, each checkpoint from its own revision, in sweep order."""
    cfg = cs.Config(model=repo, checkpoints=checkpoints, out=str(tmp_path), alphas=(1.0,), executor="serial",
                    mapping="identity", **TINY)
    result = cs.run(cfg)
    assert [(name, rev) for name, rev, _ in offline_hub] == [(repo, None), *((repo, c) for c in checkpoints)]
    for (_, _, model), expected in zip(offline_hub, ("main", *checkpoints)):
        assert _revisions_matching(model, repo, stored) == [expected]
    assert [row["checkpoint"] for row in result["rows"]] == list(checkpoints)
    tokens = [row["tokens"] for row in result["rows"]]
    assert tokens == [cs.training_tokens(c) for c in checkpoints] and None not in tokens
    assert all(set(row["cells"]) == {"0", "1"} for row in result["rows"])


def test_size_matrix_on_hub_ids(offline_hub, stored, tmp_path):
    """Both models by hub id, from main: 2N - 1 loads, each model's identity is its hub id."""
    cfg = sm.Config(models=(PYTHIA, AMBER), out=str(tmp_path), map_corpus="neutral", n_texts=30, alphas=(2.0,), **TINY)
    result = sm.run(cfg)
    assert result["models"] == [PYTHIA, AMBER]
    assert [(name, rev) for name, rev, _ in offline_hub] == [(PYTHIA, None), (AMBER, None), (PYTHIA, None)]
    for name, _, model in offline_hub:
        assert _revisions_matching(model, name, stored) == ["main"]
    for name in (PYTHIA, AMBER):
        info = json.loads((tmp_path / "models" / slug(name) / "info.json").read_text())
        assert info["identity"]["name"] == name and info["identity"]["revision"] is None
    assert len(result["matrices"]["2"]["transplanted"]) == 2
