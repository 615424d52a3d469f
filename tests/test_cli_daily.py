"""The CLI as a daily tool: fast help and version, help for every option, early port checks, clean Ctrl-C,
and the apt line when the GUI's system libraries are missing."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hediff.desktop.cli import build_parser, main

HEAVY = ("torch", "diffusers", "tenseal", "PySide6", "pydantic", "fastapi")


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_help_imports_nothing_heavy():
    code = (
        "import sys, json\n"
        "from hediff.desktop import cli\n"
        "cli.build_parser(with_generate_settings=False).format_help()\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = _run_python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_version_prints_the_package_version(capsys):
    from hediff import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hediff {__version__}"


def _parsers(parser: argparse.ArgumentParser, path: str = "hediff"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_has_help_text():
    undocumented = [
        f"{path} {action.option_strings or action.dest}"
        for path, parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert undocumented == []


def _serve_in_subprocess(port: int, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    tokens = tmp_path / "tokens.json"
    code = (
        "import sys, json\n"
        "from hediff.desktop.cli import main\n"
        f"rc = main(['serve', '--port', '{port}', '--tokens-file', {str(tokens)!r}])\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    t0 = time.perf_counter()
    done = _run_python(code)
    return done, time.perf_counter() - t0


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_serve_refuses_a_port_out_of_range_before_loading_anything(port, tmp_path):
    done, _ = _serve_in_subprocess(port, tmp_path)
    assert json.loads(done.stdout) == {"rc": 2, "torch": False}
    assert done.stderr.strip() == f"hediff: error: --port must be an integer in [1, 65535], got {port}"


def test_serve_refuses_a_port_in_use_before_loading_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done, _ = _serve_in_subprocess(port, tmp_path)
    assert json.loads(done.stdout) == {"rc": 2, "torch": False}
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hediff: error: --port {port} cannot be used on 127.0.0.1")


def test_gui_names_the_missing_xcb_libraries_and_the_apt_line(monkeypatch, capsys):
    import ctypes.util

    from hediff.desktop.ui.app import missing_system_libraries

    def lookup(name: str) -> str | None:
        return None if name in ("xcb-cursor", "xcb-keysyms") else f"lib{name}.so.0"

    line = missing_system_libraries(env={"DISPLAY": ":0"}, platform="linux", find_library=lookup)
    assert line.endswith("sudo apt-get install libxcb-cursor0 libxcb-keysyms1")
    assert missing_system_libraries(env={"DISPLAY": ":0"}, platform="linux", find_library=lambda n: "x") is None
    # offscreen and wayland do not load the xcb plugin
    assert missing_system_libraries(env={"QT_QPA_PLATFORM": "offscreen"}, platform="linux", find_library=lookup) is None

    # through `hediff gui`: the line is printed and Qt is never started
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lookup)
    assert main(["gui"]) == 2
    assert capsys.readouterr().err.strip() == (
        "hediff gui: the desktop app needs libxcb-cursor0, libxcb-keysyms1; "
        "install with: sudo apt-get install libxcb-cursor0 libxcb-keysyms1"
    )


def test_ctrl_c_mid_generation_stops_with_one_line_and_no_file(tiny_model_dir, tmp_path):
    out = tmp_path / "out.png"
    cmd = [sys.executable, "-m", "hediff.desktop.cli", "generate", "--local-backend", "--model", str(tiny_model_dir)]
    # the server's most steps: the run must still be going when the signal comes, even on a fast idle machine
    cmd += ["--prompt", "a red circle", "--steps", "500", "--scheduler", "ddim", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = ""
    try:
        while "denoising" not in seen:  # the progress bar is up: the loop runs
            chunk = proc.stderr.read(1)
            assert chunk, f"exited before denoising: {seen}"
            seen += chunk
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rest_out, rest_err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = (seen + rest_err).replace("\r", "\n")
    own_lines = [line for line in err.splitlines() if line.startswith("hediff")]
    assert proc.returncode == 130, err
    assert own_lines == ["hediff: cancelled"]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither out.png nor a partial file
