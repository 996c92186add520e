"""A test backend whose batches take a known time, for checking scheduling rather than arithmetic.

The server under test loads it with ``backend: tests.slow_backend:SleepBackend`` (the test server runs from the
checkout root, so ``tests`` is importable there).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from backends.base import Backend
from server.config import ModelConfig
from server.devices import Device


class SleepBackend(Backend):
    """Sleeps ``parameters.sleep_ms`` per batch (releasing the GIL, as real backends do) and returns 2 * INPUT.

    With ``parameters.sleep_from_input: true`` a batch sleeps as many milliseconds as its first input value, so a
    test can make one batch outlast another. A batch with a negative input value fails, as a backend bug would.
    """

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        self.sleep_s = float(config.parameters.get("sleep_ms", "0")) / 1000
        self.sleep_from_input = config.bool_parameter("sleep_from_input", False)
        # Shape of INPUT in every executed batch, in execution order.
        self.batches: list[tuple[int, ...]] = []

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        self.batches.append(tuple(inputs["INPUT"].shape))
        if (inputs["INPUT"] < 0).any():
            raise ValueError("negative input")
        time.sleep(float(inputs["INPUT"].flat[0]) / 1000 if self.sleep_from_input else self.sleep_s)
        return {"OUTPUT": inputs["INPUT"] * 2}
