"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/embeddings``,
``/v1/models`` and vLLM's ``/v1/tokenize`` and ``/v1/detokenize``.

Laid out as vLLM's OpenAI front end is: ``protocol`` holds the pydantic request and response models of the wire,
one ``serving_*`` module per endpoint translates between them and ``server.core.InferenceServer`` (``generate`` for
text, ``infer`` for embeddings), ``answer_format`` turns tools, tool choice and response formats into the engine's
structured outputs and picks the parsers that read the answer back (``tool_parsers/``, one module per model
family's format, and ``reasoning_parsers/``), ``logprobs`` writes the engine's log-probabilities in OpenAI's shapes,
``errors`` gives every failure OpenAI's error shape, ``events`` streams Server-Sent Events and ends a sequence when
its client goes away, and ``app`` mounts it all under ``/v1`` on the HTTP front end's port, behind an optional API
key. Like the other front ends it may import any layer below it.
"""
