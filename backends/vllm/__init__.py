"""``backend: vllm``: language models served by vLLM's engine (tensor and pipeline parallelism, quantized
checkpoints, LoRA adapters, prefix caching) behind every ModelDock API.

Holds the backend (``backend``), the translation of config parameters into vLLM's engine arguments
(``engine_args``), of ModelDock's sampling and output types into vLLM's (``translation``), of chat messages with
images into a vision-language model's multi-modal prompt (``image_chat``), and the stat logger that feeds vLLM's
scheduler figures into ModelDock's metrics (``engine_stats``). Like every backend it may import
``backends.base`` and the ``server`` layers below the schedulers (config, errors, devices, protocol, extensions);
vLLM itself is imported only when a model using it loads, so this package imports without it.
"""

from backends.vllm.backend import VllmBackend

__all__ = ["VllmBackend"]
