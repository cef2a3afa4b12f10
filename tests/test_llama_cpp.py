"""llama.cpp steers with an exported control vector as :func:`contrans_tl.transplant` does.

A "fear" vector refined in the model itself is exported with :func:`contrans_tl.export.export_gguf`
and applied in llama.cpp (through llama-cpp-python) to the very GGUF file the project's model was
converted from. On a few held-out emotion prompts, the change of the next-token log-probs that the
vector causes (steered − unsteered, on the top tokens of the unsteered distribution) must match
the change ``transplant`` causes at the same alpha: Pearson r >= 0.9; the same sign of change on
the six emotion label tokens, and among them (what Logit Acc reads); and a better match at the
exported layer than one block earlier or later, so a file whose layer numbering is off by one
fails. Both built-in models, one layer and several. docs/clients.md has the measured figures.

llama-cpp-python binds ``llama_set_adapter_cvec`` but not llama.cpp's file loader
(``common_control_vector_load`` in common/common.cpp, behind llama-cli's ``--control-vector``);
:func:`control_vector_buffer` is a line-for-line port of it (checked byte for byte against the
C++ function compiled on its own), so the layer numbering under test is llama.cpp's: tensor
``direction.k`` (k >= 1) fills row ``k - 1`` of the buffer, and ``llama_adapter_cvec`` adds row
``i - 1`` to the output of block ``i`` (``build_cvec`` after the block's last residual add).
llama.cpp runs in a worker process (tests/_llama_worker.py), away from torch's OpenMP runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import multiprocessing
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import encode, next_token_logits
from contrans_tl.export import export_gguf
from contrans_tl.handle import ModelHandle
from contrans_tl.tasks.emotion import QUERY, emotion_task, label_tokens

from tests import _llama_worker

if importlib.util.find_spec("llama_cpp") is None:  # found, not imported: llama.cpp loads in the worker only
    raise ImportError("llama_cpp is missing: pip install 'contrans_tl[llama]' (CI builds it in .ci/install.sh)")

pytestmark = pytest.mark.clients

TOP_K = 20
"""Tokens compared per prompt: the most likely ones under the unsteered model."""

LABEL_MARGIN = 0.25
"""Nats: a label-token change the project's model makes beyond this must have the same sign in llama.cpp
(below it the engines' float noise, up to ~0.5 nats on a tail token unsteered, may flip it)."""

N_CTX = 128
"""Context of the llama.cpp session: the prompts are about 30 tokens."""

SETTINGS = {
    # model: (fixture, {setting: (layers, alpha in norm units)}); strengths where the greedy
    # continuation stays fluent while the label tokens move by a few nats (see docs/clients.md)
    "smollm2-135m-instruct": ("smollm", {"one layer": ([15], 0.15), "several layers": ([12, 15, 18], 0.06)}),
    "gemma-3-270m": ("gemma", {"one layer": ([9], 0.06), "several layers": ([6, 9, 12], 0.03)}),
}


# ---- llama.cpp -----------------------------------------------------------------------------------
def control_vector_buffer(path: Path, n_embd: int) -> np.ndarray:
    """The buffer llama.cpp's ``common_control_vector_load`` builds from one file at strength 1.

    Each tensor must be named ``direction.k`` with ``k >= 1`` (llama.cpp rejects k = 0), be
    1-D float32 of ``n_embd``; it is added into row ``k - 1`` of a buffer that grows to the
    highest ``k`` ("layer 1 at [0]"; rows of absent layers stay zero).
    """
    data = np.zeros(0, dtype=np.float32)
    for tensor in gguf.GGUFReader(str(path)).tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) == 0:
            raise ValueError(f"{path}: llama.cpp rejects tensor {tensor.name!r}")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1 or tensor.n_elements != n_embd:
            raise ValueError(f"{path}: llama.cpp rejects {tensor.name!r} (not 1-D float32 of {n_embd})")
        k = int(index)
        if data.size < n_embd * k:
            data = np.concatenate([data, np.zeros(n_embd * k - data.size, dtype=np.float32)])
        data[n_embd * (k - 1) : n_embd * k] += np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    return data


class LlamaCpp:
    """One llama.cpp context on a GGUF model, in a process of its own (tests/_llama_worker.py says why).

    Each request is a self-contained list of operations on the one context (set or clear a control
    vector, read next-token log-probs), so a worker that crashes is restarted once and the same request
    sent again, with a warning: the answer still comes from one context that went through every step.
    A second crash fails the test with the worker's exit signal.
    """

    def __init__(self, model_path: Path):
        self.model_path = model_path
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_llama_worker.serve, args=(child, str(self.model_path), N_CTX), daemon=True)
        self.proc.start()
        child.close()
        self.n_embd, self.n_layer = self.conn.recv()

    def run(self, *ops: tuple[str, Path | Sequence[Sequence[int]] | None]) -> list[torch.Tensor]:
        """Carry out ``("cvec", file or None)`` (set the file's control vector as ``llama-cli --control-vector``
        does, layers 1..n_layer, or clear it) and ``("logprobs", ids)`` in order; the log-probs, one
        ``[prompt, vocab]`` tensor per ``"logprobs"``."""
        request = [("cvec", None if arg is None else control_vector_buffer(arg, self.n_embd)) if op == "cvec"
                   else ("logits", [list(map(int, row)) for row in arg]) for op, arg in ops]
        for attempt in (1, 2):
            try:
                self.conn.send(request)
                answer = self.conn.recv()
                break
            except (EOFError, ConnectionError, BrokenPipeError):
                self.proc.join(10)
                died = f"the llama.cpp worker died (exit code {self.proc.exitcode})"
                if attempt == 2:
                    raise AssertionError(f"{died} twice on the same request") from None
                warnings.warn(f"{died}; restarted, the request sent again")
                self._start()
        if isinstance(answer, tuple):
            raise AssertionError(f"llama.cpp worker: {answer[1]}")
        return [torch.from_numpy(out).double().log_softmax(-1) for out in answer if out is not None]

    def next_logprobs(self, ids: Sequence[Sequence[int]], control_vector: Path | None = None) -> torch.Tensor:
        """Log-softmax of the next-token logits after each token sequence ([prompt, vocab]), with the
        control-vector file applied (then cleared) or none."""
        ops = [("cvec", control_vector), ("logprobs", ids)] + ([("cvec", None)] if control_vector else [])
        return self.run(*ops)[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


# ---- the project's side --------------------------------------------------------------------------
def shifted(vector: ct.ConceptVector, shift: int) -> ct.ConceptVector:
    """The same vector one or more blocks later (shift > 0) or earlier: layer l's direction and
    norm move to layer l + shift, so transplant adds the same offset a block off."""
    rolled = torch.zeros_like(vector.vectors)
    norms = torch.zeros_like(vector.layer_norms)
    n = vector.model.n_layers
    for layer in range(n):
        if 0 <= layer + shift < n:
            rolled[layer + shift] = vector.vectors[layer]
            norms[layer + shift] = vector.layer_norms[layer]
    layers = tuple(layer + shift for layer in vector.layers if 0 <= layer + shift < n)
    return dataclasses.replace(vector, vectors=rolled, layer_norms=norms, layers=layers)


def project_logprobs(
    model: ModelHandle, texts: list[str], vector: ct.ConceptVector | None = None, *,
    layers: Sequence[int] = (), alpha: float = 0.0,
) -> torch.Tensor:
    """Next-token log-probs of the project's model, inside transplant when a vector is given."""
    if vector is None:
        return next_token_logits(model, texts).double().log_softmax(-1)
    with ct.transplant(model, vector, alpha=alpha, layers=list(layers), unit="norm"):
        return next_token_logits(model, texts).double().log_softmax(-1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def among_labels(base: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Change of the log-probs renormalised over the six label tokens (what Logit Acc reads): the
    vector lowers every label word, but among the labels it moves them both ways."""
    return (base + delta)[:, labels].log_softmax(-1) - base[:, labels].log_softmax(-1)


def same_signs(llama: torch.Tensor, project: torch.Tensor) -> bool:
    """llama.cpp's changes have the project's sign wherever the project's exceed LABEL_MARGIN."""
    moved = project.abs() > LABEL_MARGIN
    return torch.equal(torch.sign(llama[moved]), torch.sign(project[moved]))


# ---- fixtures ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    name: str
    model: ModelHandle
    engine: LlamaCpp
    vector: ct.ConceptVector
    texts: list[str]
    ids: list[list[int]]
    top: torch.Tensor
    """[prompt, TOP_K] token ids: the most likely next tokens of the unsteered project model."""
    labels: torch.Tensor
    base_project: torch.Tensor
    base_llama: torch.Tensor


@pytest.fixture(scope="module", params=list(SETTINGS))
def case(request, tmp_path_factory):
    name = request.param
    model = request.getfixturevalue(SETTINGS[name][0])
    task = emotion_task(("fear",), n_refine=6, n_eval=1)
    vector = ct.refine(model, *task.contrast("fear"))
    texts = [QUERY.format(s) for s in task.negatives("fear")]  # held out: one scenario per other emotion
    ids, _ = encode(model, texts)  # the same token ids go to both engines
    gguf_file = ct.OFFLINE_MODELS[name].locate(tmp_path_factory.mktemp("gguf"))
    engine = LlamaCpp(gguf_file)
    base_project = project_logprobs(model, texts)
    yield Case(name, model, engine, vector, texts, ids, base_project.topk(TOP_K, -1).indices,
               label_tokens(model.tokenizer), base_project, engine.next_logprobs(ids))
    engine.close()


def report(case: Case, what: str, **figures: float) -> None:
    """One line of measured figures per check (shown with ``pytest -s``; quoted in docs/clients.md)."""
    shown = ", ".join(f"{k}={v:.4f}" for k, v in figures.items())
    print(f"\n[llama.cpp] {case.name} {what}: {shown}", file=sys.stderr)


# ---- tests ---------------------------------------------------------------------------------------
def test_unsteered_engines_agree(case):
    """Same weights, same token ids: the two engines' next-token log-probs agree before steering
    (llama.cpp multiplies by the quantized weights, the project by their float32 dequantization)."""
    a, b = case.base_llama.gather(-1, case.top), case.base_project.gather(-1, case.top)
    r, gap = pearson(a, b), float((a - b).abs().max())
    report(case, "unsteered", pearson=r, max_abs_diff_nats=gap)
    assert r >= 0.98


@pytest.mark.parametrize("setting", ["one layer", "several layers"])
def test_control_vector_matches_transplant(case, setting, tmp_path):
    layers, alpha = SETTINGS[case.name][1][setting]
    path = export_gguf(case.vector, tmp_path / "fear.gguf", alpha=alpha, unit="norm", layers=layers,
                       model=case.model)
    llama_delta = case.engine.next_logprobs(case.ids, control_vector=path) - case.base_llama
    project_delta = {
        shift: project_logprobs(case.model, case.texts, shifted(case.vector, shift),
                                layers=[layer + shift for layer in layers], alpha=alpha) - case.base_project
        for shift in (-1, 0, 1)
    }
    r = {shift: pearson(llama_delta.gather(-1, case.top), d.gather(-1, case.top)) for shift, d in project_delta.items()}
    gap = float((llama_delta.gather(-1, case.top) - project_delta[0].gather(-1, case.top)).abs().max())
    on_labels = llama_delta[:, case.labels], project_delta[0][:, case.labels]
    among = (among_labels(case.base_llama, llama_delta, case.labels),
             among_labels(case.base_project, project_delta[0], case.labels))
    report(case, f"{setting} {layers} alpha={alpha}", pearson=r[0], pearson_block_earlier=r[-1],
           pearson_block_later=r[1], max_abs_diff_nats=gap, mean_label_change_project=float(on_labels[1].mean()),
           mean_label_change_llama=float(on_labels[0].mean()), smallest_label_change=float(on_labels[1].abs().min()),
           pearson_among_labels=pearson(*among))
    assert float(project_delta[0].gather(-1, case.top).abs().max()) > 1.0, "the vector should move the top tokens"
    assert r[0] >= 0.9
    assert same_signs(*on_labels), on_labels
    assert same_signs(*among), among
    assert pearson(*among) >= 0.9
    assert r[0] > max(r[-1], r[1]), f"the exported layer should match best, got {r}"


def test_cleared_control_vector_restores_the_model(case, tmp_path):
    """Clearing the vector gives back the unsteered logits bit for bit (no stale graph or cache)."""
    layers, alpha = SETTINGS[case.name][1]["one layer"]
    path = export_gguf(case.vector, tmp_path / "v.gguf", alpha=alpha, unit="norm", layers=layers)
    steered, cleared = case.engine.run(("cvec", path), ("logprobs", case.ids[:1]), ("cvec", None),
                                       ("logprobs", case.ids))  # in one context, one after the other
    assert not torch.equal(steered, case.base_llama[:1])
    assert torch.equal(cleared, case.base_llama)
