"""The KServe v2 gRPC front end (Triton's ``GRPCInferenceService``): RPCs translate to ``InferenceServer`` calls only.

It runs on ``grpc.aio`` in the same event loop as the HTTP front end, so both share one ``InferenceServer`` and
neither blocks the other; model work happens in the instances (on their threads, or on the loop for a batch measured
at microseconds: ``server.scheduling.instances``), never in a handler.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from server.core import InferenceServer
from server.errors import InvalidInput, ModelDockError
from server.frontends.restrictions import Restrictions, grpc_group, grpc_refusal
from server.protocol import grpc_codec
from server.protocol.generated import grpc_service_pb2 as pb
from server.protocol.generated import grpc_service_pb2_grpc as pb_grpc
from server.protocol.limits import LIMITS

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_Response = TypeVar("_Response")
_Handler = Callable[..., Awaitable[_Response]]
# Marks the end of a stream's responses in its outbox.
_END = object()


class UnparsableMessage:
    """Stands in for a request whose bytes are not a valid message, so its handler can refuse it by name."""

    def __init__(self, error: str) -> None:
        self.error = f"the request is not a valid protobuf message: {error}"


class _TolerantRegistration:
    """Stands in for the server while the generated code registers the service, and registers it on the real one
    with every request parser made tolerant.

    gRPC answers a request it cannot parse with UNKNOWN before any handler runs; a tolerant parser makes it the
    handler's ``UnparsableMessage`` instead, so it reads INVALID_ARGUMENT and a stream carries on after it. Done at
    registration rather than by a server interceptor, which would cost an extra coroutine on every call.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """The generated code registers the same handlers again through ``add_registered_method_handlers``."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        tolerant = {
            name: handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
            if handler.request_deserializer is not None
            else handler
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, tolerant),))
        self._server.add_registered_method_handlers(service, tolerant)


class RestrictedProtocols(grpc.aio.ServerInterceptor):
    """``--grpc-restricted-protocol``: a call to a restricted group without its header is answered UNAVAILABLE
    with Triton's message before its request is read; the handler never runs."""

    def __init__(self, restrictions: Restrictions) -> None:
        self.restrictions = restrictions

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        metadata = handler_call_details.invocation_metadata or ()

        def lookup(name: str) -> str | bytes | None:
            return next((value for key, value in metadata if key == name), None)

        missing = self.restrictions.missing_header(grpc_group(handler_call_details.method), lookup)
        handler = await continuation(handler_call_details)
        if missing is None or handler is None:
            return handler
        refusal = grpc_refusal(missing)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(refusal.grpc_code, refusal.message)

        if handler.request_streaming or handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                refuse, handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return UnparsableMessage(str(exc))

    return parse_or_mark


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException | None) -> None:
    """End a call with the status ``exc`` maps to: a ``ModelDockError`` its own code, an abort the handler already
    made as it is, anything else INTERNAL (a server bug, logged with its traceback)."""
    if isinstance(exc, ModelDockError):
        if exc.grpc_code == grpc.StatusCode.INTERNAL:
            log.warning("%s failed: %s", method, exc.message)
        await context.abort(exc.grpc_code, exc.message)
    if isinstance(exc, grpc.aio.AbortError):  # the handler aborted on its own (e.g. UNIMPLEMENTED)
        raise exc
    log.error("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _reports_errors(handler: _Handler[_Response]) -> _Handler[_Response]:
    """Turn ``ModelDockError`` into its gRPC status; anything else is a server bug and reads as INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: GrpcInferenceService, request: Any, context: grpc.aio.ServicerContext) -> _Response:
        try:
            if isinstance(request, UnparsableMessage):
                raise InvalidInput(f"{handler.__name__}: {request.error}")
            return await handler(self, request, context)
        except Exception as exc:
            await _abort(context, handler.__name__, exc)
        raise AssertionError("context.abort returned")  # abort always raises

    return wrapper


async def _unimplemented(what: str, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by this server")


class GrpcInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceServer) -> None:
        self.core = core

    # -- health and metadata --------------------------------------------------------------------------------
    @_reports_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.core.live)

    @_reports_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.is_ready())

    @_reports_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    @_reports_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return grpc_codec.server_metadata_response(self.core.server_metadata())

    @_reports_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return grpc_codec.model_metadata_response(self.core.model_metadata(request.name, request.version))

    @_reports_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return grpc_codec.model_config_response(self.core.model_config(request.name, request.version))

    @_reports_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        # Statistics collection is a separate component; until the server has it, say so instead of sending zeros.
        statistics = getattr(self.core, "model_statistics", None)
        if statistics is None:
            return await _unimplemented("ModelStatistics", context)
        return grpc_codec.model_statistics_response(statistics(request.name, request.version))

    # -- inference --------------------------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """Every unary call's path, so ``_reports_errors`` is written out here: its wrapper would be a second
        coroutine on each call; a failure goes the same way through ``_abort``."""
        try:
            if isinstance(request, UnparsableMessage):
                raise InvalidInput(f"ModelInfer: {request.error}")
            core = self.core
            infer_request = grpc_codec.decode_request(request, core.shared_memory)
            if core.tracing.active:  # a caller's W3C trace context makes the request's span part of its trace
                infer_request.trace_parent = dict(context.invocation_metadata() or ()).get("traceparent")
            response = await core.infer(infer_request)
            return grpc_codec.encode_response(response, infer_request)
        except Exception as exc:
            await _abort(context, "ModelInfer", exc)
        raise AssertionError("context.abort returned")  # abort always raises

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest | UnparsableMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Serve each request as soon as it arrives, concurrently, and send responses in completion order.

        One request's failure goes back as ``error_message`` on the stream, which stays open for the others;
        a single consumer of ``outbox`` is the only writer, so messages never interleave.
        """
        outbox: asyncio.Queue[object] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        core = self.core

        async def serve_one(message: pb.ModelInferRequest | UnparsableMessage) -> None:
            if isinstance(message, UnparsableMessage):
                outbox.put_nowait(grpc_codec.stream_error(pb.ModelInferRequest(), message.error))
                return
            try:
                infer_request = grpc_codec.decode_request(message, core.shared_memory)
                if core.tracing.active:
                    infer_request.trace_parent = dict(context.invocation_metadata() or ()).get("traceparent")
                if not core.decoupled(infer_request.model_name, infer_request.model_version):
                    # Exactly one response: the unary path, without stream_infer's async generators.
                    response = await core.infer(infer_request)
                    outbox.put_nowait(grpc_codec.stream_response(response, infer_request))
                    return
                async for response in core.stream_infer(infer_request):
                    outbox.put_nowait(grpc_codec.stream_response(response, infer_request))
            except ModelDockError as exc:
                outbox.put_nowait(grpc_codec.stream_error(message, exc.message))
            except Exception as exc:
                log.exception("stream request '%s' failed", message.id)
                outbox.put_nowait(grpc_codec.stream_error(message, f"{type(exc).__name__}: {exc}"))

        async def read_all() -> None:
            try:
                async for message in request_iterator:
                    task = asyncio.create_task(serve_one(message))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*list(running))
                outbox.put_nowait(_END)
            except Exception as exc:  # reading the requests failed: end the stream with it
                outbox.put_nowait(exc)

        reader = asyncio.create_task(read_all())
        try:
            while True:
                item = await outbox.get()
                if item is _END:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # -- repository ------------------------------------------------------------------------------------------
    @_reports_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return grpc_codec.repository_index_response(self.core.repository_index(ready_only=request.ready))

    @_reports_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        override, files = grpc_codec.decode_load_request(request.parameters)
        await self.core.load_model(request.model_name, override, files)
        return pb.RepositoryModelLoadResponse()

    @_reports_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self.core.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory --------------------------------------------------------------------------------
    @_reports_errors
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        return grpc_codec.shared_memory_status_response(self.core.shared_memory.status(request.name))

    @_reports_errors
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.core.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_reports_errors
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.core.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- extensions this server does not offer --------------------------------------------------------------
    async def CudaSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await _unimplemented("CUDA shared memory", context)

    async def CudaSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await _unimplemented("CUDA shared memory", context)

    async def CudaSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await _unimplemented("CUDA shared memory", context)

    @_reports_errors
    async def TraceSetting(self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext) -> Any:
        # An empty request changes nothing and answers the settings, as a read does.
        changes = grpc_codec.decode_trace_settings(request)
        if changes:
            return grpc_codec.encode_trace_settings(self.core.update_trace_settings(changes, request.model_name))
        return grpc_codec.encode_trace_settings(self.core.trace_settings(request.model_name))

    @_reports_errors
    async def LogSettings(self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext) -> Any:
        # An empty request changes nothing and answers the settings, as a read does.
        settings = self.core.update_log_settings(grpc_codec.decode_log_settings(request))
        return grpc_codec.encode_log_settings(settings)


def create_grpc_server(
    core: InferenceServer,
    host: str,
    port: int,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    restrictions: Restrictions | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A ``grpc.aio`` server, bound but not yet started, and the port it bound (useful when ``port`` is 0).

    gRPC itself answers RESOURCE_EXHAUSTED to a message over ``max_message_bytes`` and to metadata over
    ``--max-header-bytes``, before any handler runs.
    """
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if restrictions:
        interceptors.append(RestrictedProtocols(restrictions))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Both the soft limit (beyond it gRPC refuses some calls at random) and the hard one.
            ("grpc.max_metadata_size", LIMITS.max_header_bytes),
            ("grpc.absolute_max_metadata_size", LIMITS.max_header_bytes),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcInferenceService(core), _TolerantRegistration(server))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    return server, bound
