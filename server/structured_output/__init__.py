"""Structured outputs: compiling what a request's text must match into a grammar, and masking tokens with it.

A request's ``StructuredOutputsParams`` (a JSON schema, any JSON object, a regex, a choice, an EBNF grammar or a
structural tag) is compiled once per tokenizer into a grammar (``compiler``); each constrained sequence gets its
own matcher (``matcher``) that says, before every decode step, which tokens may come next, and advances with the
token chosen. Engines only call these objects: no engine knows JSON Schema or regular expressions.

The grammar engine is xgrammar. It serves vLLM, SGLang and TensorRT-LLM, so a schema means here what it means
there; it reads JSON Schema, regex, EBNF (GBNF) and structural tags (free text with constrained tool calls inside,
which the OpenAI front end needs for tool calls) in one library; and its matcher fills a compact token bitmask
(one bit a token) that one call applies to a whole batch of logits rows, which keeps the cost per step small.
llguidance would do as well; xgrammar's field set matches vLLM's ``structured_outputs`` names one to one.

This package sits between ``server.extensions`` and ``backends`` in the layering: it may import ``server.errors``,
``server.protocol`` and ``server.config``, and ``backends`` and ``server.scheduling`` import it. It needs
xgrammar (the ``llm`` extra).
"""
