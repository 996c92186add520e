"""Python backend (``backend: python``): serves a class defined in the version folder's ``model.py``."""

from backends.python.backend import InferenceRequest, PythonBackend

__all__ = ["InferenceRequest", "PythonBackend"]
