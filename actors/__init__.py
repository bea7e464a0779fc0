"""Shells around the core: Ray actors, the drafter gRPC server and client, and the protobuf codec."""
