"""The server as the front ends see it: one object answering every protocol question.

HTTP and gRPC both call into ``InferenceServer`` and only translate to and from their wire formats, so health,
metadata, inference and repository control behave identically on both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from server import __version__
from server.errors import InvalidInput, ModelNotFound, ModelNotReady
from server.metrics import ServerMetrics
from server.model_manager import ModelManager
from server.protocol.types import InferRequest, InferResponse
from server.validation import expected_shape

SERVER_NAME = "modeldock"
EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
]


class InferenceServer:
    def __init__(self, models: ModelManager) -> None:
        self.models = models
        self.metrics = ServerMetrics(models.statistics)
        self.live = True
        # Set once the start-up load of the repository has finished.
        self.started = False

    # -- health -------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Ready once the start-up load is done and no model is mid-load; broken models do not hold it back."""
        return self.live and self.started and all(row["state"] != "LOADING" for row in self.models.index())

    # -- metadata -----------------------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        served = self.models.get(name, version)
        record = self.models.record(name)
        config = served.config
        versions = sorted((str(v) for v, e in record.versions.items() if e.served is not None), key=int)
        return {
            "name": name,
            "versions": versions,
            "platform": config.platform or config.backend,
            "inputs": [
                {"name": t.name, "datatype": t.wire_datatype, "shape": expected_shape(config, t)} for t in config.input
            ],
            "outputs": [
                {"name": t.name, "datatype": t.wire_datatype, "shape": expected_shape(config, t)} for t in config.output
            ],
        }

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        return self.models.get(name, version).config.to_json()

    def model_ready(self, name: str, version: str = "") -> bool:
        if name not in self.models.records and self.models.repository.locate(name) is None:
            raise ModelNotFound(f"unknown model '{name}'")
        return self.models.is_ready(name, version)

    # -- inference ----------------------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        served = self.models.get(request.model_name, request.model_version)
        return await served.infer(request)

    async def stream_infer(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        served = self.models.get(request.model_name, request.model_version)
        async for response in served.stream(request):
            yield response

    # -- statistics ---------------------------------------------------------------------------------------
    def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics JSON for every loaded version of one model (or of all models when ``name`` is "")."""
        if version and not name:
            raise InvalidInput("a model version was given without a model name")
        if name:
            record = self.models.record(name)
            if version:
                self.models.get(name, version)
            versions = [(name, str(v)) for v, e in sorted(record.versions.items()) if e.served is not None]
            if not versions:
                raise ModelNotReady(f"model '{name}' is not loaded")
            if version:
                versions = [(name, version)]
        else:
            versions = [
                (n, str(v))
                for n, record in sorted(self.models.records.items())
                for v, e in sorted(record.versions.items())
                if e.served is not None
            ]
        statistics = self.models.statistics
        return {"model_stats": [statistics.for_version(n, v).to_json() for n, v in versions]}

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of this server's metrics (``GET /metrics``)."""
        return self.metrics.exposition()

    # -- repository ---------------------------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.models.index(ready_only)

    async def load_model(self, name: str, config_override: dict[str, Any] | None = None) -> None:
        await self.models.load(name, config_override)

    async def unload_model(self, name: str) -> None:
        await self.models.unload(name)
