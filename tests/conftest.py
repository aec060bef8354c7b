"""Test-wide set-up.

``import jobworker`` imports jobworker.tls first, which imports grpc with TLS 1.2 refused;
doing it here, before any test module imports grpc, gives every server started by the test
process the production handshake policy.
"""

import jobworker  # noqa: F401
