"""What the server's report_data commits to: the client's fresh nonce and the public key of the server's TLS
certificate, so that evidence can be neither replayed to another client nor relayed through another TLS endpoint."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

NONCE_LEN = 32
# a fixed, versioned tag: this hash can never be mistaken for another protocol's use of report_data
BINDING_TAG = b"hediff-confidential-backend/report-data/v1\x00"


def tls_key_digest(certificate_der: bytes) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (DER): the key, not the certificate, so that a renewed
    certificate over the same key keeps its binding."""
    cert = x509.load_der_x509_certificate(certificate_der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def check_nonce(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise ValueError(
            f"the attestation nonce must be {NONCE_LEN} bytes ({2 * NONCE_LEN} hex digits), got {len(nonce)}"
        )
    return nonce


def report_data_for(nonce: bytes, tls_key_sha256: bytes) -> bytes:
    """The 64 bytes the server asks the TEE to sign: SHA-512(tag || nonce || SHA-256(TLS SPKI))."""
    if len(tls_key_sha256) != 32:
        raise ValueError(f"the TLS key digest must be 32 bytes (SHA-256), got {len(tls_key_sha256)}")
    return hashlib.sha512(BINDING_TAG + check_nonce(nonce) + tls_key_sha256).digest()
