"""The confidential backend end to end over real HTTPS on loopback: evidence from a fake configfs-tsm directory,
signed by a test root that only these tests hand to the client. Good evidence: the whole pipeline runs on the
server and gives diffusers' own image for the seed, with a latent per step. Bad evidence of any kind: the client
refuses and not one byte of the prompt reaches the server."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from hediff.backend.app import create_app
from hediff.backend.auth import TokenStore
from hediff.backend.confidential import (
    EVIDENCE_PATH,
    GENERATE_PATH,
    ConfidentialPipeline,
    ConfigfsTsm,
    EvidenceError,
    add_confidential_routes,
    parse_cert_table,
    tls_key_sha256_of,
)
from hediff.backend.serve import check_tls_files, start_in_thread
from hediff.common.attest.binding import report_data_for
from hediff.common.attest.verify import AttestationError
from hediff.common.errors import EXIT_ATTESTATION
from hediff.common.schedulers import make_scheduler
from hediff.desktop.cli import main
from hediff.desktop.core.confidential_client import ConfidentialClient, ConfidentialPolicy
from tests.attest_evidence import MEASUREMENT, FakeAmdChain, FakeTsm
from tests.conftest import _RecordingASGI
from tests.test_tls import self_signed

PROMPT = "a secret prompt: a large red circle at the top left"
NEGATIVE = "blurry"


class Firmware:
    """What the fake TSM signs; ``mode`` plants one kind of bad evidence."""

    def __init__(self, chain: FakeAmdChain, server_key_sha256: bytes):
        self.chain, self.server_key_sha256, self.mode = chain, server_key_sha256, "good"

    def __call__(self, report_data: bytes) -> bytes:
        if self.mode == "wrong-measurement":
            return self.chain.report(report_data, measurement=bytes(48))
        if self.mode == "debug":
            return self.chain.report(report_data, debug=True)
        if self.mode == "wrong-nonce":  # a replay: evidence made earlier, for another nonce
            return self.chain.report(report_data_for(bytes(32), self.server_key_sha256))
        if self.mode == "tampered":
            raw = bytearray(self.chain.report(report_data))
            raw[0x90] ^= 1  # one bit of the measurement, after signing
            return bytes(raw)
        return self.chain.report(report_data)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, server_model):
    d = tmp_path_factory.mktemp("confidential")
    server_cert, server_key = self_signed(d, "server")
    stranger_cert, _ = self_signed(d, "stranger")
    chain = FakeAmdChain()
    firmware = Firmware(chain, tls_key_sha256_of(server_cert))
    tokens, token = TokenStore.ephemeral("tests")
    pipeline = ConfidentialPipeline(tiny_model_dir, "cpu")
    recorded: list = []
    servers = {}
    with FakeTsm(d / "tsm", firmware, chain.vcek) as tsm:
        # "honest" binds its own TLS key; "relay" serves TLS with one key but its evidence binds another (the key of
        # the TEE it forwards to), as a man in the middle that relays genuine evidence would
        for name, bound_cert in (("honest", server_cert), ("relay", stranger_cert)):
            app = create_app(server_model, tokens)
            add_confidential_routes(app, tokens, ConfigfsTsm(d / "tsm"), pipeline, tls_key_sha256_of(bound_cert))
            servers[name] = start_in_thread(_RecordingASGI(app, recorded), tls=check_tls_files(server_cert, server_key))
        yield {
            "urls": {name: s.url for name, s in servers.items()},
            "token": token,
            "ca": server_cert,
            "chain": chain,
            "firmware": firmware,
            "tsm": tsm,
            "recorded": recorded,
            "pipeline": pipeline,
            "dir": d,
        }
        for s in servers.values():
            s.stop()


def client(setup, server="honest", **policy) -> ConfidentialClient:
    options = {"allow_cpu_only_tee": True, **policy}
    return ConfidentialClient(
        setup["urls"][server],
        setup["token"],
        ConfidentialPolicy(frozenset({MEASUREMENT}), **options),
        tls_ca=setup["ca"],
        roots=(setup["chain"].root,),
        timeout_s=120,
    )


def prompt_bodies(setup) -> list[tuple[str, bytes]]:
    return [(path, body) for path, body in setup["recorded"] if PROMPT.encode() in body or path == GENERATE_PATH]


@pytest.fixture
def fresh(setup):
    setup["firmware"].mode = "good"
    setup["recorded"].clear()
    setup["tsm"].seen.clear()
    yield setup
    setup["firmware"].mode = "good"


def test_good_evidence_then_the_whole_pipeline_matches_diffusers(fresh, tiny_model_dir):
    attested, steps = [], []
    result = client(fresh).generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=3,
        seed=7,
        width=32,
        height=32,
        scheduler="ddim",
        on_attested=attested.append,
        on_step=steps.append,
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, height=32, width=32)
    reference = pipe(**kw, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(reference))
    latents = pipe(**kw, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images[0].numpy()
    assert [s.index for s in steps] == [0, 1, 2] and all(s.total == 3 for s in steps)
    assert np.abs(steps[-1].latent - latents).max() < 1e-2  # float16 on the wire
    factor = 32 // steps[0].latent.shape[-1]  # the tiny model's VAE scale factor
    assert steps[0].preview(upscale=factor).size == (32, 32) and steps[0].preview() != steps[-1].preview()
    # what the user is told, and that the server's evidence request came first, then exactly one prompt
    summary = "\n".join(attested[0].summary())
    assert MEASUREMENT.hex() in summary and "TestAMD" in summary and "GPU evidence: not verified" in summary
    label = attested[0].label()
    assert label.startswith("Private: attested confidential server (AMD SEV-SNP TestAMD evidence chained")
    assert MEASUREMENT.hex()[:16] in label and "GPU evidence: not verified" in label
    assert [path for path, _ in fresh["recorded"]] == [EVIDENCE_PATH, GENERATE_PATH]
    assert len(prompt_bodies(fresh)) == 1 and len(fresh["tsm"].seen) == 1
    assert list((fresh["dir"] / "tsm").iterdir()) == []  # the configfs report entry was released


@pytest.mark.parametrize(
    "mode, server, check",
    [
        ("wrong-measurement", "honest", "measurement"),
        ("wrong-nonce", "honest", "report_data"),
        ("good", "relay", "report_data"),  # genuine evidence, but bound to another TLS key than this connection's
        ("debug", "honest", "debug"),
        ("tampered", "honest", "signature"),
    ],
)
def test_bad_evidence_is_refused_and_the_prompt_never_reaches_the_server(fresh, mode, server, check):
    fresh["firmware"].mode = mode
    with pytest.raises(AttestationError) as err:
        client(fresh, server).generate(PROMPT, steps=2, width=32, height=32)
    assert err.value.check == check, err.value
    assert [path for path, _ in fresh["recorded"]] == [EVIDENCE_PATH]  # the evidence was asked for, then nothing
    assert prompt_bodies(fresh) == [] and len(fresh["tsm"].seen) == 1


class _CloseAfterEvidence:
    """Answers the evidence request with 'Connection: close', as a server (or a middlebox) that drops the attested
    connection before the prompt would follow."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def closing_send(message):
            if message["type"] == "http.response.start" and scope["path"] == EVIDENCE_PATH:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, closing_send)


def test_the_prompt_never_goes_over_a_new_connection(fresh, server_model):
    tokens, token = TokenStore.ephemeral("tests")
    app = create_app(server_model, tokens)
    cert, key = fresh["ca"], fresh["ca"].with_name("server-key.pem")
    add_confidential_routes(app, tokens, ConfigfsTsm(fresh["dir"] / "tsm"), fresh["pipeline"], tls_key_sha256_of(cert))
    recorded: list = []
    running = start_in_thread(_CloseAfterEvidence(_RecordingASGI(app, recorded)), tls=check_tls_files(cert, key))
    try:
        c = ConfidentialClient(
            running.url,
            token,
            ConfidentialPolicy(frozenset({MEASUREMENT}), allow_cpu_only_tee=True),
            tls_ca=cert,
            roots=(fresh["chain"].root,),
        )
        with pytest.raises(AttestationError) as err:
            c.generate(PROMPT, steps=1, width=32, height=32)
    finally:
        running.stop()
    assert err.value.check == "tls_binding" and "nothing was sent" in str(err.value)
    assert [path for path, _ in recorded] == [EVIDENCE_PATH]


def test_unverified_gpu_evidence_fails_closed_unless_a_cpu_only_tee_is_allowed(fresh):
    with pytest.raises(AttestationError) as err:
        client(fresh, allow_cpu_only_tee=False).generate(PROMPT, steps=2, width=32, height=32)
    assert err.value.check == "gpu" and "GPU evidence: not verified" in str(err.value)
    assert "--allow-cpu-only-tee" in str(err.value) and prompt_bodies(fresh) == []


def test_a_debug_guest_is_accepted_only_when_the_user_allows_it(fresh):
    fresh["firmware"].mode = "debug"
    result = client(fresh, allow_debug=True).generate(PROMPT, steps=2, width=32, height=32, scheduler="plms")
    assert result.attestation.report.fields()["debug_allowed"] is True and result.image.size == (32, 32)
    # PLMS runs a warm-up step: the stream counts the loop's real length
    assert [(s.index, s.total) for s in result.steps] == [(0, 3), (1, 3), (2, 3)]


def test_the_products_roots_refuse_the_test_root_and_the_cli_sends_nothing(fresh, capsys, monkeypatch):
    monkeypatch.setenv("HEDIFF_TOKEN", fresh["token"])
    out = fresh["dir"] / "never.png"
    rc = main(
        [
            *("generate", "--server", fresh["urls"]["honest"], "--confidential", "--tls-ca", str(fresh["ca"])),
            *("--measurement", MEASUREMENT.hex(), "--allow-cpu-only-tee", "--prompt", PROMPT, "--out", str(out)),
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == EXIT_ATTESTATION and "REFUSED, nothing was sent (chain)" in err and "none of the pinned AMD ASKs" in err
    )
    assert not out.exists() and prompt_bodies(fresh) == []


def test_cli_confidential_needs_measurements_and_https(capsys, monkeypatch):
    monkeypatch.setenv("HEDIFF_TOKEN", "t")
    rc = main(["generate", "--server", "https://127.0.0.1:1", "--confidential", "--prompt", "x"])
    assert rc == 2 and "at least one allowed launch measurement" in capsys.readouterr().err
    m = ["--measurement", MEASUREMENT.hex()]
    rc = main(["generate", "--server", "http://127.0.0.1:1", "--confidential", *m, "--prompt", "x"])
    assert rc == 2 and "not an https:// URL" in capsys.readouterr().err


def test_generation_route_checks_token_and_fields(fresh):
    context = ssl.create_default_context(cafile=str(fresh["ca"]))
    url = fresh["urls"]["honest"]

    def post(path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, context=context) as resp:
                return resp.status, json.loads(resp.read().splitlines()[0])
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = post(GENERATE_PATH, {"prompt": "x"})
    assert status == 401 and body["error"] == "unauthorized"
    status, body = post(GENERATE_PATH, {"prompt": "x", "width": 33}, fresh["token"])
    assert status == 400 and body["detail"].startswith("width:")
    status, body = post(GENERATE_PATH, {"prompt": "x", "scheduler": "nope"}, fresh["token"])
    assert status == 400 and "unknown scheduler 'nope'" in body["detail"]
    status, body = post(EVIDENCE_PATH, {"nonce": "abcd"})
    assert status == 400 and body["error"] == "bad_nonce" and "64 hex digits" in body["detail"]
    status, body = post(GENERATE_PATH, {"prompt": "x" * 70_000}, fresh["token"])
    assert status == 413 and body["error"] == "payload_too_large"
    status, body = post(EVIDENCE_PATH, {"nonce": "11" * 32})
    assert status == 200 and body["tee"] == "sev-snp" and body["gpu"] is None
    assert base64.b64decode(body["vcek"]) == fresh["chain"].vcek


def test_configfs_tsm_errors_are_specific(tmp_path):
    with pytest.raises(EvidenceError, match="not a confidential guest with configfs-tsm"):
        ConfigfsTsm(tmp_path / "missing").evidence(bytes(64))
    with pytest.raises(ValueError, match="64 bytes"):
        ConfigfsTsm(tmp_path).evidence(bytes(32))
    with pytest.raises(EvidenceError, match="no report .* within 0.1 s"):
        ConfigfsTsm(tmp_path, timeout_s=0.1).evidence(bytes(64))
    assert list(tmp_path.iterdir()) == []  # the report entry is removed even when it fails


def test_certificate_table_of_the_auxblob(tmp_path):
    chain = FakeAmdChain()
    tsm = FakeTsm(tmp_path, lambda rd: chain.report(rd), chain.vcek)
    assert parse_cert_table(tsm._cert_table()) == {"vcek": chain.vcek}
    with pytest.raises(EvidenceError, match="points past its end"):
        parse_cert_table(tsm._cert_table()[:60])
    # a host that supplies no certificates: the operator's --vcek is used, and without one the error says so
    with FakeTsm(tmp_path, lambda rd: chain.report(rd), chain.vcek) as fake:
        fake._cert_table = lambda: bytes(24)
        with pytest.raises(EvidenceError, match="pass it with --vcek"):
            ConfigfsTsm(tmp_path).evidence(bytes(64))
        assert ConfigfsTsm(tmp_path, vcek=chain.vcek).evidence(bytes(64)).vcek == chain.vcek


def test_serve_confidential_refuses_without_tls_or_outside_a_tee(tmp_path, capsys):
    rc = main(["serve", "--model", "/nonexistent", "--confidential"])
    assert rc == 2 and "--confidential needs --tls-cert/--tls-key" in capsys.readouterr().err
    cert, key = self_signed(tmp_path, "server")
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tsm-dir", str(tmp_path / "no-tsm")]
    rc = main(["serve", "--model", "/nonexistent", "--confidential", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "not a confidential guest with configfs-tsm" in err and "Traceback" not in err
