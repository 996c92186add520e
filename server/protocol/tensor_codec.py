"""Tensor (de)serialisation shared by the HTTP and gRPC front ends.

Raw little-endian buffers (HTTP binary extension, gRPC ``raw_*_contents``), JSON / typed-list contents, and the
BYTES wire form (each element prefixed by its 4-byte little-endian length) all go through here, so both front
ends accept and produce exactly the same tensors and report the same errors.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from server.errors import InvalidInput
from server.protocol.datatypes import WIRE_TO_NUMPY, element_size, numpy_dtype
from server.protocol.limits import LIMITS
from server.protocol.shared_memory import BYTE_SIZE, REGION, SharedMemoryRegistry, TensorPlacement

_LENGTH = struct.Struct("<I")
# numpy's limits: at most 64 dimensions, and an array's byte size (zero-sized dimensions aside) must fit int64.
_MAX_DIMS = 64
_MAX_BYTES = 2**63 - 1
_LARGEST_ELEMENT = 8
# The wire's byte order (little-endian) for each fixed-size datatype, made once rather than per tensor.
_WIRE_ORDER = {name: dtype.newbyteorder("<") for name, dtype in WIRE_TO_NUMPY.items() if name != "BYTES"}
# numpy's byte-order marks that already mean little-endian here: explicit, "not applicable" (one-byte types), and
# native on a little-endian machine.
_WIRE_BYTE_ORDERS = frozenset("<|=" if sys.byteorder == "little" else "<|")


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def check_shape(shape: Any, name: str) -> list[int]:
    """A shape numpy can hold, checked before any data is read so a bad one is a client error, not a crash."""
    if type(shape) is list and len(shape) <= _MAX_DIMS:
        # Every request's path: plain non-negative ints and a size within every limit pass in one loop.
        for d in shape:
            if type(d) is not int or d < 0:
                break
        else:
            count = math.prod(shape)
            if 0 < count <= LIMITS.max_tensor_elements and count * _LARGEST_ELEMENT <= _MAX_BYTES:
                return list(shape)
    return _checked_shape(shape, name)


def _checked_shape(shape: Any, name: str) -> list[int]:
    """``check_shape`` for every other case: the error that names what is wrong, or the shape."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input '{name}': shape must be a list of integers, got {shape!r}")
    shape = [int(d) for d in shape]  # int subclasses (numpy integers) as plain ints
    if len(shape) > _MAX_DIMS:
        raise InvalidInput(f"input '{name}': shape has {len(shape)} dimensions; at most {_MAX_DIMS} are supported")
    if min(shape, default=0) < 0:
        raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count == 0:
        if math.prod(d for d in shape if d) * _LARGEST_ELEMENT > _MAX_BYTES:
            raise InvalidInput(f"input '{name}': shape {list(shape)} is too large for any tensor")
    elif count * _LARGEST_ELEMENT > _MAX_BYTES:
        raise InvalidInput(f"input '{name}': shape {list(shape)} is too large for any tensor")
    LIMITS.check_elements(name, shape, count)
    return shape


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """BYTES tensor -> length-prefixed elements, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray)):
            item = str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def deserialize_bytes_tensor(buffer: bytes | memoryview, shape: Sequence[int], name: str) -> np.ndarray:
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput(f"input '{name}': truncated BYTES element length at offset {offset}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"input '{name}': BYTES element of length {length} runs past the end of the data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    expected = element_count(shape)
    if len(items) != expected:
        raise InvalidInput(f"input '{name}': shape {list(shape)} needs {expected} BYTES elements, got {len(items)}")
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(shape)


def deserialize_raw(datatype: str, shape: Sequence[int], buffer: bytes | memoryview, name: str) -> np.ndarray:
    """A raw buffer as a numpy array, checking that its size matches ``shape``."""
    if datatype == "BYTES":
        return deserialize_bytes_tensor(buffer, shape, name)
    dtype = _WIRE_ORDER.get(datatype)
    if dtype is None:
        dtype = numpy_dtype(datatype, name)  # not a wire datatype: raises the error that says so
    expected = element_count(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidInput(
            f"input '{name}': {datatype} shape {list(shape)} needs {expected} bytes of data, got {len(buffer)}"
        )
    # The array is a view of the buffer (no copy), made in one call rather than frombuffer + reshape.
    return np.ndarray(shape, dtype, buffer)


def serialize_raw(array: np.ndarray) -> bytes:
    dtype = array.dtype
    if dtype == np.object_ or dtype.kind in ("S", "U"):
        return serialize_bytes_tensor(array)
    if dtype.byteorder in _WIRE_BYTE_ORDERS:
        return array.tobytes()  # already little-endian: one C-order copy
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()


def shared_memory_input(
    registry: SharedMemoryRegistry, parameters: dict[str, Any], datatype: str, shape: Sequence[int], name: str
) -> np.ndarray | None:
    """The input read from the shared memory region its parameters name; None when its data is in the request.

    The region holds exactly what a raw buffer would (BYTES length-prefixed), so it decodes as one.
    """
    if REGION not in parameters:
        return None
    placement = registry.placement(parameters, f"input '{name}'")
    if datatype != "BYTES":
        expected = element_count(shape) * element_size(datatype)
        if placement.byte_size != expected:
            raise InvalidInput(
                f"input '{name}': {BYTE_SIZE} is {placement.byte_size} but {datatype} shape {list(shape)} "
                f"needs {expected} bytes"
            )
    return deserialize_raw(datatype, shape, placement.read(), name)


def shared_memory_output(
    registry: SharedMemoryRegistry, parameters: dict[str, Any], name: str
) -> TensorPlacement | None:
    """Where a requested output is to be written, checked before the model runs; None when it is sent back."""
    return registry.placement(parameters, f"output '{name}'")


def write_shared_memory_output(placement: TensorPlacement, array: np.ndarray, name: str) -> dict[str, Any]:
    """Write an output into its region; the parameters returned stand in for its data in the response."""
    raw = serialize_raw(array)
    placement.write(raw, f"output '{name}'")
    return placement.response_parameters(len(raw))


def _flatten(data: Any, name: str) -> tuple[list[Any], set[type]]:
    """Row-major elements of flat or nested ``data`` and their types; nesting must be rectangular, so no element is
    misplaced. The types are collected in one pass at C speed (``map``): per-element checks cost more than the
    conversion, and a list among them is uneven nesting."""
    if not isinstance(data, list):
        return [data], {type(data)}
    level = data
    while level and isinstance(level[0], list):
        if not all(isinstance(item, list) and len(item) == len(level[0]) for item in level):
            raise InvalidInput(f"input '{name}': data is nested unevenly; nested lists must form a rectangular array")
        level = [element for item in level for element in item]
    types = set(map(type, level))
    if list in types:
        raise InvalidInput(f"input '{name}': data is nested unevenly; nested lists must form a rectangular array")
    return level, types


# Up to this many elements, a range check in Python costs less than numpy's (see ``from_list``).
_FEW_ELEMENTS = 256
# The largest finite value of FP16 and FP32, by item size.
_FLOAT_MAX = {2: float(np.finfo(np.float16).max), 4: float(np.finfo(np.float32).max)}

# JSON numbers and gRPC's typed contents arrive as these; ``bool`` is its own type here, so true/false is refused.
_NUMBER_TYPES = frozenset({int, float})


def from_list(datatype: str, shape: Sequence[int], data: Any, name: str) -> np.ndarray:
    """JSON ``data`` (flat or nested) or gRPC typed contents as a numpy array of ``shape``."""
    flat, types = _flatten(data, name)
    expected = element_count(shape)
    if len(flat) != expected:
        raise InvalidInput(f"input '{name}': shape {list(shape)} needs {expected} elements, got {len(flat)}")
    if datatype == "BYTES":
        out = np.empty(len(flat), dtype=np.object_)
        try:
            out[:] = [x if isinstance(x, bytes) else x.encode("utf-8") for x in flat]
        except AttributeError:
            raise InvalidInput(f"input '{name}': BYTES data must be strings") from None
        return out.reshape(shape)
    dtype = numpy_dtype(datatype, name)
    if dtype.kind == "b":
        if not types <= {bool}:
            raise InvalidInput(f"input '{name}': BOOL data must be true/false")
    elif not types <= _NUMBER_TYPES:
        raise InvalidInput(f"input '{name}': {datatype} data must be numbers")
    elif dtype.kind in ("i", "u") and float in types and not all(x.is_integer() for x in flat if type(x) is float):
        raise InvalidInput(f"input '{name}': {datatype} data must be integers")
    try:
        if dtype.kind == "f" and len(flat) <= _FEW_ELEMENTS:
            largest = _FLOAT_MAX.get(dtype.itemsize)
            # A value within the type's range cannot overflow it: a small array needs neither numpy's error state
            # nor the infinity pass below (together 2 µs, more than the conversion). FP64 takes any float.
            if largest is None or not flat or max(map(abs, flat)) <= largest:
                return np.array(flat, dtype=dtype).reshape(shape)
        with np.errstate(over="ignore"):
            array = np.array(flat, dtype=dtype)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidInput(f"input '{name}': data does not fit {datatype}: {exc}") from None
    # JSON has no infinities, so one here is a finite number too large for the type (1e300 as FP32).
    if dtype.kind == "f" and np.isinf(array).any() and np.isfinite(np.array(flat, dtype=np.float64)).all():
        raise InvalidInput(f"input '{name}': data does not fit {datatype}: a value is out of its range")
    return array.reshape(shape)


def to_list(array: np.ndarray) -> list[Any]:
    """A flat list for JSON; BYTES elements become text (callers check ``is_utf8`` first)."""
    flat = array.reshape(-1)
    if array.dtype == np.object_ or array.dtype.kind == "S":
        return [x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x) for x in flat]
    return flat.tolist()


def is_utf8(array: np.ndarray) -> bool:
    try:
        for x in array.reshape(-1):
            if isinstance(x, (bytes, bytearray)):
                x.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
