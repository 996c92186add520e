"""The ONNX Runtime sessions every floor server runs: ``FLOOR_MODELS`` (``name=path.onnx,...``) with
``FLOOR_THREADS`` intra-op threads each, as ``bench_triton.py`` sets them."""

from __future__ import annotations

import os

import onnxruntime as ort


def floor_sessions() -> dict[str, ort.InferenceSession]:
    sessions = {}
    for item in os.environ.get("FLOOR_MODELS", "").split(","):
        if item:
            name, path = item.split("=", 1)
            options = ort.SessionOptions()
            options.intra_op_num_threads = int(os.environ.get("FLOOR_THREADS", "1"))
            sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return sessions
