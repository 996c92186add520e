"""Runs a model's ``model_warmup`` samples on every instance before the version is marked READY.

Backends often compile, allocate or autotune on their first call; doing that here keeps the first real request
(and, on a reload, the first request after traffic switches) from paying for it. A sample that does not fit the
model is a config mistake, so it fails the load with a reason naming the warm-up entry instead of being skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np

from backends.base import Backend
from server.config import CONFIG_FILENAME, ModelConfig, ModelWarmup, WarmupInput
from server.errors import ModelDockError, ModelLoadError
from server.protocol.datatypes import CONFIG_TO_WIRE, numpy_dtype
from server.protocol.tensor_codec import deserialize_raw, element_count
from server.protocol.types import InferRequest
from server.scheduling.instances import ModelInstance, create_instances
from server.scheduling.scheduler import merge_inputs
from server.scheduling.validation import validate_request

log = logging.getLogger(__name__)

WARMUP_FOLDER = "warmup"


def warmup_tensor(name: str, spec: WarmupInput, data_dir: Path, rng: np.random.Generator) -> np.ndarray:
    """One sample of one input (no batch dimension); variable dims are taken as 1."""
    wire = CONFIG_TO_WIRE[spec.data_type]
    shape = [d if d >= 0 else 1 for d in spec.dims]
    if spec.input_data_file:
        path = data_dir / spec.input_data_file
        try:
            buffer = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"input '{name}': cannot read input_data_file {path}: {exc.strerror}") from None
        return deserialize_raw(wire, shape, buffer, name)
    if wire == "BYTES":
        out = np.empty(element_count(shape), dtype=np.object_)
        out[:] = [b"" if spec.zero_data else rng.bytes(8) for _ in range(out.size)]
        return out.reshape(shape)
    dtype = numpy_dtype(wire)
    if spec.zero_data:
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in ("i", "u"):
        return rng.integers(0, 100, size=shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def warmup_request(config: ModelConfig, sample: ModelWarmup, model_dir: Path) -> InferRequest:
    """A warm-up sample as an ordinary request, checked by the same validation as client requests.

    As in Triton, a ``batch_size`` above 1 repeats the one sample along the batch dimension.
    """
    if sample.batch_size > 1 and not config.batching:
        raise ModelLoadError(f"batch_size {sample.batch_size} needs a batching model (max_batch_size > 0)")
    rng = np.random.default_rng(0)
    request = InferRequest(model_name=config.name, id=f"warmup:{sample.name}")
    for name, spec in sample.inputs.items():
        single = warmup_tensor(name, spec, model_dir / WARMUP_FOLDER, rng)
        request.inputs[name] = np.repeat(single[np.newaxis], sample.batch_size, axis=0) if config.batching else single
        request.input_datatypes[name] = CONFIG_TO_WIRE[spec.data_type]
    validate_request(config, request)
    return request


def warm_up(
    config: ModelConfig, model_dir: Path, instances: list[ModelInstance], deadline: float | None = None
) -> None:
    """Run every warm-up sample ``count`` times on every instance; blocking, so call it from a worker thread.

    Samples go through ``ModelInstance.execute`` (on a private event loop, as this is not the server's thread), so
    they reach the backend exactly as requests do, worker-process instances included. ``deadline``
    (``time.monotonic()``) bounds them, so a sample the model never answers fails the load.
    """
    if config.model_warmup:
        asyncio.run(_warm_up(config, model_dir, instances, deadline))


async def _warm_up(
    config: ModelConfig, model_dir: Path, instances: list[ModelInstance], deadline: float | None
) -> None:
    output_names = [t.name for t in config.output]
    for position, sample in enumerate(config.model_warmup):
        where = f"{model_dir / CONFIG_FILENAME}: field 'model_warmup[{position}]': model_warmup '{sample.name}' failed"
        try:
            inputs = merge_inputs(config, [warmup_request(config, sample, model_dir)])
            for instance in instances:
                for _ in range(sample.count):
                    timeout_s = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    await instance.execute(inputs, output_names, timeout_s)
        except ModelDockError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                where += f" before the load timeout ({config.load_timeout_s}s, parameters.load_timeout_secs)"
            raise ModelLoadError(f"{where}: {exc.message}") from None
        except Exception as exc:  # the backend rejected the sample: the same failure a client would meet
            raise ModelLoadError(f"{where}: {type(exc).__name__}: {exc}") from None
        log.info(
            "model '%s': warm-up '%s' ran %d time(s) on %d instance(s)",
            config.name,
            sample.name,
            sample.count,
            len(instances),
        )


def create_warm_instances(
    config: ModelConfig, version_dir: Path, backend_cls: type[Backend], deadline: float | None = None
) -> list[ModelInstance]:
    """Load a version's instances and warm them up; on a failed warm-up the instances are released again."""
    instances = create_instances(config, version_dir, backend_cls, deadline)
    try:
        warm_up(config, version_dir.parent, instances, deadline)
    except BaseException:
        for instance in instances:
            instance.unload()
        raise
    return instances
