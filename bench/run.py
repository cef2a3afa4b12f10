"""The benchmark run: items 1–5 on one machine, side by side; a table and ``bench.json``.

Every timed measurement runs its contenders interleaved (A, B, C, A, B, C, …) after one
warm-up call each and reports the median, so drift on a shared machine hits all alike.
The measured side always goes through the library's public functions; the limit and the
baseline are written here. See ``docs/performance.md`` for what each number means.

    python -m bench.run --quick --out /tmp/bench_quick      # same as `contrans bench ...`
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bench import DEFAULT_MODELS, add_arguments
from bench.demo import bench_demo
from bench.memory import measure_in_subprocess, measure_memory
from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import encode, model_device, pad_batch, pad_token_id
from contrans_tl.datasets import neutral_sentences
from contrans_tl.entry import CommandParser, run_reporting_errors, split_debug
from contrans_tl.files import write_json as write_json_file
from contrans_tl.handle import ModelHandle
from contrans_tl.models import identity, load_model
from contrans_tl.pairing import capture_paired
from contrans_tl.refine import refine
from contrans_tl.reformulate import default_layer_pairs, fit_map_from_states
from contrans_tl.tasks.emotion import contrast_prompts, emotion_scenarios
from contrans_tl.transplant import generate, transplant

__all__ = [
    "GOALS",
    "TOP_LEVEL",
    "BenchConfig",
    "bench_prompts",
    "plain_forward",
    "reference_capture",
    "bench_capture",
    "bench_steer",
    "bench_fit",
    "bench_memory",
    "bench_size_matrix",
    "run_bench",
    "format_table",
    "write_json",
    "run_from_args",
    "main",
]

# metric -> (comparison, goal, what it is). The first five are bench.json's required keys.
GOALS: dict[str, tuple[str, float, str]] = {
    "capture_vs_plain": (">=", 0.9, "refine throughput / plain batched HF forward (no hooks)"),
    "capture_vs_reference": (">=", 10.0, "refine throughput / one prompt at a time, all hidden states to CPU"),
    "steer_slowdown": ("<=", 1.10, "steered / unsteered greedy generation time (KV cache on)"),
    "solver_fraction": ("<=", 0.05, "fit_map solver time / forward time of its two captures, on the bench's "
                        "corpus (400 texts; 96 with --quick: the quick figure)"),
    "samples_per_pass": (">=", 10.0, "word-aligned samples per text forwarded"),
    "capture_growth_vs_full_cache": (
        "<=", 0.1, "growth of capture's memory over the forward, relative to run_with_cache's (0 = flat)"
    ),
    "demo_vs_floor": ("<=", 1.5, "contrans demo wall time / plain HF forwards of the distinct rows it ran, once per "
                      "steering setting (with --quick: the quick demo)"),
    "solver_fraction_full": ("<=", 0.05, "the demo's map fit / its corpus capture (400 texts; 120 with --quick)"),
    "demo_peak_rss_vs_weights": ("<=", 1.8, "the demo's peak RSS / float32 weights of both models"),
}
TOP_LEVEL = ("capture_vs_plain", "capture_vs_reference", "steer_slowdown", "solver_fraction", "samples_per_pass")
SIZE_MATRIX_NOTE = (
    "item 6: model loads / N of a minimal size matrix over the bench's models with --keep-loaded "
    "(goal 1: N loads; the default route, reloading each target to score it, needs 2N - 1)"
)


@dataclass
class BenchConfig:
    """What to measure and how long; :meth:`quick` is the short run."""

    models: tuple[Any, Any] = DEFAULT_MODELS
    """Source and target: names for :func:`load_model`, or loaded models."""
    quick: bool = False
    device: str | None = None
    """None: cuda when available, else cpu (ignored for models passed in loaded)."""
    dtype: torch.dtype | None = None
    """None: bfloat16 on cuda, float32 on cpu."""
    repeats: int = 5
    batch_size: int = 16
    n_prompts: int = 64
    """Contrast prompts per side for items 1–2 (at most 70)."""
    gen_prompts: int = 8
    gen_tokens: int = 32
    steer_alpha: float = 0.05
    """Strength in norm units, added at every layer (the most hooks a vector can place)."""
    corpus_size: int = 400
    fit_repeats: int = 3
    seq_lens: tuple[int, ...] = (64, 256, 1024)
    mem_batch: int = 4
    mem_repeats: int = 3
    memory_subprocess: bool = True
    """On the CPU, measure memory of a named model in a fresh process."""
    threads: int | None = None
    """torch CPU threads for the run (None: torch's default), restored afterwards."""
    size_matrix_models: tuple[str, ...] | None = None
    """Models of item 6's size matrix (names or directories); None: ``models`` when they are names."""
    demo: bool = True
    """Item 7: run ``contrans demo`` (``--quick`` when ``quick``) against its forward-pass floor."""
    demo_models: tuple[str, str] | None = None
    """Source and target of item 7 (names or directories); None: ``models`` when they are names."""

    @classmethod
    def quick_run(cls, **overrides: Any) -> "BenchConfig":
        base = cls(quick=True, repeats=3, n_prompts=16, gen_prompts=4, gen_tokens=16, corpus_size=96,
                   fit_repeats=2, seq_lens=(64, 256), mem_repeats=2)
        return replace(base, **overrides)


Log = Callable[[str], None]


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- timing helpers ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    warmup: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved, after one warm-up call each."""
    for fn in (warmup or fns).values():
        fn()
        _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return times


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---- items 1 and 2: capture throughput ---------------------------------------------------------
def bench_prompts(n: int) -> tuple[list[str], list[str]]:
    """The emotion task's refinement prompts: ``n`` happiness scenarios (at most 70, the whole set,
    not only the refinement half) against as many drawn from the other emotions."""
    return contrast_prompts(emotion_scenarios(), "happiness", n=n)


@torch.inference_mode()
def plain_forward(model: ModelHandle, prompts: Sequence[str], batch_size: int) -> None:
    """The limit: the same tokens and batches as capture, through the HF model, no hooks."""
    hf = model.original_model
    device = model_device(model)
    ids, _ = encode(model, prompts)
    ids = sorted(ids, key=len)
    pad = pad_token_id(model)
    for start in range(0, len(ids), batch_size):
        batch = pad_batch(ids[start : start + batch_size], pad_id=pad)
        hf(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), logits_to_keep=1)


@torch.inference_mode()
def reference_capture(model: ModelHandle, prompts: Sequence[str]) -> torch.Tensor:
    """The reference implementation's approach, re-implemented: one prompt at a time,
    ``output_hidden_states=True``, every position of every layer copied to the CPU, then the
    last token taken. Returns ``[prompt, layer, d_model]`` (HF's last hidden state is after
    the final norm, so the last layer differs from resid_post; the cost is the same)."""
    hf = model.original_model
    device = model_device(model)
    ids, _ = encode(model, prompts)
    rows = []
    for row in ids:
        out = hf(input_ids=torch.tensor([row], device=device), output_hidden_states=True)
        hidden = [h.cpu() for h in out.hidden_states]  # every position of every layer
        rows.append(torch.stack([h[0, -1] for h in hidden[1:]]).float())
    return torch.stack(rows)


def _throughput(seconds: list[float], n_prompts: int, n_tokens: int) -> dict[str, Any]:
    med = _median(seconds)
    return {"median_s": med, "prompts_per_s": n_prompts / med, "tokens_per_s": n_tokens / med, "times_s": seconds}


def bench_capture(model: ModelHandle, cfg: BenchConfig, log: Log = _log) -> tuple[dict[str, Any], ConceptVector]:
    """Items 1–2: refine vs the plain forward vs the reference approach, same prompts."""
    positive, negative = bench_prompts(cfg.n_prompts)
    device = model_device(model)
    ids, _ = encode(model, positive + negative)
    n_prompts, n_tokens = len(ids), sum(len(row) for row in ids)
    bs = cfg.batch_size
    kept: dict[str, ConceptVector] = {}

    def run_refine() -> None:
        kept["vector"] = refine(model, positive, negative, batch_size=bs)

    def run_plain() -> None:
        plain_forward(model, positive, bs)
        plain_forward(model, negative, bs)

    def run_reference() -> None:
        reference_capture(model, positive)
        reference_capture(model, negative)

    # warm-up on a slice, and a like-for-like check: the reference's hidden states are capture's
    few = positive[: min(4, len(positive))]
    from contrans_tl.capture import capture

    ref = reference_capture(model, few)[:, :-1]
    ours = capture(model, few)[:, :-1]
    agreement = float((ref - ours).abs().max() / ours.abs().max().clamp_min(1e-12))
    warm = {
        "refine": lambda: refine(model, few, negative[: len(few)], batch_size=bs),
        "plain": lambda: plain_forward(model, few, bs),
        "reference": lambda: reference_capture(model, few[:1]),
    }
    log(f"{identity(model).name}: capture throughput, {n_prompts} prompts x {cfg.repeats} repeats")
    times = timed({"refine": run_refine, "plain": run_plain, "reference": run_reference}, cfg.repeats, device, warm)
    out: dict[str, Any] = {k: _throughput(v, n_prompts, n_tokens) for k, v in times.items()}
    out.update(
        n_prompts=n_prompts,
        n_tokens=n_tokens,
        batch_size=bs,
        reference_rel_diff=agreement,
        capture_vs_plain=out["refine"]["tokens_per_s"] / out["plain"]["tokens_per_s"],
        capture_vs_reference=out["refine"]["tokens_per_s"] / out["reference"]["tokens_per_s"],
    )
    return out, kept["vector"]


# ---- item 3: steered generation ----------------------------------------------------------------
def bench_steer(model: ModelHandle, vector: ConceptVector, cfg: BenchConfig, log: Log = _log) -> dict[str, Any]:
    """Item 3: greedy generation inside transplant (every layer hooked) vs outside it."""
    prompts = bench_prompts(cfg.gen_prompts)[0][: cfg.gen_prompts]
    device = model_device(model)
    n_new = len(prompts) * cfg.gen_tokens

    def plain() -> None:
        generate(model, prompts, max_new_tokens=cfg.gen_tokens, use_kv_cache=True)

    def steered() -> None:
        with transplant(model, vector, alpha=cfg.steer_alpha, unit="norm"):
            generate(model, prompts, max_new_tokens=cfg.gen_tokens, use_kv_cache=True)

    log(f"{identity(model).name}: generation, {len(prompts)} prompts x {cfg.gen_tokens} tokens x {cfg.repeats}")
    times = timed({"unsteered": plain, "steered": steered}, cfg.repeats, device)
    out: dict[str, Any] = {}
    for key, values in times.items():
        med = _median(values)
        out[key] = {"median_s": med, "new_tokens_per_s": n_new / med, "times_s": values}
    out.update(
        n_prompts=len(prompts),
        new_tokens=cfg.gen_tokens,
        steered_layers=len(vector.layers),
        alpha_norm_units=cfg.steer_alpha,
        steer_slowdown=out["steered"]["median_s"] / out["unsteered"]["median_s"],
    )
    return out


# ---- item 4: fit_map ---------------------------------------------------------------------------
def bench_fit(source: ModelHandle, target: ModelHandle, cfg: BenchConfig, log: Log = _log) -> dict[str, Any]:
    """Item 4: the two word-aligned captures (forward side) vs fit_map_from_states (solver)."""
    texts = neutral_sentences()[: cfg.corpus_size]
    pairs = default_layer_pairs(int(source.cfg.n_layers), int(target.cfg.n_layers))
    src_layers = sorted({s for s, _ in pairs})
    tgt_layers = sorted({t for _, t in pairs})
    states: dict[str, Any] = {}
    batch_size = 8  # fit_map's default

    def forward_source() -> None:
        states["x"] = capture_paired(source, texts, layers=src_layers, scheme="words", batch_size=batch_size)

    def forward_target() -> None:
        states["y"] = capture_paired(target, texts, layers=tgt_layers, scheme="words", batch_size=batch_size)

    warm = {
        "source": lambda: capture_paired(source, texts[:4], layers=src_layers, scheme="words"),
        "target": lambda: capture_paired(target, texts[:4], layers=tgt_layers, scheme="words"),
    }
    log(f"fit_map: {len(texts)} texts x {cfg.fit_repeats} repeats of both captures")
    fwd = timed({"source": forward_source, "target": forward_target}, cfg.fit_repeats, model_device(source), warm)
    kept: dict[str, Any] = {}

    def solve() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # underdetermined warning on short corpora
            kept["map"] = fit_map_from_states(states["x"], states["y"], layers=pairs)

    solver = timed({"solver": solve}, max(3, cfg.repeats), torch.device("cpu"))["solver"]
    x = states["x"]
    n_samples = int(x.states.shape[0])
    n_calls = math.ceil(len(texts) / batch_size)
    forward_s = _median(fwd["source"]) + _median(fwd["target"])
    amap = kept["map"]
    r2 = amap.r2_heldout[torch.isfinite(amap.r2_heldout)]
    return {
        "n_texts": len(texts),
        "n_samples": n_samples,
        "n_pairs": len(pairs),
        "source_forward_s": _median(fwd["source"]),
        "target_forward_s": _median(fwd["target"]),
        "forward_s": forward_s,
        "solver_s": _median(solver),
        "times_s": {"source": fwd["source"], "target": fwd["target"], "solver": solver},
        "solver_fraction": _median(solver) / forward_s,
        "samples_per_pass": n_samples / len(texts),
        "samples_per_batched_call": n_samples / n_calls,
        "capture_batch_size": batch_size,
        "r2_heldout_mean": float(r2.mean()) if len(r2) else float("nan"),
    }


# ---- item 5: memory ----------------------------------------------------------------------------
def bench_memory(model: ModelHandle, name: str | None, cfg: BenchConfig, log: Log = _log) -> dict[str, Any]:
    """Item 5, in a fresh process for a named CPU model (see :mod:`bench.memory`)."""
    device = model_device(model)
    log(f"{identity(model).name}: memory at lengths {list(cfg.seq_lens)}, batch {cfg.mem_batch}")
    if device.type == "cpu" and name is not None and cfg.memory_subprocess:
        dtype = str(model.embed.W_E.dtype).removeprefix("torch.")
        out = measure_in_subprocess(name, cfg.seq_lens, batch=cfg.mem_batch, repeats=cfg.mem_repeats,
                                    device="cpu", dtype=dtype, threads=torch.get_num_threads())
        out["process"] = "fresh subprocess"
        return out
    out = measure_memory(model, cfg.seq_lens, batch=cfg.mem_batch, repeats=cfg.mem_repeats)
    out["process"] = "in-process"
    return out


# ---- the run -----------------------------------------------------------------------------------
def _resolve(cfg: BenchConfig) -> tuple[str, torch.dtype]:
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return device, dtype


def _load(spec: Any, device: str, dtype: torch.dtype, log: Log) -> tuple[ModelHandle, str | None, float | None]:
    if not isinstance(spec, (str, os.PathLike)):
        return spec, None, None
    log(f"loading {spec} ({device}, {str(dtype).removeprefix('torch.')})")
    start = time.perf_counter()
    model = load_model(spec, device=device, dtype=dtype)
    return model, str(spec), time.perf_counter() - start


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    cpu_name = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_name)
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "transformer_lens": ver("transformer-lens"),
        "contrans_tl": ver("contrans_tl"),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_size_matrix(cfg: BenchConfig, device: str, dtype: torch.dtype, log: Log) -> dict[str, Any] | None:
    """Item 6: count the model loads of a minimal size matrix, by both routes (None: no names).

    One emotion, a handful of prompts: the point is the load log of
    :func:`analyses.size_matrix.run`, which records every :func:`load_model` call.
    """
    import tempfile

    from contrans_tl.analyses import size_matrix as sm

    names = cfg.size_matrix_models or tuple(str(m) for m in cfg.models if isinstance(m, (str, os.PathLike)))
    if len(names) < 2:
        return None
    out: dict[str, Any] = {"models": [str(m) for m in names], "n_models": len(names)}
    with tempfile.TemporaryDirectory() as tmp:
        for route, keep in (("default", False), ("keep_loaded", True)):
            log(f"size matrix over {len(names)} models ({route})")
            start = time.perf_counter()
            res = sm.run(sm.Config(models=tuple(str(m) for m in names), out=f"{tmp}/{route}", emotions=("happiness",),
                                   n_refine=4, n_eval=1, map_corpus="neutral", n_texts=60, batch_size=cfg.batch_size, device=device,
                                   dtype=str(dtype).removeprefix("torch."), keep_loaded=keep))
            out[route] = {"model_loads": res["model_loads"], "loads": res["loads"],
                          "forward_batches_estimated": res["forward_batches_estimated"],
                          "seconds": time.perf_counter() - start}
    out["loads_per_model"] = out["keep_loaded"]["model_loads"] / len(names)
    return out


def _bench_demo_item(cfg: BenchConfig, loaded: list[tuple[ModelHandle, str | None, float | None]], device: str,
                     log: Log) -> dict[str, Any] | None:
    """Item 7 (None when off, or when the models were passed loaded and no names were given)."""
    if not cfg.demo:
        return None
    names = cfg.demo_models or tuple(name for _, name, _ in loaded if name is not None)
    if len(names) != 2:
        return None
    log(f"item 7: contrans demo{' --quick' if cfg.quick else ''} vs its forward-pass floor")
    return bench_demo(names, quick=cfg.quick, device=device, threads=cfg.threads, batch_size=cfg.batch_size, log=log)


def _goal_met(key: str, value: float | None) -> bool | None:
    if value is None or not math.isfinite(value):
        return None
    op, goal, _ = GOALS[key]
    return value >= goal if op == ">=" else value <= goal


def run_bench(cfg: BenchConfig | None = None, *, log: Log = _log) -> dict[str, Any]:
    """Run items 1–5 and return the bench.json content (top-level ratios are the worst model's)."""
    cfg = cfg or BenchConfig()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run_bench(cfg: BenchConfig, log: Log) -> dict[str, Any]:
    device_name, dtype = _resolve(cfg)
    started = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    loaded = [_load(spec, device_name, dtype, log) for spec in cfg.models]
    (source, *_), (target, *_) = loaded
    device = model_device(source)
    dtype = source.embed.W_E.dtype
    result: dict[str, Any] = {}
    per_model: dict[str, dict[str, Any]] = {}
    for model, name, load_s in loaded:
        key = identity(model).name
        entry: dict[str, Any] = {"load_s": load_s, "n_layers": int(model.cfg.n_layers),
                                 "d_model": int(model.cfg.d_model)}
        entry["capture"], vector = bench_capture(model, cfg, log)
        entry["steer"] = bench_steer(model, vector, cfg, log)
        per_model[key] = entry
    fit = bench_fit(source, target, cfg, log)
    for model, name, _ in loaded:  # last: the CPU measurement retunes the allocator in-process
        per_model[identity(model).name]["memory"] = bench_memory(model, name, cfg, log)

    def worst(section: str, key: str, higher_is_better: bool) -> float:
        values = [m[section][key] for m in per_model.values()]
        return min(values) if higher_is_better else max(values)

    result["capture_vs_plain"] = worst("capture", "capture_vs_plain", True)
    result["capture_vs_reference"] = worst("capture", "capture_vs_reference", True)
    result["steer_slowdown"] = worst("steer", "steer_slowdown", False)
    result["solver_fraction"] = fit["solver_fraction"]
    result["samples_per_pass"] = fit["samples_per_pass"]
    growth = [m["memory"]["capture_growth_vs_full_cache"] for m in per_model.values()]
    finite = [g for g in growth if g is not None and math.isfinite(g)]
    result["capture_growth_vs_full_cache"] = max(finite) if finite else None
    demo = _bench_demo_item(cfg, loaded, device_name, log)
    for key in ("demo_vs_floor", "solver_fraction_full", "demo_peak_rss_vs_weights"):
        result[key] = None if demo is None else demo[key]
    sizes = bench_size_matrix(cfg, device_name, dtype, log)
    result["size_matrix"] = None if sizes is None else sizes["loads_per_model"]
    result["size_matrix_note"] = SIZE_MATRIX_NOTE
    result["goals"] = {
        key: {"value": result[key], "goal": f"{op} {goal:g}", "met": _goal_met(key, result[key]), "what": what}
        for key, (op, goal, what) in GOALS.items()
    }
    result["aggregation"] = "top-level ratios are the worse of the two models; per-model values under 'models'"
    info = machine_info(device, dtype)
    info["loadavg_start"] = load_start
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["machine"] = info
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}  # not asdict: it deep-copies models
    config.update(models=[identity(m).name for m, _, _ in loaded], dtype=info["dtype"], device=info["device"])
    result["config"] = config
    result["models"] = per_model
    result["fit"] = fit
    result["size_matrix_detail"] = sizes
    result["demo"] = demo
    result["wall_s"] = time.perf_counter() - started
    return result


# ---- output ------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """The goals table, then the per-model numbers behind it."""
    lines = [f"{'metric':30} {'value':>10}  {'goal':>8}  met", "-" * 56]
    for key, row in result["goals"].items():
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        lines.append(f"{key:30} {_fmt(row['value']):>10}  {row['goal']:>8}  {met}")
    sizes = result.get("size_matrix_detail")
    if sizes is None:
        lines.append(f"{'size_matrix':30} {'null':>10}  {'<= 1':>8}  -   (no model names: item 6 not run)")
    else:
        met = "yes" if result["size_matrix"] <= 1 else "NO"
        lines.append(f"{'size_matrix (loads / N)':30} {_fmt(result['size_matrix']):>10}  {'<= 1':>8}  {met}  "
                     f"(N = {sizes['n_models']}: {sizes['keep_loaded']['model_loads']} loads with --keep-loaded, "
                     f"{sizes['default']['model_loads']} by the default route)")
    m = result["machine"]
    lines += ["", f"device {m['device']} ({m.get('gpu') or m['cpu']}), {m['dtype']}, {m['cpu_count']} CPUs, "
                  f"torch {m['torch']} ({m['torch_threads']} threads), wall {result['wall_s']:.0f} s, "
                  f"load average {_fmt((m.get('loadavg_start') or [None])[0])} -> "
                  f"{_fmt((m.get('loadavg_end') or [None])[0])}"]
    for name, entry in result["models"].items():
        c, s, mem = entry["capture"], entry["steer"], entry["memory"]
        lines += [
            "",
            f"{name} ({entry['n_layers']} layers x {entry['d_model']})",
            f"  capture  {c['n_prompts']} prompts / {c['n_tokens']} tokens, batch {c['batch_size']}: tokens/s "
            f"refine {_fmt(c['refine']['tokens_per_s'])}, plain HF {_fmt(c['plain']['tokens_per_s'])}, "
            f"reference {_fmt(c['reference']['tokens_per_s'])}  -> x{_fmt(c['capture_vs_plain'])} of plain, "
            f"x{_fmt(c['capture_vs_reference'])} of reference",
            f"  generate {s['n_prompts']} x {s['new_tokens']} new tokens: tokens/s unsteered "
            f"{_fmt(s['unsteered']['new_tokens_per_s'])}, steered ({s['steered_layers']} layers) "
            f"{_fmt(s['steered']['new_tokens_per_s'])}  -> slowdown x{_fmt(s['steer_slowdown'])}",
            f"  memory ({mem['method']}, {mem['process']}), MiB over baseline:",
            f"    {'seq_len':>7} {'forward':>8} {'capture':>8} {'full_cache':>10} {'capture kept':>12} "
            f"{'full kept':>9}",
        ]
        for r in mem["rows"]:
            lines.append(
                f"    {r['seq_len']:>7} {_fmt(r['forward_peak_mib']):>8} {_fmt(r['capture_peak_mib']):>8} "
                f"{_fmt(r['full_cache_peak_mib']):>10} {_fmt(r['capture_cache_mib']):>12} "
                f"{_fmt(r['full_cache_cache_mib']):>9}"
            )
    f = result["fit"]
    lines += [
        "",
        f"fit_map  {f['n_texts']} texts -> {f['n_samples']} word-aligned samples, {f['n_pairs']} layer pairs: "
        f"forward {_fmt(f['forward_s'])} s (source {_fmt(f['source_forward_s'])} + target "
        f"{_fmt(f['target_forward_s'])}), solver {_fmt(f['solver_s'])} s, held-out R2 {_fmt(f['r2_heldout_mean'])}",
    ]
    d = result.get("demo")
    if d is not None:
        floor = d["floor"]["models"]
        lines += [
            "",
            f"demo     {d['command']}: wall {d['demo_wall_s']:.0f} s (model loads {d['demo_load_s']:.0f} s), "
            f"floor {d['floor_s']:.0f} s -> x{_fmt(d['demo_vs_floor'])}; peak RSS "
            f"{d['demo_peak_rss_bytes'] / 2**30:.2f} GiB / fp32 weights {d['fp32_weight_bytes'] / 2**30:.2f} GiB",
        ]
        lines += [f"  floor {name}: {m['tokens']:,} tokens ({m['rows']} distinct rows, {m['prefixes']} prefixes) in "
                  f"{m['seconds']:.0f} s; the demo ran {m['demo_tokens']:,} tokens" for name, m in floor.items()]
        lines.append(f"  map: corpus capture {_fmt(d['map_corpus_s'])} s, fit {_fmt(d['map_fit_s'])} s "
                     f"({d['solver_corpus_texts']} texts)")
    return "\n".join(lines)


def write_json(result: dict[str, Any], out_dir: str | Path) -> Path:
    """``out_dir/bench.json``: the result as strict JSON (NaN and inf as null)."""
    return write_json_file(Path(out_dir) / "bench.json", result)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick_run() if args.quick else BenchConfig()
    overrides: dict[str, Any] = {"models": tuple(args.models), "device": args.device}
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.seq_lens:
        overrides["seq_lens"] = tuple(args.seq_lens)
    if args.in_process_memory:
        overrides["memory_subprocess"] = False
    if args.threads:
        overrides["threads"] = args.threads
    if args.no_demo:
        overrides["demo"] = False
    return replace(cfg, **overrides)


def run_from_args(args: argparse.Namespace) -> int:
    result = run_bench(config_from_args(args))
    print(format_table(result))
    if args.out:
        print(f"\nwrote {write_json(result, args.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``contrans bench`` / ``python -m bench.run``: the same one-line errors and exit codes as ``contrans``."""
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    parser = CommandParser(prog="contrans bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag already reported in one line
        return int(stop.code or 0)
    return run_reporting_errors(lambda: run_from_args(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
