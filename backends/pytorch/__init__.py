"""PyTorch backend (``backend: pytorch``): TorchScript, torch.export programs and eager modules with safetensors.

Importing this package imports torch; the server imports it only when a model names this backend, so a core
install without torch still serves every other model and reports how to install the extra for this one.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:
    raise ImportError(f'the pytorch backend needs torch ({exc}): pip install "modeldock[torch]"') from exc

from backends.pytorch.backend import PyTorchBackend

__all__ = ["PyTorchBackend"]
