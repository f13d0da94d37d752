"""Throw-away TLS material for a one-machine rehearsal or a test: a self-signed server certificate.

A real deployment uses certificates from its own CA (docs/deployment.md); this is what a test or
``127.0.0.1`` rehearsal uses instead.  Needs the ``cryptography`` package (installed with the
``flower`` extra).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence


def self_signed_certificate(hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                            days: int = 2) -> tuple[bytes, bytes]:
    """A PEM ``(certificate, private_key)`` pair valid for ``hosts`` (DNS names or IP addresses) for
    ``days``; the certificate is its own CA, so a client passes it as the root certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not hosts:
        raise ValueError("self_signed_certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
