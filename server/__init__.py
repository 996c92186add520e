"""ModelDock: serve models from a repository folder over the KServe v2 protocol.

The subpackages read as a request's path: ``frontends`` (HTTP, gRPC, OpenAI: wire translation only) → ``protocol``
(codecs and the request/response types every layer shares) → ``core`` (the one object that answers every
protocol question) → ``repository`` (configs found on disk, models loaded and unloaded) → ``scheduling`` (batchers,
schedulers, model instances) → ``backends`` (one runtime each). ``extensions`` (statistics, metrics, logging,
classification, tracing) sits beside that path. The modules left at this level tie the layers together (``cli``,
``runtime``, ``shutdown``, ``core`` with its ``admission``) or sit under all of them (``errors``, ``devices``,
``config``, ``worker_processes``).
``tests/test_layering.py`` holds the order and fails when a module imports from a layer above its own.
"""

__version__ = "0.1.0"
