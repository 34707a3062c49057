"""Root-CA pinning (protocol §2) and, for the embedded orchestrator, a throwaway
CA and server certificate generated in memory at start."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass


class FingerprintMismatch(Exception):
    """The downloaded root CA is not the one configured: possible interception."""


def fingerprint_of_pem(pem: str) -> str:
    """SHA-256 (hex, lower case) over the DER form of a PEM certificate."""
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except (ValueError, TypeError) as exc:
        raise FingerprintMismatch(
            f"the orchestrator's root CA is not a PEM certificate: {exc}"
        ) from None
    return hashlib.sha256(der).hexdigest()


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


def generate_identity(host: str) -> ServerIdentity:
    """A fresh CA and a server certificate for `host`, valid for a week."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qpi-driver local root CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ServerIdentity(
        ca_pem=ca_cert.public_bytes(pem).decode(),
        cert_pem=cert.public_bytes(pem).decode(),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    )
