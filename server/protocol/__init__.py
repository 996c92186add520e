"""The KServe v2 / Open Inference Protocol: datatypes, request/response types, and the codecs for both wires.

Both front ends (HTTP and gRPC) decode into and encode from the types here, so the rules of the protocol live in one
place. Tensors may arrive inline, as binary, or in a registered shared memory region, so the shared memory registry
lives here too, as do the parameters of a load request and what a generation request asks for and gets back
(``generation``: the same for the OpenAI routes, the generate extension and every text engine), with the rules every
engine applies to a prompt and to its completion's text (``chat_templates``, ``prompts``, ``stop_strings``). Every
layer above uses these types; this package imports only ``server.errors``.
"""
