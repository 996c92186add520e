"""ONNX Runtime backend (``backend: onnxruntime``)."""

from backends.onnxruntime.backend import OnnxRuntimeBackend

__all__ = ["OnnxRuntimeBackend"]
