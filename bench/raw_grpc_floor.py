"""The floor under any gRPC front end built on grpcio: ``ModelInfer`` with no framework, no batching and no checks.

It parses each ``ModelInferRequest``, runs ONNX Runtime inline on the raw input bytes and answers with a
``ModelInferResponse`` carrying the raw output, which is the least a KServe v2 gRPC server can do per call. Whatever a
real server does costs more, so its throughput is the ceiling for a Python gRPC front end on grpcio.
``ModelStreamInfer`` is the same on a bidirectional stream: each request answered in turn, in arrival order, with
no concurrency inside a stream, as the least a streaming server does per message:

    python raw_grpc_floor.py aio PORT     # grpc.aio on an asyncio event loop (uvloop when installed), as ModelDock
    python raw_grpc_floor.py sync PORT    # grpcio's thread-pool server (``FLOOR_WORKERS`` threads, default 4)

``bench_triton.py`` runs both as ``floor-grpc-aio`` and ``floor-grpc-sync`` (``-stream`` for their streaming RPC) with ``FLOOR_MODELS`` naming the models
(``name=path.onnx,...``) and ``FLOOR_THREADS`` the ONNX Runtime threads.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from floor_models import floor_sessions
from tritonclient.grpc import service_pb2

SERVICE = "inference.GRPCInferenceService"


SESSIONS = floor_sessions()


def _answer(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    session = SESSIONS[request.model_name]
    x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(request.inputs[0].shape))
    (y,) = session.run(["OUTPUT0"], {"INPUT0": x})
    response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    response.outputs.add(name="OUTPUT0", datatype="FP32", shape=list(y.shape))
    response.raw_output_contents.append(y.tobytes())
    return response


def _handler(infer: Any, stream: Any) -> grpc.GenericRpcHandler:
    unary = grpc.unary_unary_rpc_method_handler(
        infer,
        request_deserializer=service_pb2.ModelInferRequest.FromString,
        response_serializer=service_pb2.ModelInferResponse.SerializeToString,
    )
    streaming = grpc.stream_stream_rpc_method_handler(
        stream,
        request_deserializer=service_pb2.ModelInferRequest.FromString,
        response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": unary, "ModelStreamInfer": streaming})


async def _serve_aio(port: int) -> None:
    async def infer(request: service_pb2.ModelInferRequest, context: Any) -> service_pb2.ModelInferResponse:
        return _answer(request)

    async def stream(requests: AsyncIterator[service_pb2.ModelInferRequest], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield service_pb2.ModelStreamInferResponse(infer_response=_answer(request))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(infer, stream),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _serve_sync(port: int) -> None:
    workers = int(os.environ.get("FLOOR_WORKERS", "4"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))

    def stream(requests: Iterator[service_pb2.ModelInferRequest], context: Any) -> Iterator[Any]:
        for request in requests:
            yield service_pb2.ModelStreamInferResponse(infer_response=_answer(request))

    server.add_generic_rpc_handlers((_handler(lambda request, context: _answer(request), stream),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "sync":
        _serve_sync(port)
        return
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_aio(port))
    else:
        uvloop.run(_serve_aio(port))


if __name__ == "__main__":
    main()
