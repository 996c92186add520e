"""Mapping between config types (``TYPE_FP32``), wire datatypes (``FP32``) and numpy dtypes."""

from __future__ import annotations

import numpy as np

from server.errors import InvalidInput

# Wire datatype -> numpy dtype. BYTES tensors are numpy object arrays holding ``bytes``.
WIRE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

WIRE_DATATYPES = frozenset(WIRE_TO_NUMPY)

# Triton's config names prefix the wire name with TYPE_, except BYTES which is TYPE_STRING.
CONFIG_TO_WIRE: dict[str, str] = {f"TYPE_{name}": name for name in WIRE_TO_NUMPY if name != "BYTES"}
CONFIG_TO_WIRE["TYPE_STRING"] = "BYTES"
WIRE_TO_CONFIG: dict[str, str] = {wire: cfg for cfg, wire in CONFIG_TO_WIRE.items()}
CONFIG_DATATYPES = frozenset(CONFIG_TO_WIRE)

_ELEMENT_SIZE: dict[str, int] = {name: dt.itemsize for name, dt in WIRE_TO_NUMPY.items() if name != "BYTES"}


def element_size(wire_datatype: str) -> int:
    """Bytes per element of a fixed-size datatype (BYTES has none)."""
    return _ELEMENT_SIZE[wire_datatype]


def numpy_dtype(wire_datatype: str, tensor_name: str = "") -> np.dtype:
    try:
        return WIRE_TO_NUMPY[wire_datatype]
    except KeyError:
        where = f" of tensor '{tensor_name}'" if tensor_name else ""
        raise InvalidInput(
            f"unsupported datatype '{wire_datatype}'{where}; expected one of {sorted(WIRE_DATATYPES)}"
        ) from None


# Native-order dtypes, looked up by hash: every response names each output's datatype.
_WIRE_BY_DTYPE: dict[np.dtype, str] = {dtype: name for name, dtype in WIRE_TO_NUMPY.items()}


def wire_datatype(array: np.ndarray) -> str:
    """The wire datatype of a numpy array produced by a backend."""
    dtype = array.dtype
    known = _WIRE_BY_DTYPE.get(dtype)
    if known is not None:
        return known
    if dtype == np.object_ or dtype.kind in ("S", "U"):
        return "BYTES"
    for name, candidate in WIRE_TO_NUMPY.items():
        if candidate == dtype:
            return name
    raise TypeError(f"numpy dtype {dtype} has no KServe v2 datatype")
