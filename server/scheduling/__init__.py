"""Scheduling: how requests become batches and batches reach model instances.

One module per scheduler (``dynamic_batcher``, ``sequence_batcher`` for stateful models, ``ensemble_scheduler``,
the pass-through ``scheduler``), the instances and the pool that runs them (``instances``), request deadlines (``deadlines``), the response cache in
front of a model's scheduler (``response_cache``), the check of a request against its model's config before it is
queued (``validation``), the callable through which ensembles and Python models reach other models
(``model_calls``: handed down by the repository, never imported from it), and ``generation/``: the engine that
serves language models with continuous batching. Schedulers know nothing of HTTP or gRPC: they take ``InferRequest`` objects and give back
``InferResponse`` objects. This package may import ``backends``, ``server.extensions``, ``server.config``,
``server.protocol`` and the base modules, never ``server.repository``, ``server.core`` or a front end.
"""
