"""The model repository: finding models on disk, loading, reloading and unloading them, and checking them.

``discovery`` reads repository folders and version folders, ``watcher`` polls them, ``model_manager`` turns a
config into a running model (backend, instances, scheduler) and keeps its state, ``uploads`` stages model files sent
with a load request, ``warmup`` runs a model's warm-up requests, and ``validate`` checks a repository offline for
``modeldock validate``. This package may import ``server.scheduling`` and everything below it, never
``server.core`` or a front end.
"""
