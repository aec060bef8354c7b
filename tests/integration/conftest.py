"""Shared set-up for integration tests.

jobworker.tls sets GRPC_SSL_CIPHER_SUITES before it imports grpc, and grpc reads it only
when first imported: importing it here, before any test module imports grpc, makes the
servers of this test process refuse TLS 1.2 as a production server does.
"""

import jobworker.tls  # noqa: F401
