"""A reload retires the old version: requests holding it are resubmitted to the new one, not failed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.core import InferenceServer
from server.errors import VersionRetired
from server.protocol.types import InferRequest
from server.repository.discovery import ModelRepository
from server.repository.model_manager import ModelManager, ServedVersion
from tests.lifecycle_models import A, B, add_simple


def simple_request() -> InferRequest:
    return InferRequest(model_name="simple", inputs={"INPUT0": A[np.newaxis], "INPUT1": B[np.newaxis]})


class PickedBeforeSwap(ModelManager):
    """Hands out a given (retired) version once, as if the request had picked it just before a reload swapped it."""

    def __init__(self, repository: ModelRepository) -> None:
        super().__init__(repository)
        self.stale: list[ServedVersion] = []

    def get(self, name: str, version: str = "") -> ServedVersion:
        return self.stale.pop() if self.stale else super().get(name, version)


async def test_request_holding_a_replaced_version_runs_on_its_replacement(tmp_path: Path) -> None:
    add_simple(tmp_path / "repo")
    manager = PickedBeforeSwap(ModelRepository([tmp_path / "repo"]))
    core = InferenceServer(manager)
    await manager.load_all()
    try:
        before = manager.get("simple")
        await manager.load("simple")
        after = manager.get("simple")
        assert after is not before and before.retired and not after.retired
        with pytest.raises(VersionRetired):
            await before.infer(simple_request())

        manager.stale.append(before)
        response = await core.infer(simple_request())
        np.testing.assert_allclose(response.outputs["OUTPUT0"][0], A + B)
        assert not manager.stale

        manager.stale.append(before)
        streamed = [r async for r in core.stream_infer(simple_request())]
        assert len(streamed) == 1
        np.testing.assert_allclose(streamed[0].outputs["OUTPUT1"][0], A - B)
    finally:
        await manager.close()
