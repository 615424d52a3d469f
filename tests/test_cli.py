import pytest

from hediff.backend.auth import TokenStore
from hediff.common.errors import EXIT_MODEL
from hediff.desktop.cli import main


def test_token_create_list_revoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HEDIFF_CONFIG_DIR", str(tmp_path))
    assert main(["token", "create", "--label", "laptop"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("hdt_") and len(token) > 40
    stored = (tmp_path / "tokens.json").read_text()
    assert token not in stored  # only the hash is kept
    assert (tmp_path / "tokens.json").stat().st_mode & 0o077 == 0
    store = TokenStore.load(tmp_path / "tokens.json")
    token_id = store.verify(token)
    assert token_id is not None and store.verify(token + "x") is None
    assert main(["token", "list"]) == 0
    assert "laptop" in capsys.readouterr().out
    assert main(["token", "revoke", token_id]) == 0
    assert TokenStore.load(tmp_path / "tokens.json").verify(token) is None
    assert main(["token", "revoke", token_id]) == 2
    assert "no token with id" in capsys.readouterr().err


def test_serve_refuses_to_start_without_tokens(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HEDIFF_CONFIG_DIR", str(tmp_path))
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert "hediff token create" in capsys.readouterr().err


def test_corrupt_token_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "tokens.json"
    bad.write_text("{not json")
    assert main(["token", "--tokens-file", str(bad), "list"]) == 2
    assert "unreadable" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", " "], "--prompt must be non-empty text"),
        (["--prompt", "x", "--width", "30"], "--width must be a multiple of 8 in [0, 2048]"),
        (["--prompt", "x", "--tau", "2"], "--tau must be a finite number in [0, 1], got 2.0"),
    ],
)
def test_generate_rejects_bad_parameters_before_any_network(tiny_model_dir, capsys, args, message):
    rc = main(
        [
            "generate",
            "--server",
            "http://127.0.0.1:9",
            "--accept-not-private",
            "--token",
            "t",
            "--model",
            str(tiny_model_dir),
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_missing_model_folder_is_named(tmp_path, capsys):
    rc = main(["generate", "--local-backend", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == EXIT_MODEL and "missing" in err and "Traceback" not in err


def test_generate_needs_a_token_for_a_remote_server(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("HEDIFF_TOKEN", raising=False)
    rc = main(
        [
            "generate",
            "--server",
            "http://127.0.0.1:9",
            "--accept-not-private",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "x",
        ]
    )
    assert rc == 2 and "HEDIFF_TOKEN" in capsys.readouterr().err


def test_gui_without_a_display_says_so_instead_of_aborting():
    from hediff.desktop.ui.app import display_problem

    assert "QT_QPA_PLATFORM=offscreen" in display_problem(env={}, platform="linux")
    assert display_problem(env={"DISPLAY": ":0"}, platform="linux") is None
    assert display_problem(env={"QT_QPA_PLATFORM": "offscreen"}, platform="linux") is None
    assert display_problem(env={}, platform="darwin") is None
