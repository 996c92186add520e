"""ModelDock: serve models from a repository folder over the KServe v2 protocol."""

__version__ = "0.1.0"
