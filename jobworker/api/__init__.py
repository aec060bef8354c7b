"""The gRPC edge: the server, the servicer, protobuf translation, TLS and caller identity.

Protobuf stops here: everything below sees the domain model (:mod:`jobworker.model`).
"""
