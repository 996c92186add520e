"""Diffusers backend (``backend: diffusers``): text-to-image pipelines saved with ``save_pretrained``.

Importing this package imports torch and diffusers; the server imports it only when a model names this backend,
so a core install without them still serves every other model and reports how to install the extra. It may import
``backends.base``, ``server.config``, ``server.errors``, ``server.devices`` and ``server.extensions``.
"""

try:
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f'the diffusers backend needs torch, transformers and diffusers ({exc}): pip install "modeldock[diffusers]"'
    ) from exc

from backends.diffusers.backend import DiffusersBackend

__all__ = ["DiffusersBackend"]
