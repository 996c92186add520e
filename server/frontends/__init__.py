"""Front ends: the HTTP (FastAPI) and gRPC (grpcio) servers, translating their wire to the core and back.

A front end decodes with ``server.protocol``, asks ``server.core.InferenceServer``, and encodes the answer; it holds
no model logic, so every protocol question has one answer whichever wire asked it. What a front end checks before
it decodes anything (restricted API groups in ``restrictions``, HTTP sizes in ``http_guard``) lives here too, as
do the HTTP server programs that run the HTTP front end (``http_listener``: granian or uvicorn) and the bridge that
lets granian's RSGI interface carry the ASGI routes (``rsgi_bridge``).
Front ends may import any layer below them; only ``server.runtime`` and ``server.cli`` import them.
"""
