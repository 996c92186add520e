"""The KServe v2 / Open Inference Protocol: datatypes, request/response types and the tensor codec.

Both front ends (HTTP and gRPC) decode into and encode from the types here, so the rules of the protocol live in
one place.
"""
