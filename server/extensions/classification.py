"""Triton's classification extension: an output asked for with ``classification: k`` comes back as its top k.

Clients (``tritonclient``'s ``InferRequestedOutput(name, class_count=k)``) get a BYTES tensor of
``"<score>:<index>[:<label>]"`` strings, highest score first, shaped ``[batch, k]`` for batching models and ``[k]``
otherwise. Labels come from the output's ``label_filename``, a file in the model's folder with one label per line.
It runs after the backend, on each request's own outputs, so backends and batching know nothing of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.config import CONFIG_FILENAME, ModelConfig
from server.errors import ConfigError, InvalidInput
from server.protocol.types import InferRequest, InferResponse

PARAMETER = "classification"
# Scores must be ordered, so only numeric outputs can be classified.
_CLASSIFIABLE = {"TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16"}
_CLASSIFIABLE |= {"TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64"}


def load_labels(config: ModelConfig, model_dir: Path) -> dict[str, list[str]]:
    """Each output's labels, read once at load time; a missing file is a load error naming the field."""
    labels: dict[str, list[str]] = {}
    for position, tensor in enumerate(config.output):
        if not tensor.label_filename:
            continue
        path = model_dir / tensor.label_filename
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{model_dir / CONFIG_FILENAME}: field 'output[{position}].label_filename': cannot read {path}: {exc}"
            ) from None
        labels[tensor.name] = text.splitlines()
    return labels


def class_count(config: ModelConfig, output_name: str, parameters: dict[str, Any]) -> int:
    """The ``k`` asked for (0 when not asked); a bad value or an unclassifiable output is the client's mistake."""
    value = parameters.get(PARAMETER)
    if value is None or value is False:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"output '{output_name}': '{PARAMETER}' must be a positive integer, got {value!r}")
    tensor = config.output_by_name(output_name)
    if tensor is not None and tensor.data_type not in _CLASSIFIABLE:
        raise InvalidInput(
            f"output '{output_name}': cannot classify a {tensor.wire_datatype} output; it needs numeric scores"
        )
    return value


def top_k(scores: np.ndarray, k: int, batched: bool, labels: list[str]) -> np.ndarray:
    """Each batch item's (or the whole tensor's) elements ranked by score, as Triton formats them."""
    rows = scores.reshape(scores.shape[0] if batched and scores.ndim else 1, -1)
    k = min(k, rows.shape[1])
    # A stable sort on the negated scores: equal scores keep index order, so results are reproducible.
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    integral = np.issubdtype(scores.dtype, np.integer)
    results = np.empty(order.shape, dtype=np.object_)
    for row, indices in enumerate(order):
        for column, index in enumerate(indices):
            value = rows[row, index]
            text = f"{int(value)}" if integral else f"{float(value):f}"
            label = labels[index] if index < len(labels) else ""
            results[row, column] = f"{text}:{index}:{label}".encode() if label else f"{text}:{index}".encode()
    return results if batched else results.reshape(k)


def classify_response(
    config: ModelConfig, request: InferRequest, response: InferResponse, labels: dict[str, list[str]]
) -> None:
    """Replace, in place, every output the request asked to classify by its top-k strings."""
    for requested in request.outputs:
        k = class_count(config, requested.name, requested.parameters)
        if k and requested.name in response.outputs:
            scores = np.asarray(response.outputs[requested.name])
            response.outputs[requested.name] = top_k(scores, k, config.batching, labels.get(requested.name, []))
