"""Triton's response cache: identical requests to a model that opts in are answered without running it.

One cache serves the whole server (``--cache-config local,size=N``, N bytes), evicting the least recently used
responses once their sizes add up to more than N. A model takes part with ``response_cache: {enable: true}`` in
its config. The key is a hash of what decides a response: the model, the loaded version, every input (name,
datatype, shape and bytes) and the requested outputs with their parameters. Each load of a version gets its own
key space, so a reloaded model never answers with what its previous load computed, and closing a version frees
its entries at once.

Only the event loop touches the cache, so it needs no lock.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from server.errors import ConfigError
from server.extensions.statistics import ModelStats
from server.protocol.datatypes import wire_datatype
from server.protocol.types import InferRequest, InferResponse

CACHE_KIND = "local"


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The parsed ``--cache-config`` flags."""

    size_bytes: int


def parse_cache_config(values: list[str]) -> CacheSettings | None:
    """Triton's ``--cache-config <cache>,<key>=<value>`` (repeatable); only the ``local`` cache and its ``size``."""
    size: int | None = None
    for value in values:
        kind, _, setting = value.partition(",")
        if kind != CACHE_KIND:
            raise ConfigError(f"--cache-config {value!r}: unknown cache '{kind}'; this server has '{CACHE_KIND}'")
        key, _, number = setting.partition("=")
        if key != "size" or not number.strip().isdigit():
            raise ConfigError(f"--cache-config {value!r}: expected {CACHE_KIND},size=<bytes>")
        size = int(number)
    if size is None:
        return None
    return CacheSettings(size)


@dataclass(slots=True)
class _Entry:
    owner: int
    outputs: dict[str, np.ndarray]
    parameters: dict[str, object]
    size: int


def _array_bytes(array: np.ndarray) -> int:
    if array.dtype == np.object_:
        return sum(len(item) if isinstance(item, (bytes, str)) else 8 for item in array.flat)
    return int(array.nbytes)


class ResponseCache:
    """The server-wide store: responses by key, least recently used first, bounded by their total size in bytes."""

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._owners = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def for_version(self, name: str, version: str, stats: ModelStats) -> VersionCache:
        """The cache as one load of one model version sees it."""
        return VersionCache(self, next(self._owners), name, version, stats)

    def get(self, key: bytes) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: _Entry) -> None:
        if entry.size > self.size_bytes:
            return  # would evict everything else and still not fit
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= old.size
        while self._entries and self.used_bytes + entry.size > self.size_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= evicted.size
        self._entries[key] = entry
        self.used_bytes += entry.size

    def drop_owner(self, owner: int) -> None:
        for key in [k for k, e in self._entries.items() if e.owner == owner]:
            self.used_bytes -= self._entries.pop(key).size


@dataclass(slots=True)
class VersionCache:
    """One loaded version's view of the cache: its key space and its hit and miss statistics."""

    cache: ResponseCache
    owner: int
    name: str
    version: str
    stats: ModelStats

    def key(self, request: InferRequest) -> bytes:
        digest = hashlib.blake2b(digest_size=32)
        digest.update(struct.pack("<q", self.owner))
        for name in sorted(request.inputs):
            array = request.inputs[name]
            datatype = request.input_datatypes.get(name) or wire_datatype(array)
            digest.update(f"\0in\0{name}\0{datatype}\0{list(array.shape)}\0".encode())
            if array.dtype == np.object_:
                for item in array.flat:
                    data = item if isinstance(item, bytes) else str(item).encode()
                    digest.update(struct.pack("<q", len(data)))
                    digest.update(data)
            else:
                digest.update(np.ascontiguousarray(array).tobytes())
        for output in sorted(request.outputs, key=lambda o: o.name):
            parameters = sorted((k, repr(v)) for k, v in output.parameters.items())
            digest.update(f"\0out\0{output.name}\0{parameters}".encode())
        return digest.digest()

    def lookup(self, request: InferRequest) -> CacheLookup:
        """The cached response for ``request`` (a copy carrying the request's id), counted as a hit; or the key
        and lookup time a miss needs to store the response once it is computed."""
        start = time.monotonic_ns()
        key = self.key(request)
        entry = self.cache.get(key)
        if entry is None:
            return CacheLookup(key, time.monotonic_ns() - start, None)
        response = InferResponse(
            model_name=self.name,
            model_version=self.version,
            id=request.id,
            outputs=dict(entry.outputs),
            parameters=dict(entry.parameters),
        )
        self.stats.record_cache_hit(time.monotonic_ns() - start)
        return CacheLookup(key, 0, response)

    def store(self, lookup: CacheLookup, response: InferResponse) -> None:
        """Keep a computed response; as in Triton the miss counts the time of its lookup and of this insertion."""
        start = time.monotonic_ns()
        outputs = {name: np.array(array, copy=True) for name, array in response.outputs.items()}
        size = len(lookup.key) + sum(_array_bytes(a) + len(n) for n, a in outputs.items())
        self.cache.put(lookup.key, _Entry(self.owner, outputs, dict(response.parameters), size))
        self.stats.record_cache_miss(lookup.lookup_ns + time.monotonic_ns() - start)

    def drop(self) -> None:
        self.cache.drop_owner(self.owner)


@dataclass(frozen=True, slots=True)
class CacheLookup:
    key: bytes
    lookup_ns: int
    # Set on a hit.
    response: InferResponse | None
