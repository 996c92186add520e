"""Which accelerators this process can use, without importing a deep-learning framework to find out."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Device:
    """Where one model instance runs: ``cpu`` or ``cuda:<index>``."""

    kind: str  # "cpu" or "gpu"
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"


CPU = Device("cpu")


@functools.cache
def gpu_count() -> int:
    """Number of visible NVIDIA GPUs: the driver's device nodes, narrowed by ``CUDA_VISIBLE_DEVICES``."""
    nodes = [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return len(nodes)
    ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    return min(len(ids), len(nodes))
