from __future__ import annotations

import dataclasses

import pytest
import torch

import contrans_tl as ct
from contrans_tl.models import ModelIdentity

IDENT = ModelIdentity("m", "r1", 3, 4)


def make(values=None, ident=IDENT) -> ct.ConceptVector:
    v = torch.arange(12.0).reshape(3, 4) if values is None else values
    return ct.ConceptVector(v, ident, (0, 1, 2), "mean_diff", layer_norms=torch.ones(3), n_prompts=5)


def test_save_load_round_trip_is_exact(tmp_path):
    v = make(torch.randn(3, 4))
    loaded = ct.ConceptVector.load(v.save(tmp_path / "v.safetensors"))
    assert torch.equal(loaded.vectors, v.vectors) and torch.equal(loaded.layer_norms, v.layer_norms)
    assert dataclasses.replace(loaded, vectors=v.vectors, layer_norms=v.layer_norms) == dataclasses.replace(
        v, vectors=v.vectors, layer_norms=v.layer_norms
    )


def test_truncated_file_is_named(tmp_path):
    path = make().save(tmp_path / "v.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ct.ArtifactError, match="not a readable"):
        ct.ConceptVector.load(path)


def test_wrong_kind_is_named(tmp_path):
    path = make().save(tmp_path / "v.safetensors")
    with pytest.raises(ct.ArtifactError, match="expected a 'affine_map'"):
        ct.AffineMap.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ct.ArtifactError, match="no such"):
        ct.ConceptVector.load(tmp_path / "nope.safetensors")


def test_algebra():
    a, b = make(), make(torch.ones(3, 4))
    assert torch.equal((0.5 * a + b).vectors, a.vectors * 0.5 + 1)
    assert torch.equal((a - a).vectors, torch.zeros(3, 4))
    assert torch.equal((-a).vectors, -a.vectors) and torch.equal((a / 2).vectors, a.vectors / 2)
    other = make(ident=ModelIdentity("other", None, 3, 4))
    with pytest.raises(ct.ModelMismatchError, match="cannot combine"):
        a + other


def test_shape_and_nan_checked():
    with pytest.raises(ct.WidthMismatchError, match="do not fit"):
        make(torch.zeros(3, 5))
    with pytest.raises(ct.NonFiniteError):
        make(torch.full((3, 4), float("nan")))


def test_restrict_zeroes_other_layers():
    r = make().restrict([1])
    assert r.layers == (1,) and r.vectors[0].abs().sum() == 0 and r.vectors[2].abs().sum() == 0
    assert torch.equal(r.vectors[1], make().vectors[1])
