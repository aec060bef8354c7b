"""grpc, imported with the process-wide settings jobworker needs; import grpc from here.

grpc's C core reads some settings from the environment once, when grpc is first imported,
and applies them to every connection of the process:

* ``GRPC_SSL_CIPHER_SUITES`` restricted to :data:`TLS12_REFUSING_CIPHER_SUITES`, the way
  jobworker refuses TLS 1.2 (grpcio's Python API cannot set a minimum version,
  grpc/grpc#37305; see :mod:`jobworker.api.tls` and docs/security.md);
* ``GRPC_VERBOSITY`` ``ERROR`` unless set, so the C core does not print INFO lines (such as
  the handshake failure of our own TLS 1.2 probe) in the middle of our JSON logs.

This works only when this module is the first to import grpc in the process, so every
jobworker module that uses grpc imports it from here, first (``tls.server_credentials``
detects the other case). The previous values are restored straight after, so that the
processes we spawn (jobs) do not inherit them. Nothing else imports this module: plugin
authors' ``import jobworker`` stays free of grpc.
"""

from __future__ import annotations

import os

TLS12_REFUSING_CIPHER_SUITES = "ECDHE-PSK-CHACHA20-POLY1305"
"""The only TLS 1.2 suite grpc may use: a PSK suite, and the server has no PSK, so every
TLS 1.2 handshake fails with NO_SHARED_CIPHER. TLS 1.3 suites are not configurable and
stay enabled."""

CIPHER_SUITES_VAR = "GRPC_SSL_CIPHER_SUITES"

_GRPC_IMPORT_ENV = {
    CIPHER_SUITES_VAR: TLS12_REFUSING_CIPHER_SUITES,
    "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR"),
}
_previous_env = {name: os.environ.get(name) for name in _GRPC_IMPORT_ENV}
os.environ.update(_GRPC_IMPORT_ENV)

import grpc  # noqa: E402

for _name, _value in _previous_env.items():
    if _value is None:
        del os.environ[_name]
    else:
        os.environ[_name] = _value

__all__ = ["CIPHER_SUITES_VAR", "TLS12_REFUSING_CIPHER_SUITES", "grpc"]
