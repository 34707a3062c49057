"""Names the check an orchestrator's NNG certificate failed: NNG's dial only raises a
bare CryptoError, so probe the endpoint with Python's ssl under the same rules."""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass
from typing import Literal

Check = Literal["untrusted issuer", "host name mismatch", "expired", "not yet valid",
                "handshake failed"]

# OpenSSL's X509_V_ERR_* codes that are not about the chain; every other verification
# failure means the certificate does not chain to the pinned CA.
_HOST_CODES = {62, 63, 64}  # host name, e-mail, IP address mismatch
_EXPIRED, _NOT_YET_VALID = 10, 9


@dataclass(frozen=True, slots=True)
class TlsDiagnosis:
    """Which check failed, what the endpoint presented, and the operator's sentence."""

    check: Check
    endpoint: str  # host:port as dialled
    reason: str  # OpenSSL's words
    subject: str = ""  # the presented certificate, when it could be read
    issuer: str = ""
    names: tuple[str, ...] = ()  # its subjectAltName entries
    fingerprint: str = ""  # SHA-256 of the presented certificate

    @property
    def message(self) -> str:
        shown = (f"it presented a certificate for {self.subject or 'an unnamed subject'}"
                 f" ({', '.join(self.names) or 'no subjectAltName'}), issued by "
                 f"{self.issuer or 'an unnamed issuer'}, SHA-256 {self.fingerprint}")
        if self.check == "untrusted issuer":
            what = "its certificate does not chain to the pinned root CA (ca_fingerprint)"
            look = ("check that QPI_CA_FINGERPRINT is the orchestrator's current root CA and "
                    "that its NNG listener serves a certificate issued by that CA")
        elif self.check == "host name mismatch":
            what = (f"its certificate, from the pinned root CA, is not valid for the host "
                    f"name the driver dialled ({self.endpoint.rpartition(':')[0]})")
            look = ("check the nng_host the orchestrator advertises against the certificate's "
                    "subjectAltName entries")
        elif self.check in ("expired", "not yet valid"):
            what = f"its certificate is {self.check}"
            look = ("check the orchestrator's certificate dates, and this host's clock "
                    "(timedatectl)")
        else:
            return (f"the TLS handshake with the orchestrator's NNG endpoint {self.endpoint} "
                    f"failed ({self.reason}); check that the endpoint speaks TLS and that the "
                    "orchestrator and driver agree on the transport (insecure_tcp)")
        return (f"the orchestrator's NNG endpoint {self.endpoint} failed certificate "
                f"verification: {what} ({self.reason}); {shown}. The connection may be "
                f"intercepted, or the orchestrator's certificate is misconfigured; nothing was "
                f"sent over it. {look[0].upper()}{look[1:]}; the driver keeps retrying (a "
                "certificate rotation in progress can cause this)")


def diagnose(host: str, port: int, ca_pem: str, timeout: float = 5.0) -> TlsDiagnosis | None:
    """Probe host:port as NNG's TLS client does (chain to `ca_pem`, name `host`). None
    when the certificate passes, or when the endpoint cannot be reached to tell."""
    # Only the pinned CA (cadata skips the system's), host name checked: NNG's rules.
    context = ssl.create_default_context(cadata=ca_pem)
    endpoint = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        code = exc.verify_code
        if code in _HOST_CODES:
            check: Check = "host name mismatch"
        elif code == _EXPIRED:
            check = "expired"
        elif code == _NOT_YET_VALID:
            check = "not yet valid"
        else:
            check = "untrusted issuer"
        return _described(check, endpoint, exc.verify_message or str(exc), host, port, timeout)
    except ssl.SSLError as exc:
        return TlsDiagnosis("handshake failed", endpoint, exc.reason or str(exc))
    except OSError:
        return None  # refused, reset, timed out: not a certificate problem to name


def _described(check: Check, endpoint: str, reason: str, host: str, port: int,
               timeout: float) -> TlsDiagnosis:
    """The verdict plus what the endpoint presented, read without verifying it."""
    der = _presented(host, port, timeout)
    if der is None:
        return TlsDiagnosis(check, endpoint, reason)
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(v) for v in alt.get_values_for_type(x509.DNSName)) + tuple(
            str(v) for v in alt.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = ()
    return TlsDiagnosis(check, endpoint, reason, subject=cert.subject.rfc4514_string(),
                        issuer=cert.issuer.rfc4514_string(), names=names,
                        fingerprint=hashlib.sha256(der).hexdigest())


def _presented(host: str, port: int, timeout: float) -> bytes | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to read and show it; nothing is sent
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
