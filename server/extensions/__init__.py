"""Triton's extensions beside the request path: statistics, Prometheus metrics, log settings, classification,
tracing (OpenTelemetry).

The schedulers and the core record into these; the front ends only read them out. They may import
``server.config``, ``server.protocol`` and the base modules, and nothing above (no scheduling, repository, core or
front end), so any layer can record into them.
"""
