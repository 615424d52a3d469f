"""Verifying an SEV-SNP attestation report: the report's signature under the VCEK, the chain VCEK <- ASK <- ARK up to
a pinned AMD root, the VCEK's binding to the reporting chip and TCB, then the relying party's policy. The first
check that fails raises AttestationError naming it; nothing is returned unless every check held."""

from __future__ import annotations

import datetime
import hashlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from hediff.common.attest.roots import AMD_PRODUCTS
from hediff.common.attest.snp import SIGNING_KEY_NAMES, SIGNING_KEY_VCEK, ReportFormatError, SnpReport, Tcb
from hediff.common.errors import EXIT_ATTESTATION, HEDiffusionError

# AMD's VCEK certificate extensions (AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
# Specification")
OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
OID_HW_ID = "1.3.6.1.4.1.3704.1.4"


class AttestationError(HEDiffusionError):
    """Evidence that does not verify. ``check`` names the failed check; the message says why, in one line."""

    exit_code = EXIT_ATTESTATION

    def __init__(self, check: str, reason: str):
        super().__init__(reason)
        self.check, self.reason = check, reason


@dataclass(frozen=True)
class TrustedRoot:
    """An ARK the verifier accepts (pinned by the SHA-256 of its DER) and the ASK it uses when none is given."""

    name: str
    ark_der: bytes
    ask_der: bytes

    @property
    def ark_sha256(self) -> str:
        return hashlib.sha256(self.ark_der).hexdigest()


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """A certificate from DER or PEM bytes; ``what`` names it in the error."""
    with warnings.catch_warnings():
        # AMD's KDS issues VCEKs with serial number 0, which RFC 5280 forbids; cryptography warns (and says it will
        # refuse them one day). The serial plays no part in this verification, so the warning is noise here.
        warnings.simplefilter("ignore")
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except ValueError as e:
            raise AttestationError("certificate", f"the {what} is not a DER or PEM X.509 certificate ({e})") from None


def amd_roots() -> tuple[TrustedRoot, ...]:
    """AMD's pinned roots (Milan, Genoa, Turin). A built-in certificate whose hash is not its pin is refused."""
    roots = []
    for product in AMD_PRODUCTS:
        ark = load_certificate(product.ark_pem.encode(), f"built-in {product.name} ARK")
        ask = load_certificate(product.ask_pem.encode(), f"built-in {product.name} ASK")
        root = TrustedRoot(product.name, _der(ark), _der(ask))
        if root.ark_sha256 != product.ark_sha256 or hashlib.sha256(root.ask_der).hexdigest() != product.ask_sha256:
            raise AttestationError("pinned_root", f"the built-in {product.name} certificates do not match their pins")
        roots.append(root)
    return tuple(roots)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


@dataclass(frozen=True)
class Policy:
    """What the relying party accepts. ``measurements`` empty means the launch measurement is NOT checked (the
    result says so); ``report_data`` None means report_data is not checked."""

    measurements: frozenset[bytes] = frozenset()
    report_data: bytes | None = None
    allow_debug: bool = False
    min_tcb: Tcb | None = None
    max_vmpl: int = 0

    @staticmethod
    def parse_measurements(values: Iterable[str]) -> frozenset[bytes]:
        """Hex launch measurements (48 bytes each), as users and operators write them."""
        out = set()
        for text in values:
            try:
                value = bytes.fromhex(text.strip().removeprefix("0x"))
            except ValueError:
                raise ValueError(
                    f"measurement {text!r} is not hex: give the 96 hex digits of the launch digest"
                ) from None
            if len(value) != 48:
                raise ValueError(f"measurement {text!r} is {len(value)} bytes; an SEV-SNP launch digest is 48 (96 hex)")
            out.add(value)
        return frozenset(out)


@dataclass(frozen=True)
class VerifiedReport:
    """The fields of a report that passed every check; only ever made by verify_snp_report."""

    product: str
    report: SnpReport
    measurement_checked: bool
    report_data_checked: bool
    checks: tuple[str, ...] = field(default=())

    def fields(self) -> dict[str, Any]:
        r = self.report
        return {
            "product": self.product,
            "version": r.version,
            "measurement": r.measurement.hex(),
            "measurement_checked": self.measurement_checked,
            "report_data": r.report_data.hex(),
            "report_data_checked": self.report_data_checked,
            "policy": hex(r.policy),
            "debug_allowed": r.debug_allowed,
            "vmpl": r.vmpl,
            "guest_svn": r.guest_svn,
            "reported_tcb": str(r.reported_tcb),
            "current_tcb": str(r.current_tcb),
            "chip_id": r.chip_id.hex(),
            "host_data": r.host_data.hex(),
            "id_key_digest": r.id_key_digest.hex(),
            "author_key_digest": r.author_key_digest.hex(),
            "checks": list(self.checks),
        }


def _verify_pss(subject: x509.Certificate, issuer: x509.Certificate, leg: str) -> None:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError("chain", f"certificate chain broken at {leg}: the issuer's key is not RSA")
    try:
        # AMD signs its chain with RSASSA-PSS, SHA-384, MGF1-SHA-384, 48-byte salt
        key.verify(
            subject.signature,
            subject.tbs_certificate_bytes,
            padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
            hashes.SHA384(),
        )
    except InvalidSignature:
        raise AttestationError("chain", f"certificate chain broken at {leg}: the signature does not verify") from None


def _check_validity(cert: x509.Certificate, what: str, now: datetime.datetime) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AttestationError(
            "chain",
            f"the {what} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
            f"not at {now:%Y-%m-%d %H:%M} UTC",
        )


def _extension(cert: x509.Certificate, oid: str) -> bytes:
    try:
        value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        raise AttestationError("vcek_binding", f"the VCEK lacks AMD's extension {oid}: it is not an AMD VCEK") from None
    return value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()


def _der_payload(value: bytes, tag: int, oid: str) -> bytes:
    """The contents of a single DER TLV with the given tag (short or long length form)."""
    if len(value) >= 2 and value[0] == tag:
        length, start = value[1], 2
        if length & 0x80:
            count = length & 0x7F
            length, start = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
        if start + length == len(value):
            return value[start:]
    raise AttestationError("vcek_binding", f"the VCEK's extension {oid} is not well-formed DER")


def _vcek_tcb(vcek: x509.Certificate, zen5: bool) -> Tcb:
    def spl(oid: str) -> int:
        return int.from_bytes(_der_payload(_extension(vcek, oid), 0x02, oid), "big")

    return Tcb(
        boot_loader=spl(OID_BL_SPL),
        tee=spl(OID_TEE_SPL),
        snp=spl(OID_SNP_SPL),
        microcode=spl(OID_UCODE_SPL),
        fmc=spl(OID_FMC_SPL) if zen5 else 0,
    )


def _select_root(
    vcek: x509.Certificate, ask_der: bytes | None, ark_der: bytes | None, roots: tuple[TrustedRoot, ...]
) -> tuple[str, x509.Certificate, x509.Certificate]:
    if ark_der is not None:
        digest = hashlib.sha256(_der(load_certificate(ark_der, "ARK"))).hexdigest()
        pinned = [r for r in roots if r.ark_sha256 == digest]
        if not pinned:
            raise AttestationError(
                "pinned_root",
                f"the ARK given (SHA-256 {digest}) is not one of the pinned AMD roots "
                f"({', '.join(r.name for r in roots)}); omit --ark to use the built-in chain",
            )
        root = pinned[0]
    else:
        # the root whose ASK issued this VCEK (VCEK issuer is e.g. "SEV-Milan", the ASK's subject)
        matching = [r for r in roots if load_certificate(r.ask_der, "ASK").subject == vcek.issuer]
        if not matching:
            raise AttestationError(
                "chain",
                f"the VCEK's issuer ({vcek.issuer.rfc4514_string()}) is none of the pinned AMD ASKs "
                f"({', '.join(r.name for r in roots)})",
            )
        root = matching[0]
    ask = load_certificate(ask_der if ask_der is not None else root.ask_der, "ASK")
    return root.name, ask, load_certificate(root.ark_der, "ARK")


def verify_vcek_chain(
    vcek: x509.Certificate,
    ask_der: bytes | None,
    ark_der: bytes | None,
    roots: tuple[TrustedRoot, ...],
    now: datetime.datetime,
) -> str:
    """VCEK <- ASK <- ARK (RSA-PSS), each valid at ``now``, up to a pinned root; returns the root's product name."""
    product, ask, ark = _select_root(vcek, ask_der, ark_der, roots)
    _verify_pss(ark, ark, "ARK (self-signature)")
    _verify_pss(ask, ark, "ASK (signed by the ARK)")
    _verify_pss(vcek, ask, "VCEK (signed by the ASK)")
    for cert, what in ((ark, "ARK"), (ask, "ASK"), (vcek, "VCEK")):
        _check_validity(cert, what, now)
    return product


def verify_snp_report(
    report_bytes: bytes,
    vcek_der: bytes,
    *,
    ask_der: bytes | None = None,
    ark_der: bytes | None = None,
    policy: Policy | None = None,
    roots: tuple[TrustedRoot, ...] | None = None,
    now: datetime.datetime | None = None,
) -> VerifiedReport:
    """Every check, in order; raises AttestationError at the first that fails.

    ``roots`` defaults to AMD's pinned roots; only tests pass their own (it is never read from the network or a
    file). ``ask_der``/``ark_der`` default to the pinned root's own; a given ARK must hash to a pinned one.
    """
    policy = policy or Policy()
    roots = amd_roots() if roots is None else roots
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        report = SnpReport.parse(report_bytes)
    except ReportFormatError as e:
        raise AttestationError("format", str(e)) from None
    if report.signing_key != SIGNING_KEY_VCEK:
        name = SIGNING_KEY_NAMES.get(report.signing_key, str(report.signing_key))
        raise AttestationError(
            "format", f"the report is signed by the {name} key; only VCEK-signed reports are verified"
        )

    vcek = load_certificate(vcek_der, "VCEK")
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError("signature", "the VCEK's public key is not an ECDSA P-384 key")
    try:
        key.verify(
            encode_dss_signature(report.signature_r, report.signature_s),
            report.signed_bytes,
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature:
        raise AttestationError(
            "signature", "the report's signature does not verify under this VCEK (altered report or another key)"
        ) from None

    product = verify_vcek_chain(vcek, ask_der, ark_der, roots, now)

    hw_id = _extension(vcek, OID_HW_ID)  # raw octets: the extension value is the chip id itself
    # Turin VCEKs carry an 8-byte hwID; the report's 64-byte chip_id holds it followed by zeros
    if hw_id != report.chip_id[: len(hw_id)] or any(report.chip_id[len(hw_id) :]) or not any(hw_id):
        raise AttestationError(
            "vcek_binding", "the VCEK belongs to another chip than the one that produced the report (hwID != chip_id)"
        )
    vcek_tcb = _vcek_tcb(vcek, report.zen5)
    if vcek_tcb != report.reported_tcb:
        raise AttestationError(
            "vcek_binding",
            f"the VCEK was issued for TCB {vcek_tcb}, the report claims {report.reported_tcb}: fetch the VCEK for the "
            "report's reported TCB",
        )

    checks = ["report signature (VCEK)", f"chain VCEK <- ASK <- ARK ({product}, pinned)", "VCEK chip and TCB"]
    checks += _check_policy(report, policy)
    return VerifiedReport(
        product=product,
        report=report,
        measurement_checked=bool(policy.measurements),
        report_data_checked=policy.report_data is not None,
        checks=tuple(checks),
    )


def _check_policy(report: SnpReport, policy: Policy) -> list[str]:
    passed = []
    if report.debug_allowed and not policy.allow_debug:
        raise AttestationError(
            "debug",
            f"the guest policy ({hex(report.policy)}) allows debugging, so its host can read the guest's memory; "
            "refused (allow it only for testing, with --allow-debug)",
        )
    passed.append("debug " + ("allowed by policy" if report.debug_allowed else "off"))
    if report.vmpl > policy.max_vmpl:
        raise AttestationError("vmpl", f"the report was requested at VMPL {report.vmpl}, above {policy.max_vmpl}")
    if policy.min_tcb is not None:
        if not report.reported_tcb.meets(policy.min_tcb):
            raise AttestationError(
                "tcb", f"the platform's reported TCB ({report.reported_tcb}) is below the floor ({policy.min_tcb})"
            )
        passed.append(f"TCB >= {policy.min_tcb}")
    if policy.measurements:
        if report.measurement not in policy.measurements:
            raise AttestationError(
                "measurement",
                f"launch measurement {report.measurement.hex()} is not in the allowed list "
                f"({len(policy.measurements)} allowed)",
            )
        passed.append("measurement allowed")
    if policy.report_data is not None:
        if report.report_data != policy.report_data:
            raise AttestationError(
                "report_data",
                "report_data is not the expected value: the evidence was made for another nonce or TLS key "
                "(replayed or relayed)",
            )
        passed.append("report_data")
    return passed
