"""Scheduling: how requests become batches and batches reach model instances.

One module per scheduler (``dynamic_batcher``, the pass-through ``scheduler``), the instances and the pool that
runs them (``instances``), request deadlines (``deadlines``), and the check of a request against its model's config before it is queued
(``validation``). Schedulers know nothing of HTTP or gRPC: they take ``InferRequest`` objects and give back
``InferResponse`` objects. This package may import ``backends``, ``server.extensions``, ``server.config``,
``server.protocol`` and the base modules, never ``server.repository``, ``server.core`` or a front end.
"""
