"""Who is calling: the identity a client proved with its TLS certificate.

The identity comes only from grpc's auth context, which grpc fills from the client
certificate it verified during the handshake. Nothing a client sends in metadata or in a
request can change it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from jobworker.errors import Unauthenticated


def _names_are_present(instance: Identity, attribute: attrs.Attribute[str], value: str) -> None:
    if not value and not instance.sans:
        raise ValueError("an identity needs a common name or at least one subject alt name")


def _as_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class Identity:
    """The names of a verified client certificate.

    ``sans`` holds every subject alternative name grpc reports (DNS names, e-mail
    addresses, URIs and IP addresses, as text).
    """

    common_name: str = attrs.field(validator=_names_are_present)
    sans: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)

    @property
    def name(self) -> str:
        """The name to show and to own jobs by: the CN, or the first SAN without one."""
        return self.common_name or self.sans[0]

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a whitelist entry may match: the CN (if any), then the SANs, once each."""
        cn = (self.common_name,) if self.common_name else ()
        return tuple(dict.fromkeys(cn + self.sans))


def _decode(values: Sequence[bytes], prop: str) -> tuple[str, ...]:
    try:
        return tuple(value.decode("utf-8") for value in values)
    except UnicodeDecodeError:
        raise Unauthenticated(f"client certificate {prop} is not valid UTF-8") from None


def identity_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
    """Build the caller's identity from ``context.auth_context()``.

    Raises ``Unauthenticated`` when the peer presented no verified certificate (a
    plaintext or server-only TLS connection) or a certificate without any name.
    """
    is_tls = tuple(auth_context.get("transport_security_type", ())) == (b"ssl",)
    if not is_tls or not auth_context.get("x509_pem_cert"):
        raise Unauthenticated(
            "no verified client certificate: connect with mutual TLS and a certificate "
            "issued by the server's CA"
        )
    common_names = _decode(auth_context.get("x509_common_name", ()), "common name")
    sans = _decode(auth_context.get("x509_subject_alternative_name", ()), "subject alt name")
    common_name = common_names[0] if common_names else ""
    if not common_name and not sans:
        raise Unauthenticated("client certificate has neither a common name nor a subject alt name")
    return Identity(common_name=common_name, sans=sans)
