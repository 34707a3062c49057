"""Root-CA pinning (protocol §2) and, for the embedded orchestrator, a throwaway
CA and server certificate generated in memory at start."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes


class FingerprintMismatch(Exception):
    """The downloaded root CA is not the one configured: possible interception."""


def fingerprint_of_pem(pem: str) -> str:
    """SHA-256 (hex, lower case) over the DER form of a PEM certificate; anything that
    does not parse as an X.509 certificate is refused."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except (ValueError, TypeError, UnicodeError) as exc:
        raise FingerprintMismatch(
            f"the orchestrator's root CA is not a PEM X.509 certificate: {exc}"
        ) from None
    return cert.fingerprint(hashes.SHA256()).hex()


def normalise(fingerprint: str) -> str:
    return fingerprint.replace(":", "").strip().lower()


def verify_pinned(pem: str, expected: str, source: str) -> None:
    actual = fingerprint_of_pem(pem)
    if actual != normalise(expected):
        raise FingerprintMismatch(
            f"root CA served by {source} has SHA-256 {actual}, but the pinned fingerprint is "
            f"{normalise(expected)}: the connection may be intercepted; refusing to connect. "
            "If the orchestrator's CA was rotated on purpose, update QPI_CA_FINGERPRINT."
        )


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    ca_pem: str
    cert_pem: str
    key_pem: str

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint_of_pem(self.ca_pem)


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A throwaway root CA that can issue server certificates (local mode, and tests
    that need a certificate from the right CA for the wrong host)."""

    cert_pem: str
    key_pem: str

    @classmethod
    def generate(cls, common_name: str = "qpi-driver local root CA") -> CertificateAuthority:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(cert_pem=_pem(cert), key_pem=_key_pem(key))

    def issue(self, names: list[str], common_name: str | None = None) -> ServerIdentity:
        """A server certificate for `names` (DNS names or IP addresses), valid a week."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        ca_cert = x509.load_pem_x509_certificate(self.cert_pem.encode())
        ca_key = serialization.load_pem_private_key(self.key_pem.encode(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or names[0])])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return ServerIdentity(ca_pem=self.cert_pem, cert_pem=_pem(cert), key_pem=_key_pem(key))


def generate_identity(host: str) -> ServerIdentity:
    """A fresh CA and a server certificate for `host` (and localhost), valid for a week."""
    return CertificateAuthority.generate().issue(
        ["localhost", host] if host != "localhost" else ["localhost"], common_name=host
    )


def _pem(cert: object) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    assert isinstance(cert, x509.Certificate)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: object) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
