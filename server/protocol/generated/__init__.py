"""Protobuf / gRPC stubs generated from protos/*.proto by protos/generate.py; do not edit by hand."""
