"""Who is calling: the identity a client proved with its TLS certificate.

The identity comes only from the certificate grpc verified during the handshake
(``x509_pem_cert`` in ``context.auth_context()``), parsed here with ``cryptography``.
Nothing a client sends in metadata or in a request can change it, and grpc's own
string renderings of the names (which stop at a NUL byte) are never used.

The names, in the order a whitelist is matched (docs/security.md, "Identity"): the
subject common name, then the subject alternative names of type DNS, e-mail (rfc822) and
URI, in the order the certificate lists them. IP addresses and other SAN types are not
names. A certificate is refused (UNAUTHENTICATED) when a name holds a control character
(a NUL byte included), when it has several common names, when it is a CA
(``basicConstraints CA:TRUE``), or when it has an extended key usage extension without
``clientAuth``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.errors import Unauthenticated

#: The SAN types whose values are names a whitelist entry may match, in no particular
#: order: the certificate's own order decides.
_NAME_TYPES = (x509.DNSName, x509.RFC822Name, x509.UniformResourceIdentifier)


def _names_are_present(instance: Identity, attribute: attrs.Attribute[str], value: str) -> None:
    if not value and not instance.sans:
        raise ValueError("an identity needs a common name or at least one subject alt name")


def _as_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class Identity:
    """The names of a verified client certificate.

    ``sans`` holds the subject alternative names that are names (DNS names, e-mail
    addresses and URIs), as text, in certificate order.
    """

    common_name: str = attrs.field(validator=_names_are_present)
    sans: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)

    @property
    def name(self) -> str:
        """The name to show: the CN, or the first SAN without one."""
        return self.common_name or self.sans[0]

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a whitelist entry may match, in matching order: the CN (if any), then
        the SANs, once each."""
        cn = (self.common_name,) if self.common_name else ()
        return tuple(dict.fromkeys(cn + self.sans))


def _shown(name: str) -> str:
    """A hostile name, safe for a log line or an error message."""
    return name.encode("unicode_escape").decode("ascii")[:200]


def _check_name(name: str, what: str) -> str:
    if not name.isprintable():
        raise Unauthenticated(
            f"client certificate {what} '{_shown(name)}' holds a control character: "
            "names must be printable; ask for a new certificate"
        )
    return name


def _check_usage(cert: x509.Certificate) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        pass
    else:
        if constraints.ca:
            raise Unauthenticated(
                "the client certificate is a CA certificate (CA:TRUE): use a leaf "
                "certificate issued for client authentication"
            )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise Unauthenticated(
            "the client certificate's extended key usage does not include clientAuth: "
            "ask for a certificate issued for client authentication"
        )


@functools.lru_cache(maxsize=1024)
def identity_from_certificate(pem: bytes) -> Identity:
    """The identity of a PEM client certificate grpc verified; raises ``Unauthenticated``
    as the module docstring says. Cached: every RPC of a connection brings the same PEM."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise Unauthenticated("the client certificate could not be parsed") from None
    _check_usage(cert)
    try:
        attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_names = [_check_name(str(a.value), "common name") for a in attributes]
    except ValueError:
        raise Unauthenticated("the client certificate's subject could not be parsed") from None
    if len(common_names) > 1:
        raise Unauthenticated("the client certificate has more than one common name")
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        general_names: Sequence[x509.GeneralName] = list(extension.value)
    except x509.ExtensionNotFound:
        general_names = []
    except ValueError:
        raise Unauthenticated("the client certificate's alt names could not be parsed") from None
    sans = tuple(
        _check_name(str(n.value), "subject alt name")
        for n in general_names
        if isinstance(n, _NAME_TYPES)
    )
    common_name = common_names[0] if common_names else ""
    if not common_name and not sans:
        raise Unauthenticated("client certificate has neither a common name nor a subject alt name")
    return Identity(common_name=common_name, sans=sans)


def identity_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
    """Build the caller's identity from ``context.auth_context()``.

    Raises ``Unauthenticated`` when the peer presented no verified certificate (a
    plaintext or server-only TLS connection), or a certificate refused as the module
    docstring says.
    """
    is_tls = tuple(auth_context.get("transport_security_type", ())) == (b"ssl",)
    if not is_tls or not auth_context.get("x509_pem_cert"):
        raise Unauthenticated(
            "no verified client certificate: connect with mutual TLS and a certificate "
            "issued by the server's CA"
        )
    return identity_from_certificate(auth_context["x509_pem_cert"][0])
