"""The llama.cpp side of tests/test_llama_cpp.py, run in a process of its own.

llama.cpp (through llama-cpp-python) runs here, away from the test process, which holds torch with its
own OpenMP runtime and whatever the engines of earlier ``clients`` tests left behind: two OpenMP runtimes
in one process are a known source of crashes, and a crash here fails one request instead of killing
the whole test session. Only numpy and llama_cpp are imported, so torch's runtime never loads here.

Protocol (over a :mod:`multiprocessing` pipe): the worker sends ``(n_embd, n_layer)`` once loaded,
then answers each list of operations with a list of results, or ``("error", text)``:

* ``("cvec", buffer)``: set the control vector from the float32 buffer llama.cpp's
  ``common_control_vector_load`` builds (row ``k - 1`` for ``direction.k``), on layers 1..n_layer,
  as ``llama-cli --control-vector`` does; ``("cvec", None)`` clears it. Result: None.
* ``("logits", ids)``: the next-token logits after each token sequence, ``[len(ids), vocab]`` float32.
"""

from __future__ import annotations

import ctypes
import traceback
from multiprocessing.connection import Connection

import numpy as np


def serve(conn: Connection, model_path: str, n_ctx: int) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model_path, logits_all=True, n_ctx=n_ctx, n_threads=2, n_batch=n_ctx,
                          verbose=False)
    n_embd, n_layer = int(llm.n_embd()), int(llama_cpp.llama_model_n_layer(llm.model))
    conn.send((n_embd, n_layer))

    def set_cvec(buffer: np.ndarray | None) -> None:
        if buffer is None:
            rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)
        else:
            data = np.ascontiguousarray(buffer, dtype=np.float32)
            pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # copied into the context
            rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, data.size, n_embd, 1, n_layer)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapter_cvec returned {rc}")

    def logits(ids: list[list[int]]) -> np.ndarray:
        rows = []
        for row in ids:
            llm.reset()  # drops the KV cache from position 0 on the next eval
            llm.eval(list(row))
            rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        return np.stack(rows)

    try:
        while (ops := conn.recv()) is not None:
            try:
                conn.send([{"cvec": set_cvec, "logits": logits}[op](arg) for op, arg in ops])
            except Exception:  # reported to the test, which fails with it
                conn.send(("error", traceback.format_exc()))
    finally:
        llm.close()
