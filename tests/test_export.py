from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import encode, next_token_logits
from contrans_tl.cli import main
from contrans_tl.errors import ArtifactError, ContransError
from contrans_tl.export import (
    BASIS,
    export_gguf,
    export_lm_eval,
    hf_layer_module_name,
    read_gguf,
    read_lm_eval,
    steering_vectors,
)
from contrans_tl.transplant import steering_offsets

POS = ["I love this sunny day", "What a wonderful gift"]
NEG = ["The rain ruined everything", "I lost my keys again"]


@pytest.fixture(scope="module")
def vector(tiny_llama_b):
    return ct.refine(tiny_llama_b, POS, NEG)


@pytest.fixture(scope="module")
def hf_model(tiny_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dirs["llama_b"], dtype=torch.float32).eval()


def _hf_logits_with_hooks(hf_model, ids, hooks: dict[str, torch.Tensor]):
    """The add action of lm-eval's SteeredModel, on a plain HF model (no bridge)."""

    def make(vec):
        def hook(module, inputs, output):
            if isinstance(output, tuple):
                return (output[0] + vec, *output[1:])
            return output + vec

        return hook

    handles = [hf_model.base_model.get_submodule(name).register_forward_hook(make(v)) for name, v in hooks.items()]
    try:
        with torch.no_grad():
            return torch.stack([hf_model(torch.tensor([row])).logits[0, -1] for row in ids])
    finally:
        for h in handles:
            h.remove()


def test_hookpoints_are_hf_module_names(tiny_llama_b, tiny_neox):
    assert hf_layer_module_name(tiny_llama_b, 2) == "layers.2"
    assert hf_layer_module_name(tiny_neox, 1) == "layers.1"
    assert hf_layer_module_name(None, 4, template="h.{layer}") == "h.4"


@pytest.mark.parametrize("unit,alpha", [("raw", 2.5), ("norm", 0.3)])
def test_lm_eval_round_trip_and_basis(tmp_path, tiny_llama_b, vector, hf_model, prompts, unit, alpha):
    path = export_lm_eval(vector, tmp_path / "steer.pt", alpha=alpha, unit=unit, layers=[1, 2], model=tiny_llama_b)
    loaded = torch.load(path, weights_only=True)  # exactly how lm-eval reads it
    assert set(loaded) == set(read_lm_eval(path))
    assert set(loaded) == {"layers.1", "layers.2"}
    offsets = steering_offsets([vector], [alpha], layers=[1, 2], unit=unit)
    for layer in (1, 2):
        entry = loaded[f"layers.{layer}"]
        assert entry["action"] == "add" and entry["bias"] is None and entry["head_index"] is None
        assert entry["steering_coefficient"] == pytest.approx(alpha)
        assert entry["steering_vector"].dtype == torch.float32 and entry["steering_vector"].shape == (48,)
        assert torch.allclose(entry["steering_coefficient"] * entry["steering_vector"], offsets[layer], atol=1e-5)
    meta = json.loads((tmp_path / "steer.pt.json").read_text())
    assert meta["basis"] == BASIS and meta["unit"] == unit

    # the file applied the lm-eval way to a plain HF model == transplant on the bridge
    ids, _ = encode(tiny_llama_b, prompts)
    hooks = {k: v["steering_coefficient"] * v["steering_vector"] for k, v in loaded.items()}
    hf_steered = _hf_logits_with_hooks(hf_model, ids, hooks)
    with ct.transplant(tiny_llama_b, vector, alpha=alpha, layers=[1, 2], unit=unit):
        tl_steered = next_token_logits(tiny_llama_b, prompts)
    hf_base = _hf_logits_with_hooks(hf_model, ids, {})
    assert not torch.allclose(hf_steered, hf_base, atol=1e-3)
    assert torch.allclose(hf_steered, tl_steered, atol=1e-4)


def test_gguf_round_trip_and_llama_cpp_layer_convention(tmp_path, tiny_llama_b, vector, hf_model, prompts):
    path = export_gguf(vector, tmp_path / "cv.gguf", alpha=1.7, layers=[1, 2], model=tiny_llama_b)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.1", "direction.2"]
    offsets = steering_offsets([vector], [1.7], layers=[1, 2])
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [48]
        assert np.allclose(np.asarray(t.data), offsets[int(t.name.split(".")[1])].numpy(), atol=1e-6)
    directions, meta = read_gguf(path)
    assert meta["contrans.basis"] == BASIS
    assert json.loads(meta["contrans.provenance"])["alpha"] == 1.7

    # llama.cpp adds direction.k to the output of block k (0-based) = HF layers.k
    ids, _ = encode(tiny_llama_b, prompts)
    hf = _hf_logits_with_hooks(hf_model, ids, {f"layers.{k}": v for k, v in directions.items()})
    with ct.transplant(tiny_llama_b, vector, alpha=1.7, layers=[1, 2]):
        tl = next_token_logits(tiny_llama_b, prompts)
    assert torch.allclose(hf, tl, atol=1e-4)


def test_gguf_layer0_refused_or_dropped(tmp_path, vector):
    with pytest.raises(ContransError, match="block 0"):
        export_gguf(vector, tmp_path / "a.gguf")
    with pytest.warns(UserWarning, match="layer 0"):
        path = export_gguf(vector, tmp_path / "b.gguf", skip_layer0=True)
    directions, _ = read_gguf(path)
    assert sorted(directions) == [1, 2]
    with pytest.raises(ContransError):
        with pytest.warns(UserWarning):
            export_gguf(vector, tmp_path / "c.gguf", layers=[0], skip_layer0=True)


def test_read_errors(tmp_path, vector):
    with pytest.raises(ArtifactError):
        read_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ArtifactError):
        read_gguf(bad)
    with pytest.raises(ContransError):
        steering_vectors(vector, alpha=0.0)


def test_cli_export(tmp_path, vector):
    src = vector.save(tmp_path / "v.safetensors")
    out = tmp_path / "cv.gguf"
    assert main(["export", str(src), "--format", "gguf", "--out", str(out), "--alpha", "2", "--layers", "1,2"]) == 0
    directions, _ = read_gguf(out)
    assert torch.allclose(directions[2], 2 * vector.vectors[2], atol=1e-6)
    out_pt = tmp_path / "steer.pt"
    assert main(["export", str(src), "--format", "lm-eval", "--out", str(out_pt), "--alpha", "0.2",
                 "--unit", "norm"]) == 0
    loaded = read_lm_eval(out_pt)
    assert sorted(loaded) == ["layers.0", "layers.1", "layers.2"]
    assert main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
