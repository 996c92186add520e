"""llama.cpp backend (``backend: llamacpp``): GGUF language models through llama-cpp-python, token by token.

It holds the backend (one llama.cpp context and thread per instance, a bounded queue), how config.yaml's
``parameters`` become ``llama_cpp.Llama``'s arguments, how sampling parameters and structured outputs become
llama.cpp's sampler chain and GBNF grammars, the GGUF file's tokenizer and chat template, and the incremental text
of a completion. Like every backend it may import ``server.config``, ``server.protocol``, ``server.extensions``,
``server.errors`` and ``server.devices``, and nothing above them. Importing it imports llama_cpp; the server
imports it only when a model names this backend, so without the extra the config is refused with the pip command
to run and every other model still serves.
"""

try:
    import llama_cpp  # noqa: F401
except (ImportError, OSError) as exc:  # OSError: the package is there but its shared library cannot be loaded
    raise ImportError(
        f'the llamacpp backend needs llama-cpp-python ({exc}): pip install "modeldock[llamacpp]"'
    ) from exc

from backends.llamacpp.backend import LlamaCppBackend

__all__ = ["LlamaCppBackend"]
