"""TensorRT backend (``backend: tensorrt``); ``tensorrt`` itself is imported only when such a model loads."""

from backends.tensorrt.backend import TensorRTBackend

__all__ = ["TensorRTBackend"]
