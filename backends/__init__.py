"""Model backends: one package per runtime, each behind the interface in ``backends.base``."""
