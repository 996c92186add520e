"""The one process-wide lock under which backends import and build their frameworks (torch, transformers,
diffusers, vLLM) on the server's loading threads.

The server loads models concurrently, each on a thread of its own. torch's lazily imported parts (``torch._dynamo``,
``torch._inductor``, ``torch.export``) import one another in cycles, and they are first imported from several places
at once: ``torch.export.load``, ``torch.compile``, transformers' and diffusers' ``from_pretrained`` and ``import
vllm``. When two threads enter such a cycle from different modules, each waits for a module the other is still
initialising; Python's import system breaks that deadlock by handing one thread the partly initialised module, and
its load fails ("cannot import name ... from partially initialized module", ``KeyError: 'torch._dynamo'``). A lock
per backend does not help, since the two threads usually belong to different backends (a pytorch model's
``torch.export.load`` against the vllm backend's ``import vllm``), so every backend shares this one: backend modules
are imported under it (``backends.base.backend_class``), backends build their models under it, and the vllm backend
imports vLLM under it. It is reentrant because a backend holding it may import another backend's module. Work that
runs long without importing torch's lazy parts (a model's config and files read, a vLLM engine process starting,
inference) does not take it, so loads still overlap there and an ONNX model is not held up by a torch one.
"""

from __future__ import annotations

import threading

FRAMEWORK_LOCK = threading.RLock()
