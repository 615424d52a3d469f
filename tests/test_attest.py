"""SEV-SNP verification against real recorded evidence (tests/data/attest/README.md): AMD's real chains accept the
genuine reports and refuse every alteration, another chip's key, an unpinned root, a debug guest under the default
policy, a wrong measurement or report_data and a truncated report; `hediff attest verify` says so in one line."""

import datetime
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hediff.common.attest.binding import BINDING_TAG, report_data_for, tls_key_digest
from hediff.common.attest.roots import AMD_PRODUCTS, ARK_SHA256
from hediff.common.attest.snp import SnpReport, Tcb
from hediff.common.attest.verify import (
    AttestationError,
    Policy,
    amd_roots,
    load_certificate,
    verify_snp_report,
    verify_vcek_chain,
)
from hediff.common.errors import EXIT_ATTESTATION
from hediff.desktop.cli import main
from tests.attest_evidence import CHIP_ID, TCB, FakeAmdChain

DATA = Path(__file__).parent / "data" / "attest"
GOOD_REPORT = DATA / "virtee-milan-report.bin"  # debug off
GOOD_VCEK = DATA / "virtee-milan-vcek.der"
DEBUG_REPORT = DATA / "omne-milan-debug-report.bin"  # debug allowed by its guest policy
DEBUG_VCEK = DATA / "omne-milan-debug-vcek.der"
GOOD_MEASUREMENT = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"


def refused(check: str, *args, **kw) -> AttestationError:
    with pytest.raises(AttestationError) as err:
        verify_snp_report(*args, **kw)
    assert err.value.check == check, f"expected the {check} check to fail, got {err.value.check}: {err.value}"
    return err.value


def test_pinned_roots_are_amds_published_certificates():
    # the pins, as published alongside AMD's certificates (README of tests/data/attest; omne-attest's pin for Milan)
    assert ARK_SHA256 == {
        "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    }
    roots = {r.name: r for r in amd_roots()}
    for product in AMD_PRODUCTS:
        ark = x509.load_der_x509_certificate(roots[product.name].ark_der)
        ask = x509.load_der_x509_certificate(roots[product.name].ask_der)
        assert ark.subject.rfc4514_string().startswith(f"CN=ARK-{product.name},O=Advanced Micro Devices")
        assert ask.issuer == ark.subject and ask.subject.rfc4514_string().startswith(f"CN=SEV-{product.name},")
    assert roots["Milan"].ark_der == (DATA / "milan-ark.der").read_bytes()
    assert roots["Milan"].ask_der == (DATA / "milan-ask.der").read_bytes()


@pytest.mark.parametrize("vcek, product", [(GOOD_VCEK, "Milan"), (DATA / "virtee-turin-vcek.der", "Turin")])
def test_real_vceks_chain_to_their_pinned_root(vcek, product):
    now = datetime.datetime.now(datetime.UTC)
    cert = load_certificate(vcek.read_bytes(), "VCEK")
    assert verify_vcek_chain(cert, None, None, amd_roots(), now) == product
    others = tuple(r for r in amd_roots() if r.name != product)
    with pytest.raises(AttestationError, match="none of the pinned AMD ASKs"):
        verify_vcek_chain(cert, None, None, others, now)


def test_turin_tcb_layout():
    # Turin's TCB_VERSION: FMC, boot loader, TEE, SNP, 3 reserved, microcode (Milan/Genoa: BL, TEE, 4 reserved, SNP,
    # microcode)
    raw = bytes([1, 2, 3, 4, 0, 0, 0, 9])
    assert Tcb.decode(raw, zen5=True) == Tcb(boot_loader=2, tee=3, snp=4, microcode=9, fmc=1)
    assert Tcb.decode(raw, zen5=False) == Tcb(boot_loader=1, tee=2, snp=0, microcode=9)


def test_real_milan_report_verifies_under_the_default_policy():
    report = GOOD_REPORT.read_bytes()
    parsed = SnpReport.parse(report)
    verified = verify_snp_report(
        report,
        GOOD_VCEK.read_bytes(),
        policy=Policy(
            measurements=Policy.parse_measurements([GOOD_MEASUREMENT]),
            report_data=parsed.report_data,
            min_tcb=Tcb.parse("3:0:8:115"),
        ),
    )
    f = verified.fields()
    assert verified.product == "Milan" and f["measurement"] == GOOD_MEASUREMENT
    assert f["debug_allowed"] is False and f["policy"] == "0x30000" and f["vmpl"] == 0
    assert f["reported_tcb"] == "bl=3 tee=0 snp=8 ucode=115"
    assert f["chip_id"].startswith("d49554ec717f4e5b")
    assert verified.measurement_checked and verified.report_data_checked
    assert "measurement allowed" in verified.checks and "TCB >= bl=3 tee=0 snp=8 ucode=115" in verified.checks


def test_a_debug_guest_is_refused_by_default_and_accepted_only_when_allowed():
    report, vcek = DEBUG_REPORT.read_bytes(), DEBUG_VCEK.read_bytes()
    err = refused("debug", report, vcek)
    assert "0xb0000" in str(err) and "--allow-debug" in str(err)
    verified = verify_snp_report(report, vcek, policy=Policy(allow_debug=True))
    assert verified.fields()["debug_allowed"] is True and "debug allowed by policy" in verified.checks


def _flip_each(report: bytes, vcek: bytes, bits: list[int]) -> dict[str, int]:
    policy, roots = Policy(allow_debug=True), amd_roots()
    verify_snp_report(report, vcek, policy=policy, roots=roots)
    refusals: dict[str, int] = {}
    for bit in bits:
        flipped = bytearray(report)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AttestationError) as err:
            verify_snp_report(bytes(flipped), vcek, policy=policy, roots=roots)
        refusals[err.value.check] = refusals.get(err.value.check, 0) + 1
    assert sum(refusals.values()) == len(bits)
    # bits in the version or signature-algorithm words are refused when parsing, all others by the signature
    assert set(refusals) == {"signature", "format"}, refusals
    return refusals


# the signed 0x2A0 bytes and the signature's r and s; bytes past 0x330 are reserved and outside the signature
SIGNED_AND_SIGNATURE_BYTES = 0x330


def test_a_bit_flip_in_any_byte_of_the_signed_part_or_the_signature_is_refused():
    # one bit per byte (a different bit position from byte to byte) keeps the default run fast; the slow test
    # below flips every bit
    bits = [8 * i + (i % 8) for i in range(SIGNED_AND_SIGNATURE_BYTES)]
    _flip_each(GOOD_REPORT.read_bytes(), GOOD_VCEK.read_bytes(), bits)


@pytest.mark.slow
@pytest.mark.parametrize("report_path", [GOOD_REPORT, DEBUG_REPORT], ids=["virtee", "omne"])
def test_every_single_bit_flip_is_refused(report_path):
    vcek = (GOOD_VCEK if report_path == GOOD_REPORT else DEBUG_VCEK).read_bytes()
    _flip_each(report_path.read_bytes(), vcek, list(range(SIGNED_AND_SIGNATURE_BYTES * 8)))


def test_wrong_measurement_or_report_data_is_refused():
    report, vcek = GOOD_REPORT.read_bytes(), GOOD_VCEK.read_bytes()
    other = "00" * 48
    err = refused("measurement", report, vcek, policy=Policy(measurements=Policy.parse_measurements([other])))
    assert GOOD_MEASUREMENT in str(err)
    wrong_nonce = report_data_for(b"\x01" * 32, b"\x02" * 32)
    refused("report_data", report, vcek, policy=Policy(report_data=wrong_nonce))


def test_another_chips_vcek_is_refused():
    # the omne report's chip with the virtee chip's VCEK, and a Turin VCEK: neither key signed it
    refused("signature", DEBUG_REPORT.read_bytes(), GOOD_VCEK.read_bytes(), policy=Policy(allow_debug=True))
    refused("signature", GOOD_REPORT.read_bytes(), (DATA / "virtee-turin-vcek.der").read_bytes())


def test_a_vcek_for_another_chip_or_tcb_with_the_same_key_is_refused():
    # real AMD VCEKs never share a key, so this needs the test chain: a certificate whose key signed the report but
    # whose hwID or TCB extensions name another chip or TCB must not pass
    chain = FakeAmdChain()
    report = chain.report(bytes(64))
    assert verify_snp_report(report, chain.vcek, roots=(chain.root,)).product == "TestAMD"
    other_chip = chain.vcek_for(bytes(reversed(CHIP_ID)), TCB)
    refused("vcek_binding", report, other_chip, roots=(chain.root,))
    newer_tcb = chain.vcek_for(CHIP_ID, Tcb(boot_loader=3, tee=0, snp=9, microcode=115))
    err = refused("vcek_binding", report, newer_tcb, roots=(chain.root,))
    assert "snp=9" in str(err) and "snp=8" in str(err)


def test_test_chain_is_not_trusted_by_default():
    chain = FakeAmdChain()
    refused("chain", chain.report(bytes(64)), chain.vcek)  # the built-in roots only
    refused("pinned_root", chain.report(bytes(64)), chain.vcek, ask_der=chain.ask, ark_der=chain.ark)


def test_an_unpinned_root_is_refused_even_if_it_signs_the_chain():
    chain = FakeAmdChain()
    err = refused("pinned_root", GOOD_REPORT.read_bytes(), GOOD_VCEK.read_bytes(), ark_der=chain.ark, ask_der=chain.ask)
    assert hashlib.sha256(chain.ark).hexdigest() in str(err)
    # AMD's Genoa root is pinned but did not sign a Milan VCEK
    genoa = {r.name: r for r in amd_roots()}["Genoa"]
    refused("chain", GOOD_REPORT.read_bytes(), GOOD_VCEK.read_bytes(), ark_der=genoa.ark_der)


def test_truncated_padded_or_empty_reports_are_refused():
    report, vcek = GOOD_REPORT.read_bytes(), GOOD_VCEK.read_bytes()
    for data in (report[:-1], report[:0x2A0], report + b"\0", b""):
        err = refused("format", data, vcek)
        assert f"this one is {len(data)}" in str(err)


def test_the_chain_must_be_valid_now():
    report, vcek = GOOD_REPORT.read_bytes(), GOOD_VCEK.read_bytes()
    later = datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC)  # the VCEK expires in April 2030
    assert "VCEK is valid from" in str(refused("chain", report, vcek, now=later))


def test_tcb_floor():
    report, vcek = GOOD_REPORT.read_bytes(), GOOD_VCEK.read_bytes()
    err = refused("tcb", report, vcek, policy=Policy(min_tcb=Tcb.parse("3:0:9:115")))
    assert "bl=3 tee=0 snp=8 ucode=115" in str(err)
    with pytest.raises(ValueError, match="BOOT_LOADER:TEE:SNP:MICROCODE"):
        Tcb.parse("3.0.8.115")


def test_binding_is_a_tagged_hash_of_nonce_and_tls_key():
    nonce, key = bytes(range(32)), bytes(32)
    assert report_data_for(nonce, key) == hashlib.sha512(BINDING_TAG + nonce + key).digest()
    assert report_data_for(nonce, key) != report_data_for(bytes(32), key)
    with pytest.raises(ValueError, match="32 bytes"):
        report_data_for(b"short", key)


def test_tls_key_digest_is_the_spki_hash():
    chain = FakeAmdChain()
    cert = x509.load_der_x509_certificate(chain.ask)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert tls_key_digest(chain.ask) == hashlib.sha256(spki).digest() != tls_key_digest(chain.ark)


# --- hediff attest verify --------------------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["attest", "verify", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_accepts_the_real_report_with_the_built_in_chain(capsys):
    rc, out, err = run_cli(
        capsys, "--report", str(GOOD_REPORT), "--vcek", str(GOOD_VCEK), "--measurement", GOOD_MEASUREMENT
    )
    assert rc == 0 and err == ""
    fields = json.loads(out)
    assert fields["verified"] is True and fields["product"] == "Milan"
    assert fields["measurement"] == GOOD_MEASUREMENT and fields["measurement_checked"] is True


def test_cli_takes_pem_and_an_explicit_pinned_chain(capsys, tmp_path):
    pem = tmp_path / "vcek.pem"
    pem.write_bytes(load_certificate(GOOD_VCEK.read_bytes(), "VCEK").public_bytes(serialization.Encoding.PEM))
    rc, out, _ = run_cli(
        capsys,
        *("--report", str(GOOD_REPORT), "--vcek", str(pem)),
        *("--ask", str(DATA / "milan-ask.der"), "--ark", str(DATA / "milan-ark.der")),
        *("--report-data", SnpReport.parse(GOOD_REPORT.read_bytes()).report_data.hex()),
    )
    assert rc == 0 and json.loads(out)["report_data_checked"] is True


@pytest.mark.parametrize(
    "case, extra, reason",
    [
        ("debug guest", ["--report", str(DEBUG_REPORT), "--vcek", str(DEBUG_VCEK)], "REFUSED (debug)"),
        ("wrong measurement", ["--measurement", "ab" * 48], "REFUSED (measurement)"),
        ("wrong report data", ["--report-data", "00" * 64], "REFUSED (report_data)"),
        ("other chip", ["--vcek", str(DATA / "virtee-turin-vcek.der")], "REFUSED (signature)"),
    ],
)
def test_cli_refuses_in_one_line(capsys, case, extra, reason):
    base = {"--report": str(GOOD_REPORT), "--vcek": str(GOOD_VCEK)}
    args: list[str] = []
    for flag, value in base.items():
        if flag not in extra:
            args += [flag, value]
    rc, out, err = run_cli(capsys, *args, *extra)
    assert (
        rc == EXIT_ATTESTATION and out == "" and err.startswith(f"hediff attest: {reason}:") and err.count("\n") == 1
    ), err


def test_cli_refuses_an_unpinned_ark_and_a_truncated_report(capsys, tmp_path):
    chain = FakeAmdChain()
    ark = tmp_path / "ark.der"
    ark.write_bytes(chain.ark)
    rc, _, err = run_cli(capsys, "--report", str(GOOD_REPORT), "--vcek", str(GOOD_VCEK), "--ark", str(ark))
    assert rc == EXIT_ATTESTATION and "REFUSED (pinned_root)" in err and "not one of the pinned AMD roots" in err
    short = tmp_path / "short.bin"
    short.write_bytes(GOOD_REPORT.read_bytes()[:1000])
    rc, _, err = run_cli(capsys, "--report", str(short), "--vcek", str(GOOD_VCEK))
    assert rc == EXIT_ATTESTATION and "REFUSED (format)" in err and "this one is 1000" in err


def test_cli_bad_arguments_are_usage_errors(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--report", str(tmp_path / "missing.bin"), "--vcek", str(GOOD_VCEK))
    assert rc == 2 and "--report" in err and "cannot be read" in err
    rc, _, err = run_cli(capsys, "--report", str(GOOD_REPORT), "--vcek", str(GOOD_VCEK), "--measurement", "xyz")
    assert rc == 2 and "not hex" in err
    rc, _, err = run_cli(capsys, "--report", str(GOOD_REPORT), "--vcek", str(GOOD_VCEK), "--report-data", "00")
    assert rc == 2 and "64 (128 hex digits)" in err
    junk = tmp_path / "junk.der"
    junk.write_bytes(b"not a certificate")
    rc, _, err = run_cli(capsys, "--report", str(GOOD_REPORT), "--vcek", str(junk))
    assert rc == EXIT_ATTESTATION and "REFUSED (certificate)" in err and "VCEK" in err
