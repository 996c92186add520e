"""How a scheduler or an instance reaches another served model without knowing the repository.

Ensembles run their steps, and Python models make their own calls (Triton's BLS), through the model manager so
that each call goes through the called model's own scheduler, batcher and instances. The repository layer sits
above scheduling, so it hands this callable down rather than scheduling importing it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from server.protocol.types import InferRequest, InferResponse

# Runs ``request`` on the model and version it names (``model_version`` "" for the newest ready one) exactly as a
# client's request would run, and returns its response or raises the called model's error.
ModelCaller = Callable[[InferRequest], Awaitable[InferResponse]]
