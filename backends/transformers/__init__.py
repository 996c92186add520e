"""Hugging Face transformers backend (``backend: transformers``): language models for generation and embeddings.

Importing this package imports torch and transformers; the server imports it only when a model names this
backend, so a core install without them still serves every other model and reports how to install the extra.
"""

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f'the transformers backend needs torch and transformers ({exc}): pip install "modeldock[llm]"'
    ) from exc

from backends.transformers.backend import TransformersBackend

__all__ = ["TransformersBackend"]
