"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``.

Laid out as vLLM's OpenAI front end is: ``protocol`` holds the pydantic request and response models of the wire,
one ``serving_*`` module per endpoint translates between them and ``server.core.InferenceServer`` (``generate`` for
text, ``infer`` for embeddings), ``errors`` gives every failure OpenAI's error shape, ``events`` streams
Server-Sent Events and ends a sequence when its client goes away, and ``app`` mounts it all under ``/v1`` on the HTTP
front end's port, behind an optional API key. Like the other front ends it may import any layer below it.
"""
