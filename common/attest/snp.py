"""The SEV-SNP ATTESTATION_REPORT: its fixed 1,184-byte layout (AMD SEV-SNP ABI specification, table "ATTESTATION_REPORT
Structure") parsed into named fields. Parsing checks only the shape; trust comes from common.attest.verify."""

from __future__ import annotations

from dataclasses import dataclass

from hediff.common.errors import HEDiffusionError

REPORT_LEN = 0x4A0
SIGNED_LEN = 0x2A0  # the VCEK signs bytes 0 .. 0x29F
SUPPORTED_VERSIONS = range(2, 6)
SIG_ALGO_ECDSA_P384_SHA384 = 1

# guest policy bits (ABI spec, "GUEST_POLICY")
POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

# CPUID family of the chip that signed (reports v3+): Zen 3/4 (Milan, Genoa) or Zen 5 (Turin), whose TCB_VERSION
# layout differs
FAMILY_ZEN5 = 0x1A

# bits 4:2 of the word at 0x48: which key signed the report
SIGNING_KEY_VCEK = 0
SIGNING_KEY_NAMES = {0: "VCEK", 1: "VLEK", 7: "none"}


class ReportFormatError(HEDiffusionError, ValueError):
    """The bytes are not an SEV-SNP attestation report this verifier can read."""


@dataclass(frozen=True, order=True)
class Tcb:
    """The security patch levels in a TCB_VERSION; ``fmc`` exists on Turin only (0 elsewhere)."""

    boot_loader: int
    tee: int
    snp: int
    microcode: int
    fmc: int = 0

    @classmethod
    def decode(cls, raw: bytes, zen5: bool) -> Tcb:
        if zen5:  # Turin: FMC, boot loader, TEE, SNP, 3 reserved, microcode
            return cls(boot_loader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(boot_loader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    @classmethod
    def parse(cls, text: str) -> Tcb:
        """``BL:TEE:SNP:UCODE`` (decimal), e.g. ``3:0:8:115``; the format of ``--min-tcb``."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (4, 5) or not all(0 <= v <= 255 for v in values):
            raise ValueError(
                f"TCB {text!r} is not BOOT_LOADER:TEE:SNP:MICROCODE[:FMC] with each a number 0-255, e.g. 3:0:8:115"
            )
        return cls(*values)

    def meets(self, floor: Tcb) -> bool:
        """Every component at or above the floor's (a TCB is a vector: one higher component does not make up for
        another lower one)."""
        return all(
            mine >= theirs
            for mine, theirs in zip(
                (self.boot_loader, self.tee, self.snp, self.microcode, self.fmc),
                (floor.boot_loader, floor.tee, floor.snp, floor.microcode, floor.fmc),
            )
        )

    def __str__(self) -> str:
        text = f"bl={self.boot_loader} tee={self.tee} snp={self.snp} ucode={self.microcode}"
        return text + (f" fmc={self.fmc}" if self.fmc else "")


@dataclass(frozen=True)
class SnpReport:
    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: Tcb
    platform_info: int
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb: Tcb
    cpuid_family: int | None
    cpuid_model: int | None
    chip_id: bytes
    committed_tcb: Tcb
    launch_tcb: Tcb
    signature_r: int
    signature_s: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_LEN]

    @property
    def debug_allowed(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def zen5(self) -> bool:
        return self.cpuid_family == FAMILY_ZEN5

    @classmethod
    def parse(cls, data: bytes) -> SnpReport:
        if len(data) != REPORT_LEN:
            raise ReportFormatError(
                f"an SEV-SNP attestation report is {REPORT_LEN} bytes, this one is {len(data)} (truncated or not a "
                "report: pass the raw outblob of /sys/kernel/config/tsm/report or the 'report' of snpguest)"
            )

        def u32(offset: int) -> int:
            return int.from_bytes(data[offset : offset + 4], "little")

        def u64(offset: int) -> int:
            return int.from_bytes(data[offset : offset + 8], "little")

        version = u32(0x00)
        if version not in SUPPORTED_VERSIONS:
            raise ReportFormatError(
                f"report version {version} is not supported (this verifier reads versions "
                f"{SUPPORTED_VERSIONS.start}-{SUPPORTED_VERSIONS.stop - 1})"
            )
        signature_algo = u32(0x34)
        if signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise ReportFormatError(f"report signature algorithm {signature_algo} is not 1 (ECDSA P-384 with SHA-384)")
        # the CPUID fields exist from version 3 on; in version 2 those bytes are reserved (and Turin reports v3+)
        family, model = (data[0x188], data[0x189]) if version >= 3 else (None, None)
        zen5 = family == FAMILY_ZEN5

        def tcb(offset: int) -> Tcb:
            return Tcb.decode(data[offset : offset + 8], zen5)

        return cls(
            raw=bytes(data),
            version=version,
            guest_svn=u32(0x04),
            policy=u64(0x08),
            family_id=data[0x10:0x20],
            image_id=data[0x20:0x30],
            vmpl=u32(0x30),
            signature_algo=signature_algo,
            current_tcb=tcb(0x38),
            platform_info=u64(0x40),
            signing_key=(u32(0x48) >> 2) & 0x7,
            report_data=data[0x50:0x90],
            measurement=data[0x90:0xC0],
            host_data=data[0xC0:0xE0],
            id_key_digest=data[0xE0:0x110],
            author_key_digest=data[0x110:0x140],
            report_id=data[0x140:0x160],
            reported_tcb=tcb(0x180),
            cpuid_family=family,
            cpuid_model=model,
            chip_id=data[0x1A0:0x1E0],
            committed_tcb=tcb(0x1E0),
            launch_tcb=tcb(0x1F0),
            # r and s are 72-byte little-endian fields; a P-384 scalar fills the low 48 bytes
            signature_r=int.from_bytes(data[0x2A0:0x2E8], "little"),
            signature_s=int.from_bytes(data[0x2E8:0x330], "little"),
        )
