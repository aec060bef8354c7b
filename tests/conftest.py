"""Test-wide set-up.

``jobworker.grpcenv`` imports grpc with TLS 1.2 refused; importing it here, before any test
module imports grpc, gives every server started by the test process the production
handshake policy.
"""

import jobworker.grpcenv  # noqa: F401
