"""Synthetic SEV-SNP evidence for tests: a test "AMD" chain (RSA-PSS ARK and ASK, a P-384 VCEK with AMD's chip and
TCB extensions), reports signed by that VCEK, and a fake configfs-tsm directory that answers like the kernel's.
The test root is handed to verifiers as an argument only; the product never accepts it from anywhere else."""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from hediff.common.attest.snp import POLICY_DEBUG, SIGNED_LEN, Tcb
from hediff.common.attest.verify import TrustedRoot

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
MEASUREMENT = bytes(range(48))
CHIP_ID = bytes(range(100, 164))
TCB = Tcb(boot_loader=3, tee=0, snp=8, microcode=115)
GUEST_POLICY = 0x30000  # SMT allowed, reserved bit 17 set; debug off


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hediff tests"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _der_int(v: int) -> bytes:
    return bytes([0x02, 0x01, v]) if v < 0x80 else bytes([0x02, 0x02, 0x00, v])


def _builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class FakeAmdChain:
    """A test ARK -> ASK -> VCEK chain; ``vcek_for`` makes more VCEKs (other chips, other TCBs) under the same ASK."""

    name: str = "TestAMD"
    ark_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    ask_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    vcek_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))

    def __post_init__(self):
        self.ark = _der(
            _builder(f"ARK-{self.name}", f"ARK-{self.name}", self.ark_key.public_key()).sign(
                self.ark_key, hashes.SHA384(), rsa_padding=PSS
            )
        )
        self.ask = _der(
            _builder(f"SEV-{self.name}", f"ARK-{self.name}", self.ask_key.public_key()).sign(
                self.ark_key, hashes.SHA384(), rsa_padding=PSS
            )
        )
        self.vcek = self.vcek_for(CHIP_ID, TCB)

    def vcek_for(self, chip_id: bytes, tcb: Tcb, key=None) -> bytes:
        key = key or self.vcek_key
        b = _builder("SEV-VCEK", f"SEV-{self.name}", key.public_key())
        for oid, value in (
            ("1.3.6.1.4.1.3704.1.3.1", _der_int(tcb.boot_loader)),
            ("1.3.6.1.4.1.3704.1.3.2", _der_int(tcb.tee)),
            ("1.3.6.1.4.1.3704.1.3.3", _der_int(tcb.snp)),
            ("1.3.6.1.4.1.3704.1.3.8", _der_int(tcb.microcode)),
            ("1.3.6.1.4.1.3704.1.4", chip_id),
        ):
            b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
        return _der(b.sign(self.ask_key, hashes.SHA384(), rsa_padding=PSS))

    @property
    def root(self) -> TrustedRoot:
        return TrustedRoot(self.name, self.ark, self.ask)

    def report(
        self,
        report_data: bytes,
        measurement: bytes = MEASUREMENT,
        policy: int = GUEST_POLICY,
        debug: bool = False,
        chip_id: bytes = CHIP_ID,
        tcb: Tcb = TCB,
    ) -> bytes:
        """A version-2 ATTESTATION_REPORT with these fields, signed by the VCEK like the firmware signs it."""
        raw = bytearray(0x4A0)
        tcb_bytes = bytes([tcb.boot_loader, tcb.tee, 0, 0, 0, 0, tcb.snp, tcb.microcode])
        raw[0x00:0x04] = (2).to_bytes(4, "little")
        raw[0x08:0x10] = (policy | (POLICY_DEBUG if debug else 0)).to_bytes(8, "little")
        raw[0x34:0x38] = (1).to_bytes(4, "little")
        raw[0x38:0x40] = tcb_bytes
        raw[0x50:0x90] = report_data
        raw[0x90:0xC0] = measurement
        raw[0x180:0x188] = tcb_bytes
        raw[0x1A0:0x1E0] = chip_id
        raw[0x1E0:0x1E8] = tcb_bytes
        raw[0x1F0:0x1F8] = tcb_bytes
        r, s = decode_dss_signature(self.vcek_key.sign(bytes(raw[:SIGNED_LEN]), ec.ECDSA(hashes.SHA384())))
        raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
        raw[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(raw)


class FakeTsm:
    """A directory that behaves like /sys/kernel/config/tsm/report for the evidence provider: when a new entry's
    ``inblob`` appears, it writes ``auxblob`` (an SNP certificate table with the VCEK) and then ``outblob`` (a report
    over that inblob). ``make_report(report_data) -> bytes`` decides what the "firmware" signs, so a test can
    plant bad evidence."""

    def __init__(self, base: Path, make_report, vcek: bytes):
        self.base, self.make_report, self.vcek = base, make_report, vcek
        self.base.mkdir(parents=True, exist_ok=True)
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeTsm:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _cert_table(self) -> bytes:
        import uuid

        header_len = 2 * 24  # one entry and the all-zero terminator
        entry = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le
        entry += header_len.to_bytes(4, "little") + len(self.vcek).to_bytes(4, "little")
        return entry + bytes(24) + self.vcek

    def _serve(self) -> None:
        while not self._stop.wait(0.005):
            for entry in self.base.iterdir():
                try:
                    self._answer(entry)
                except FileNotFoundError:
                    pass  # the provider removed the entry meanwhile

    def _answer(self, entry: Path) -> None:
        inblob, outblob = entry / "inblob", entry / "outblob"
        if inblob.exists() and not outblob.exists():
            data = inblob.read_bytes()
            if len(data) != 64:
                return  # half-written; the next pass reads it whole
            self.seen.append(data)
            (entry / "auxblob").write_bytes(self._cert_table())
            tmp = entry / ".outblob"
            tmp.write_bytes(self.make_report(data))
            tmp.rename(outblob)
