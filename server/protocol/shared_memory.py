"""Triton's system shared memory extension: clients hand tensors over in POSIX shared memory instead of the wire.

A client creates a shared memory object (``shm_open`` key, e.g. ``/input_simple``), registers a window of it under a
region name, and then names that region in a tensor's parameters (``shared_memory_region``,
``shared_memory_byte_size``, optional ``shared_memory_offset``). The segment belongs to the client: the server maps
it while the region is registered and only unmaps it, never unlinks it, so the client decides when it goes away.

Regions are registered, used and unregistered from the event loop only (both front ends run in it), so the
registry needs no lock; a request keeps the region it resolved, so an unregister while it runs fails that request
instead of letting it touch a segment mapped afresh under the same name.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import InvalidInput, RegionExists, RegionNotFound

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
# Where Linux keeps POSIX shared memory objects: ``shm_open("/key")`` is the file ``/dev/shm/key``.
SHM_ROOT = Path("/dev/shm")


class SharedMemoryRegion:
    """A registered window ``[offset, offset + byte_size)`` of one mapped shared memory object."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self._mapping = mapping

    @property
    def closed(self) -> bool:
        return self._mapping.closed

    def read(self, offset: int, size: int) -> bytes:
        """A copy, so no tensor keeps the mapping alive or sees the client change the bytes while it runs."""
        self._check_open()
        start = self.offset + offset
        return self._mapping[start : start + size]

    def write(self, offset: int, data: bytes) -> None:
        self._check_open()
        start = self.offset + offset
        self._mapping[start : start + len(data)] = data

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def close(self) -> None:
        self._mapping.close()

    def _check_open(self) -> None:
        if self.closed:
            raise InvalidInput(f"shared memory region '{self.name}' was unregistered while the request was running")


@dataclass(frozen=True, slots=True)
class TensorPlacement:
    """Where one tensor's bytes lie: ``byte_size`` bytes at ``offset`` into a registered region."""

    region: SharedMemoryRegion
    offset: int
    byte_size: int

    def read(self) -> bytes:
        return self.region.read(self.offset, self.byte_size)

    def write(self, data: bytes, tensor: str) -> None:
        """Copy ``data`` in; more than the client set aside for it is refused rather than cut short."""
        if len(data) > self.byte_size:
            raise InvalidInput(
                f"{tensor}: {BYTE_SIZE} is {self.byte_size} but the result needs {len(data)} bytes "
                f"(shared memory region '{self.region.name}')"
            )
        self.region.write(self.offset, data)

    def response_parameters(self, written: int) -> dict[str, Any]:
        """What Triton reports for an output it wrote to shared memory instead of sending it."""
        parameters: dict[str, Any] = {REGION: self.region.name, BYTE_SIZE: written}
        if self.offset:
            parameters[OFFSET] = self.offset
        return parameters


class SharedMemoryRegistry:
    """The system shared memory regions clients have registered, by name."""

    def __init__(self, root: Path = SHM_ROOT) -> None:
        self.root = root
        self._regions: dict[str, SharedMemoryRegion] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        if name in self._regions:
            raise RegionExists(f"shared memory region '{name}' already in manager")
        _non_negative(offset, "offset", f"shared memory region '{name}'")
        _non_negative(byte_size, "byte_size", f"shared memory region '{name}'")
        mapping = self._map(key)
        if offset + byte_size > len(mapping):
            size = len(mapping)
            mapping.close()
            raise InvalidInput(
                f"shared memory region '{name}': offset {offset} + byte_size {byte_size} runs past the end of "
                f"shared memory key '{key}' ({size} bytes)"
            )
        self._regions[name] = SharedMemoryRegion(name, key, offset, byte_size, mapping)

    def unregister(self, name: str = "") -> None:
        """One region, or all of them when ``name`` is "" (the protocol's spelling of "all").

        A name that is not registered succeeds, as in Triton, so a client's cleanup can always run.
        """
        if not name:
            self.unregister_all()
            return
        region = self._regions.pop(name, None)
        if region is not None:
            region.close()

    def unregister_all(self) -> None:
        for name in list(self._regions):
            self.unregister(name)

    def status(self, name: str = "") -> list[dict[str, Any]]:
        """Every region, or the one named (an unknown name is NOT_FOUND)."""
        if not name:
            return [region.status() for region in self._regions.values()]
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"unable to find system shared memory region: '{name}'")
        return [region.status()]

    def placement(self, parameters: Mapping[str, Any], tensor: str) -> TensorPlacement | None:
        """The place a tensor's ``shared_memory_*`` parameters name, or None when it does not use shared memory."""
        if REGION not in parameters:
            return None
        name = parameters[REGION]
        if not isinstance(name, str):
            raise InvalidInput(f"{tensor}: {REGION} must be a string")
        if BYTE_SIZE not in parameters:
            raise InvalidInput(f"{tensor}: {REGION} is given but {BYTE_SIZE} is not")
        byte_size = _non_negative(parameters[BYTE_SIZE], BYTE_SIZE, tensor)
        offset = _non_negative(parameters.get(OFFSET, 0), OFFSET, tensor)
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"{tensor}: shared memory region '{name}' is not registered")
        if offset + byte_size > region.byte_size:
            raise InvalidInput(
                f"{tensor}: {OFFSET} {offset} + {BYTE_SIZE} {byte_size} runs past the end of shared memory "
                f"region '{name}' ({region.byte_size} bytes)"
            )
        return TensorPlacement(region, offset, byte_size)

    def _map(self, key: str) -> mmap.mmap:
        """Map the whole object read-write; the descriptor is closed at once, the mapping keeps the memory."""
        path = self._path(key)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidInput(f"unable to open shared memory key '{key}': {exc.strerror}") from None
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"shared memory key '{key}' is not a shared memory object")
            if info.st_size == 0:
                raise InvalidInput(f"shared memory key '{key}' is empty")
            return mmap.mmap(descriptor, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise InvalidInput(f"unable to map shared memory key '{key}': {exc.strerror}") from None
        finally:
            os.close(descriptor)

    def _path(self, key: str) -> Path:
        """``shm_open``'s naming rule: one optional leading slash run, then a name with no slash in it, so a key can
        never reach a file outside the shared memory folder."""
        name = key.lstrip("/") if isinstance(key, str) else ""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise InvalidInput(f"invalid shared memory key {key!r}: expected a name such as '/my_region'")
        return self.root / name


def _non_negative(value: Any, field: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{owner}: {field} must be a non-negative integer, got {value!r}")
    return value
