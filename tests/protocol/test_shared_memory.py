"""System shared memory: the registry on its own, then end to end with ``tritonclient`` (http and grpc) and
``tritonclient.utils.shared_memory`` against the bundled ``simple`` model (OUTPUT0 = INPUT0 + INPUT1,
OUTPUT1 = INPUT0 - INPUT1) and ``text_preprocessor`` (BYTES).
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from server.errors import InvalidInput, RegionExists, RegionNotFound
from server.protocol.shared_memory import SHM_ROOT, SharedMemoryRegistry
from tests.conftest import ServerProcess

FP32_BYTES = 16 * 4  # one [1, 16] FP32 tensor of the simple model
A = np.arange(16, dtype=np.float32).reshape(1, 16)
B = np.full((1, 16), 0.5, dtype=np.float32)


# -- the registry on its own (a folder standing in for /dev/shm) ----------------------------------------------------
@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SharedMemoryRegistry]:
    (tmp_path / "segment").write_bytes(bytes(range(256)))
    registry = SharedMemoryRegistry(root=tmp_path)
    yield registry
    registry.unregister_all()


def test_register_status_and_unregister(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    registry.register("a", "/segment", 16, 64)
    registry.register("b", "segment", 0, 256)
    assert registry.status() == [
        {"name": "a", "key": "/segment", "offset": 16, "byte_size": 64},
        {"name": "b", "key": "segment", "offset": 0, "byte_size": 256},
    ]
    assert registry.status("a") == [{"name": "a", "key": "/segment", "offset": 16, "byte_size": 64}]
    registry.unregister("a")
    registry.unregister("a")  # unknown names unregister quietly, as in Triton
    assert [row["name"] for row in registry.status()] == ["b"]
    registry.unregister()
    assert registry.status() == []
    assert (tmp_path / "segment").stat().st_size == 256  # the client's segment is never removed


def test_register_refusals(registry: SharedMemoryRegistry) -> None:
    registry.register("a", "/segment", 0, 8)
    with pytest.raises(RegionExists, match="shared memory region 'a' already in manager"):
        registry.register("a", "/segment", 8, 8)
    with pytest.raises(InvalidInput, match="offset 200 \\+ byte_size 100 runs past the end of shared memory key"):
        registry.register("big", "/segment", 200, 100)
    with pytest.raises(InvalidInput, match="unable to open shared memory key '/missing'"):
        registry.register("m", "/missing", 0, 8)
    for key in ("", "/", "/../segment", "dir/segment", None):
        with pytest.raises(InvalidInput, match="invalid shared memory key"):
            registry.register("k", key, 0, 8)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="byte_size must be a non-negative integer"):
        registry.register("n", "/segment", 0, -1)
    assert [row["name"] for row in registry.status()] == ["a"]


def test_status_of_an_unknown_region(registry: SharedMemoryRegistry) -> None:
    with pytest.raises(RegionNotFound, match="'nope'"):
        registry.status("nope")


def test_placements_read_and_write_inside_the_region(registry: SharedMemoryRegistry) -> None:
    registry.register("a", "/segment", 16, 64)
    placement = registry.placement(
        {"shared_memory_region": "a", "shared_memory_byte_size": 4, "shared_memory_offset": 8}, "input 'x'"
    )
    assert placement is not None and placement.read() == bytes([24, 25, 26, 27])
    placement.write(b"\xff\xff", "output 'y'")
    assert registry.placement({}, "input 'x'") is None
    whole = registry.placement({"shared_memory_region": "a", "shared_memory_byte_size": 64}, "input 'x'")
    assert whole is not None and whole.read()[8:12] == bytes([255, 255, 26, 27])
    with pytest.raises(InvalidInput, match="output 'y': shared_memory_byte_size is 4 but the result needs 5 bytes"):
        placement.write(b"12345", "output 'y'")


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"shared_memory_region": "a"}, "input 'x': shared_memory_region is given but shared_memory_byte_size is not"),
        ({"shared_memory_region": "zz", "shared_memory_byte_size": 4}, "region 'zz' is not registered"),
        ({"shared_memory_region": "a", "shared_memory_byte_size": 60, "shared_memory_offset": 8}, "runs past the end"),
        ({"shared_memory_region": "a", "shared_memory_byte_size": -4}, "must be a non-negative integer"),
        ({"shared_memory_region": 3, "shared_memory_byte_size": 4}, "must be a string"),
    ],
    ids=["no-size", "unregistered", "past-end", "negative", "name-type"],
)
def test_placement_refusals(registry: SharedMemoryRegistry, parameters: dict[str, Any], message: str) -> None:
    registry.register("a", "/segment", 16, 64)
    with pytest.raises(InvalidInput, match=message):
        registry.placement(parameters, "input 'x'")


def test_a_request_never_writes_to_a_region_unregistered_under_it(registry: SharedMemoryRegistry) -> None:
    registry.register("a", "/segment", 0, 8)
    placement = registry.placement({"shared_memory_region": "a", "shared_memory_byte_size": 8}, "output 'y'")
    registry.unregister("a")
    registry.register("a", "/segment", 0, 8)
    assert placement is not None
    with pytest.raises(InvalidInput, match="region 'a' was unregistered while the request was running"):
        placement.write(b"x", "output 'y'")


# -- end to end ---------------------------------------------------------------------------------------------------
PROTOCOLS = ["http", "grpc"]


class Regions:
    """Shared memory segments made with tritonclient's helper and registered through one client.

    Names and keys are unique per test, since every test talks to the one shared server; everything is
    unregistered and destroyed afterwards, whatever the test did.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.tag = uuid.uuid4().hex[:8]
        self.handles: dict[str, Any] = {}

    def create(self, name: str, byte_size: int) -> tuple[str, Any]:
        """A segment of ``byte_size`` bytes; its region name and handle (not registered yet)."""
        region = f"{name}_{self.tag}"
        self.handles[region] = shm.create_shared_memory_region(region, self.key(region), byte_size, create_only=True)
        return region, self.handles[region]

    def register(self, name: str, byte_size: int, offset: int = 0) -> tuple[str, Any]:
        """A segment registered whole but for its first ``offset`` bytes."""
        region, handle = self.create(name, offset + byte_size)
        self.client.register_system_shared_memory(region, self.key(region), byte_size, offset=offset)
        return region, handle

    @staticmethod
    def key(region: str) -> str:
        return f"/modeldock_test_{region}"

    def close(self) -> None:
        for region, handle in self.handles.items():
            self.client.unregister_system_shared_memory(region)
            shm.destroy_shared_memory_region(handle)


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(server: ServerProcess, protocol: str) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture
def module(protocol: str) -> ModuleType:
    return httpclient if protocol == "http" else grpcclient


@pytest.fixture
def regions(client: Any) -> Iterator[Regions]:
    regions = Regions(client)
    yield regions
    regions.close()


def shm_input(module: ModuleType, name: str, region: str, byte_size: int, offset: int = 0) -> Any:
    tensor = module.InferInput(name, [1, 16], "FP32")
    tensor.set_shared_memory(region, byte_size, offset=offset)
    return tensor


def shm_output(module: ModuleType, name: str, region: str, byte_size: int, offset: int = 0) -> Any:
    output = module.InferRequestedOutput(name)
    output.set_shared_memory(region, byte_size, offset=offset)
    return output


def sent_input(module: ModuleType, name: str, array: np.ndarray) -> Any:
    tensor = module.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def error_of(call: Callable[[], Any]) -> tuple[str, str]:
    """The status (HTTP code, or gRPC code) and message the server answered ``call`` with."""
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), info.value.message()


def output_entry(result: Any, name: str) -> dict[str, Any]:
    """An output as the HTTP response lists it, whichever client gave it."""
    output = result.get_output(name)
    if isinstance(output, dict):
        return output
    return {
        "name": output.name,
        "datatype": output.datatype,
        "shape": list(output.shape),
        "parameters": {key: getattr(p, p.WhichOneof("parameter_choice")) for key, p in output.parameters.items()},
    }


def status_rows(client: Any, name: str = "") -> dict[str, dict[str, Any]]:
    """The status answer as plain rows by region name, whichever client gave it."""
    status = client.get_system_shared_memory_status(name)
    if isinstance(status, list):
        return {row["name"]: row for row in status}
    return {
        region.name: {"name": region.name, "key": region.key, "offset": region.offset, "byte_size": region.byte_size}
        for region in status.regions.values()
    }


def test_extension_is_advertised(server: ServerProcess) -> None:
    assert "system_shared_memory" in httpx.get(server.url + "/v2").json()["extensions"]


def test_inputs_and_outputs_in_shared_memory(client: Any, module: ModuleType, regions: Regions) -> None:
    inputs, input_handle = regions.register("in", 2 * FP32_BYTES)
    outputs, output_handle = regions.register("out", 2 * FP32_BYTES)
    shm.set_shared_memory_region(input_handle, [A, B])

    result = client.infer(
        "simple",
        [shm_input(module, "INPUT0", inputs, FP32_BYTES), shm_input(module, "INPUT1", inputs, FP32_BYTES, FP32_BYTES)],
        outputs=[
            shm_output(module, "OUTPUT0", outputs, FP32_BYTES),
            shm_output(module, "OUTPUT1", outputs, FP32_BYTES, FP32_BYTES),
        ],
    )

    for name, offset, expected in (("OUTPUT0", 0, A + B), ("OUTPUT1", FP32_BYTES, A - B)):
        # Listed without data: the parameters say where it went and how many bytes were written.
        parameters = {"shared_memory_region": outputs, "shared_memory_byte_size": FP32_BYTES}
        if offset:
            parameters["shared_memory_offset"] = offset
        assert output_entry(result, name) == {
            "name": name,
            "datatype": "FP32",
            "shape": [1, 16],
            "parameters": parameters,
        }
        np.testing.assert_array_equal(shm.get_contents_as_numpy(output_handle, np.float32, [1, 16], offset), expected)


def test_inputs_in_shared_memory_outputs_in_the_response(client: Any, module: ModuleType, regions: Regions) -> None:
    inputs, handle = regions.register("in", 2 * FP32_BYTES)
    shm.set_shared_memory_region(handle, [A, B])
    result = client.infer(
        "simple",
        [shm_input(module, "INPUT0", inputs, FP32_BYTES), shm_input(module, "INPUT1", inputs, FP32_BYTES, FP32_BYTES)],
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)


def test_mixing_shared_memory_and_sent_tensors(client: Any, module: ModuleType, regions: Regions) -> None:
    # The region starts 32 bytes into its segment; tensor offsets count from the region's start.
    inputs, handle = regions.register("in", FP32_BYTES, offset=32)
    outputs, output_handle = regions.register("out", FP32_BYTES)
    shm.set_shared_memory_region(handle, [B], offset=32)
    result = client.infer(
        "simple",
        [sent_input(module, "INPUT0", A), shm_input(module, "INPUT1", inputs, FP32_BYTES)],
        outputs=[shm_output(module, "OUTPUT0", outputs, FP32_BYTES), module.InferRequestedOutput("OUTPUT1")],
    )
    np.testing.assert_array_equal(shm.get_contents_as_numpy(output_handle, np.float32, [1, 16]), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)


def test_bytes_tensors_in_shared_memory(client: Any, module: ModuleType, regions: Regions) -> None:
    text = np.array([["Hello   World"], ["ÉTÉ  chaud"]], dtype=np.object_)
    serialized = serialize_byte_tensor(text)
    size = len(serialized.item())
    inputs, handle = regions.register("text", size)
    outputs, output_handle = regions.register("normalized", 256)
    shm.set_shared_memory_region(handle, [serialized])
    tensor = module.InferInput("TEXT", [2, 1], "BYTES")
    tensor.set_shared_memory(inputs, size)
    result = client.infer("text_preprocessor", [tensor], outputs=[shm_output(module, "NORMALIZED", outputs, 256)])
    normalized = shm.get_contents_as_numpy(output_handle, np.object_, [2, 1])
    assert normalized.reshape(-1).tolist() == [b"hello world", "été chaud".encode()]
    written = output_entry(result, "NORMALIZED")["parameters"]["shared_memory_byte_size"]
    assert written == len(b"hello world") + len("été chaud".encode()) + 8


def test_grpc_stream_writes_outputs_to_shared_memory(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    regions = Regions(client)
    try:
        outputs, handle = regions.register("out", FP32_BYTES)
        results: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put(error or result))
        client.async_stream_infer(
            "simple",
            [sent_input(grpcclient, "INPUT0", A), sent_input(grpcclient, "INPUT1", B)],
            outputs=[shm_output(grpcclient, "OUTPUT0", outputs, FP32_BYTES)],
        )
        result = results.get(timeout=10)
        client.stop_stream()
        assert not isinstance(result, InferenceServerException), result
        assert output_entry(result, "OUTPUT0")["parameters"]["shared_memory_region"] == outputs
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16]), A + B)
    finally:
        regions.close()


def test_status_and_unregister(client: Any, regions: Regions) -> None:
    first, _ = regions.register("first", 64)
    second, _ = regions.register("second", 32, offset=16)
    rows = status_rows(client)
    assert rows[first] == {"name": first, "key": Regions.key(first), "offset": 0, "byte_size": 64}
    assert rows[second] == {"name": second, "key": Regions.key(second), "offset": 16, "byte_size": 32}
    assert list(status_rows(client, second)) == [second]

    client.unregister_system_shared_memory(first)
    assert first not in status_rows(client) and second in status_rows(client)
    code, message = error_of(lambda: client.get_system_shared_memory_status(first))
    assert code in ("404", "StatusCode.NOT_FOUND") and f"'{first}'" in message

    client.unregister_system_shared_memory()
    assert status_rows(client) == {}
    # The server unmaps but never unlinks: the segment is still the client's to destroy.
    assert (SHM_ROOT / Regions.key(second).lstrip("/")).exists()


def test_register_errors(client: Any, regions: Regions, protocol: str) -> None:
    invalid = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    code, message = error_of(lambda: client.register_system_shared_memory("ghost", "/modeldock_no_such_key", 64))
    assert code == invalid and "'/modeldock_no_such_key'" in message

    region, _ = regions.register("dup", 64)
    code, message = error_of(lambda: client.register_system_shared_memory(region, Regions.key(region), 64))
    assert (
        code in ("409", "StatusCode.ALREADY_EXISTS")
        and f"shared memory region '{region}' already in manager" in message
    )

    small, _ = regions.create("small", 64)
    code, message = error_of(lambda: client.register_system_shared_memory(small, Regions.key(small), 64, offset=8))
    assert code == invalid and "runs past the end" in message
    assert small not in status_rows(client)


def test_infer_errors(server: ServerProcess, client: Any, module: ModuleType, regions: Regions, protocol: str) -> None:
    invalid = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    inputs, handle = regions.register("in", 2 * FP32_BYTES)
    shm.set_shared_memory_region(handle, [A, B])
    second = shm_input(module, "INPUT1", inputs, FP32_BYTES, FP32_BYTES)

    code, message = error_of(
        lambda: client.infer("simple", [shm_input(module, "INPUT0", "never_registered", FP32_BYTES), second])
    )
    assert code == invalid and "input 'INPUT0'" in message and "'never_registered' is not registered" in message

    code, message = error_of(lambda: client.infer("simple", [shm_input(module, "INPUT0", inputs, 32), second]))
    assert code == invalid and "input 'INPUT0': shared_memory_byte_size is 32" in message and "64 bytes" in message

    small, _ = regions.register("small", 32)
    before = simple_stats(server)
    code, message = error_of(
        lambda: client.infer(
            "simple",
            [shm_input(module, "INPUT0", inputs, FP32_BYTES), second],
            outputs=[shm_output(module, "OUTPUT0", small, 32)],
        )
    )
    assert code == invalid and "output 'OUTPUT0'" in message and "needs 64 bytes" in message
    # The output's size is fixed by the config, so the request is refused before the model runs, as a failure.
    after = simple_stats(server)
    assert after["execution_count"] == before["execution_count"]
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1


def simple_stats(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(f"{server.url}/v2/models/simple/stats", timeout=10).json()["model_stats"][0]


def test_cuda_shared_memory_is_refused_over_http(server: ServerProcess) -> None:
    for method, path in (
        ("GET", "/v2/cudasharedmemory/status"),
        ("POST", "/v2/cudasharedmemory/region/r/register"),
        ("POST", "/v2/cudasharedmemory/unregister"),
    ):
        response = httpx.request(method, server.url + path)
        assert response.status_code == 400
        assert "CUDA shared memory is not supported" in response.json()["error"]
