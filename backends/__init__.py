"""Model backends: one package per runtime, each behind the interface in ``backends.base``.

A backend gets a whole batch as a dict of numpy arrays and returns one; it knows nothing of HTTP, gRPC, batching
or the repository. Backends may import ``server.config``, ``server.protocol``, ``server.extensions`` and the base
modules (``server.errors``, ``server.devices``, ``server.worker_processes``); ``server.scheduling`` is the lowest
layer that imports them.
"""
