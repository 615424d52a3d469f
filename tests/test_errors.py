"""One error hierarchy: every error written for the user is a HEDiffusionError with a documented exit code, the
CLI ends with that code and one line, and the app shows only those messages as they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hediff.common import errors
from hediff.common.attest.verify import AttestationError
from hediff.common.he import HEError
from hediff.common.models import ModelFolderError, ModelNotFoundError
from hediff.common.protocol import ProtocolError
from hediff.common.settings import SettingsError
from hediff.common.split import UnsupportedUNetError
from hediff.desktop.cli import main
from hediff.desktop.core.backend_client import (
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendTLSError,
    BackendUnreachable,
)
from hediff.desktop.core.engine import GenerationCancelled
from hediff.desktop.core.keystore import KeyringUnavailable, KeyStoreError, WrongPassphrase
from hediff.desktop.core.preview import PreviewMapError
from hediff.desktop.core.preview_decoder import PreviewDecoderError
from hediff.desktop.core.services import NoServerToken
from hediff.desktop.ui.worker import expected_errors

REPO = Path(__file__).resolve().parents[1]

EXPECTED_EXIT = {
    SettingsError: errors.EXIT_USAGE,
    NoServerToken: errors.EXIT_USAGE,
    BackendRejected: errors.EXIT_SERVER_REFUSED,
    BackendUnreachable: errors.EXIT_UNREACHABLE,
    BackendTimeout: errors.EXIT_UNREACHABLE,
    BackendTLSError: errors.EXIT_UNREACHABLE,
    ModelFolderError: errors.EXIT_MODEL,
    ModelNotFoundError: errors.EXIT_MODEL,
    UnsupportedUNetError: errors.EXIT_MODEL,
    PreviewMapError: errors.EXIT_MODEL,
    PreviewDecoderError: errors.EXIT_MODEL,
    KeyringUnavailable: errors.EXIT_KEYS,
    KeyStoreError: errors.EXIT_KEYS,
    WrongPassphrase: errors.EXIT_KEYS,
    ProtocolError: errors.EXIT_PROTOCOL,
    BackendProtocolError: errors.EXIT_PROTOCOL,
    HEError: errors.EXIT_PROTOCOL,
    AttestationError: errors.EXIT_ATTESTATION,
    GenerationCancelled: errors.EXIT_CANCELLED,
}


@pytest.mark.parametrize("cls,code", list(EXPECTED_EXIT.items()), ids=lambda v: getattr(v, "__name__", str(v)))
def test_each_user_facing_error_is_in_the_hierarchy_with_its_exit_code(cls, code):
    assert issubclass(cls, errors.HEDiffusionError)
    assert cls.exit_code == code


def test_the_documented_exit_codes_are_the_ones_in_the_code():
    doc = (REPO / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## Exit codes") :]
    codes = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", section, re.M)}
    defined = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert codes == defined


def test_the_app_shows_only_messages_written_for_the_user():
    shown = expected_errors()
    assert isinstance(BackendRejected("refused", 400, "bad_request"), shown)
    assert not isinstance(ValueError("an internal detail"), shown)  # a bug: reported generically


def test_cli_exit_codes_by_failure(tmp_path, tiny_model_dir, capsys):
    def run(*argv: str) -> tuple[int, str]:
        rc = main(list(argv))
        return rc, capsys.readouterr().err

    rc, err = run("generate", "--model", str(tiny_model_dir), "--prompt", "x", "--steps", "0")
    assert rc == errors.EXIT_USAGE and err.count("\n") == 1
    rc, err = run("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert rc == errors.EXIT_MODEL and err.count("\n") == 1 and "Traceback" not in err
