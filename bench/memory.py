"""Item 5: peak memory of capture vs ``run_with_cache`` of the whole residual stream.

For each sequence length three things run on the same batch of texts:

* ``forward``  — the model's plain HF forward (``logits_to_keep=1``): the floor;
* ``capture``  — :func:`contrans_tl.capture.capture` (last token of every layer);
* ``full_cache`` — ``run_with_cache`` of ``resid_post`` of every layer at every position,
  then the last token taken (what one does without ``pos_slice``).

Peak memory is measured as the rise over the memory in use just before each call:
``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the resident set size sampled by a
thread every ~1 ms (glibc is told to return every allocation over 64 KiB to the OS on
free, so RSS follows the tensors). Beside the noisy RSS, ``*_cache_bytes`` count exactly the
storage kept alive by the cache of each approach's ``run_with_cache`` call (a slice that is
a view keeps its whole tensor alive).

Run as ``python -m bench.memory --model NAME ...`` it measures in a fresh process and prints
one JSON line; :func:`measure_in_subprocess` does that. ``python -m bench.memory --load A B``
prints what loading models costs in RSS over their float32 weights (:func:`measure_load`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from contrans_tl.handle import ModelHandle

__all__ = ["rss_bytes", "PeakSampler", "text_of_length", "measure_memory", "measure_in_subprocess", "measure_load"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MMAP_THRESHOLD = 64 << 10
MIB = float(1 << 20)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


class PeakSampler:
    """Samples RSS in a thread while the ``with`` block runs; ``peak`` is the highest seen."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, rss_bytes())
        self._stop.set()
        self._thread.join()


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory(libc: Any) -> None:
    """Make RSS follow tensor allocations: big blocks are mmapped, freed heap is trimmed."""
    if libc is None:
        return
    try:
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (also disables its dynamic growth)
        libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def text_of_length(model: ModelHandle, n_tokens: int) -> tuple[str, int]:
    """Neutral text whose encoding (with the library's BOS policy) has at most ``n_tokens`` ids."""
    from contrans_tl.capture import encode
    from contrans_tl.datasets import neutral_sentences

    n_tokens = min(int(n_tokens), int(model.cfg.n_ctx))
    tokenizer = model.tokenizer

    def count(words: list[str]) -> int:  # +1 for a BOS; encode() below gives the exact length
        return len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) + 1

    sentences = neutral_sentences()
    words: list[str] = []
    i = 0
    while count(words) <= n_tokens:  # grow past the length, then trim words back under it
        words.extend(sentences[i % len(sentences)].split())
        i += 1
    lo, hi = 1, len(words)
    while lo < hi:  # the most words that fit
        mid = (lo + hi + 1) // 2
        if count(words[:mid]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    (ids,), _ = encode(model, [text])
    return text, len(ids)


def _storage_bytes(tensors: Sequence[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what they keep alive)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_memory(
    model: ModelHandle, seq_lens: Sequence[int], *, batch: int = 4, repeats: int = 2
) -> dict[str, Any]:
    """Peak memory over the baseline of forward / capture / full_cache at each length."""
    import torch

    from contrans_tl.capture import model_device, resid_hook_name

    cuda = model_device(model).type == "cuda"
    libc = None if cuda else _libc()
    names = [resid_hook_name(layer) for layer in range(int(model.cfg.n_layers))]

    def peak_of(fn: Callable[[], Any]) -> int:
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            _return_freed_memory(libc)
            with PeakSampler() as sampler:
                base = sampler.peak
                out = fn()
            peak = sampler.peak - base
        del out
        return max(int(peak), 0)

    gc.collect()
    gc.freeze()  # what exists now is not the approaches' garbage: later collections skip it
    try:
        rows = [_measure_length(model, n, batch, repeats, names, peak_of) for n in seq_lens]
    finally:
        gc.unfreeze()
    return {"rows": rows, "method": "cuda.max_memory_allocated" if cuda else "rss-sampling"} | summarize(rows)


def _measure_length(
    model: ModelHandle, n_tokens: int, batch: int, repeats: int, names: list[str], peak_of: Callable[[Callable[[], Any]], int]
) -> dict[str, Any]:
    """One row: peaks of the three approaches (median of ``repeats``) and the exact kept bytes."""
    import torch

    from contrans_tl.capture import capture, encode, model_device, pad_batch, pad_token_id

    device = model_device(model)
    hf = model.original_model
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    dtype_bytes = torch.empty((), dtype=model.embed.W_E.dtype).element_size()
    text, actual = text_of_length(model, n_tokens)
    texts = [text] * batch
    ids, _ = encode(model, texts)
    tb = pad_batch(ids, pad_id=pad_token_id(model))
    input_ids, mask = tb.input_ids.to(device), tb.attention_mask.to(device)

    @torch.inference_mode()
    def forward() -> Any:
        return hf(input_ids=input_ids, attention_mask=mask, logits_to_keep=1).logits

    def run_capture() -> Any:
        return capture(model, texts, batch_size=batch)

    @torch.inference_mode()
    def full_cache() -> Any:
        _, cache = model.run_with_cache(
            input_ids, attention_mask=mask, names_filter=names, return_type=None, logits_to_keep=1
        )
        last = torch.stack([cache[n][:, -1] for n in names], dim=1).float().cpu()
        return cache, last  # the cache is what this approach keeps

    @torch.inference_mode()
    def cache_bytes(pos_slice: int | None) -> int:
        _, cache = model.run_with_cache(
            input_ids, attention_mask=mask, names_filter=names, return_type=None,
            logits_to_keep=1, pos_slice=pos_slice,
        )
        return _storage_bytes([cache[n] for n in names])

    fns = {"forward": forward, "capture": run_capture, "full_cache": full_cache}
    for fn in fns.values():  # warm up (one-time allocations are not the approach's)
        fn()
    peaks: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            peaks[key].append(peak_of(fn))
    row: dict[str, Any] = {"seq_len": actual, "batch": batch}
    for key, values in peaks.items():
        row[f"{key}_peak_mib"] = statistics.median(values) / MIB
    row["capture_overhead_mib"] = row["capture_peak_mib"] - row["forward_peak_mib"]
    row["full_cache_overhead_mib"] = row["full_cache_peak_mib"] - row["forward_peak_mib"]
    # exact: storage kept alive by the cache of capture's call (pos_slice=-1) and the full one
    row["capture_cache_mib"] = cache_bytes(-1) / MIB
    row["full_cache_cache_mib"] = cache_bytes(None) / MIB
    row["capture_output_mib"] = batch * n_layers * d_model * 4 / MIB
    row["resid_stream_mib"] = batch * actual * n_layers * d_model * dtype_bytes / MIB
    return row


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Growth of each approach's memory over the forward pass from the shortest to the longest length."""
    first, last = rows[0], rows[-1]
    cap = last["capture_overhead_mib"] - first["capture_overhead_mib"]
    full = last["full_cache_overhead_mib"] - first["full_cache_overhead_mib"]
    cap_kept = last["capture_cache_mib"] - first["capture_cache_mib"]
    full_kept = last["full_cache_cache_mib"] - first["full_cache_cache_mib"]
    return {
        "capture_overhead_growth_mib": cap,
        "full_cache_overhead_growth_mib": full,
        # 0: capture's extra memory stays flat; 1: it grows like caching the whole stream
        "capture_growth_vs_full_cache": cap / full if full > 0 else float("nan"),
        "capture_kept_growth_vs_full_cache": cap_kept / full_kept if full_kept > 0 else float("nan"),
    }


def measure_in_subprocess(
    name: str,
    seq_lens: Sequence[int],
    *,
    batch: int,
    repeats: int,
    device: str,
    dtype: str,
    threads: int | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    """:func:`measure_memory` in a fresh Python process (its own allocator, nothing else loaded)."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)
    cmd = [sys.executable, "-m", "bench.memory", "--model", name, "--device", device, "--dtype", dtype,
           "--batch", str(batch), "--repeats", str(repeats), "--lens", *map(str, seq_lens)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_load(names: Sequence[str], *, device: str = "cpu") -> dict[str, Any]:
    """What loading ``names`` costs in RSS, over the process after its imports, relative to their fp32 weights.

    Each model runs one short forward pass first: its weights are the memory-mapped safetensors
    file, resident only once read, and the demo reads them all. ``load_rss_vs_weights`` is the
    rise over the imports ÷ the weights (1.0 = nothing beside the weights); ``process_rss_vs_weights``
    the whole process ÷ the weights; ``peak_rss_vs_weights`` the process's peak ÷ the weights.
    """
    import resource

    import torch
    import transformer_lens  # noqa: F401 - the imports are not the models' cost
    import transformers  # noqa: F401

    from contrans_tl.capture import next_token_logits
    from contrans_tl.models import load_model

    gc.collect()
    base = rss_bytes()
    models = [load_model(name, device=device) for name in names]
    with torch.inference_mode():
        for model in models:
            next_token_logits(model, ["The river runs past the old mill."])
    gc.collect()
    now = rss_bytes()
    weights = sum(4 * sum(p.numel() for p in m.original_model.parameters()) for m in models)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"models": list(names), "fp32_weight_bytes": weights, "rss_after_imports_bytes": base,
            "rss_bytes": now, "load_rss_vs_weights": (now - base) / weights,
            "process_rss_vs_weights": now / weights, "peak_rss_vs_weights": peak / weights}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="peak memory of capture vs run_with_cache, or (--load) what loading "
                                            "models costs over their weights (one JSON line)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model")
    what.add_argument("--load", nargs="+", metavar="NAME", help="load these models and report RSS over their fp32 weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lens", type=int, nargs="+", help="sequence lengths (with --model)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load:
        print(json.dumps(measure_load(args.load, device=args.device)))
        return 0
    if not args.lens:
        p.error("--lens is required with --model")

    from contrans_tl.models import load_model

    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    result = measure_memory(model, args.lens, batch=args.batch, repeats=args.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
