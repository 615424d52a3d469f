"""The main window end to end (pytest-qt): generation through the worker thread against a real loopback backend,
cancel, the queue, errors, closing mid-job and settings persistence. Tiny model, 32x32 px, a few steps."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import pytestqt  # noqa: F401  # the qtbot fixture; a missing GUI extra must fail these tests, not skip them
from PySide6.QtCore import QObject, Qt, Slot

from hediff.desktop.core.keystore import MemoryKeyring, SecretStore
from hediff.desktop.core.services import AppServices
from hediff.desktop.ui.main_window import MainWindow, format_eta
from hediff.desktop.ui.timing_chart import TimingChart, nice_ceiling

TIMEOUT_MS = 60_000


class Recorder(QObject):
    """Receives the worker's signals on the GUI thread (a plain function would run on the worker's thread)."""

    def __init__(self, worker, on_first_step=None):
        super().__init__()
        self.events: list[tuple] = []
        self.steps = 0
        self.step_threads: set[bool] = set()
        self._on_first_step = on_first_step
        worker.jobStarted.connect(self.started)
        worker.stepUpdate.connect(self.step)
        worker.jobFinished.connect(self.finished)
        worker.jobFailed.connect(self.failed)
        worker.jobCancelled.connect(self.cancelled)

    @Slot(int)
    def started(self, job_id: int) -> None:
        self.events.append(("started", job_id))

    @Slot(object)
    def step(self, update) -> None:
        self.steps += 1
        self.step_threads.add(threading.current_thread() is threading.main_thread())
        self.events.append(("step", update.index))
        if self.steps == 1 and self._on_first_step is not None:
            self._on_first_step()

    @Slot(int, object)
    def finished(self, job_id: int, result) -> None:
        self.events.append(("finished", job_id, result))

    @Slot(int, str)
    def failed(self, job_id: int, message: str) -> None:
        self.events.append(("failed", job_id, message))

    @Slot(int)
    def cancelled(self, job_id: int) -> None:
        self.events.append(("cancelled", job_id))

    def ended(self) -> list[tuple]:
        return [e for e in self.events if e[0] in ("finished", "failed", "cancelled")]

    def steps_of(self, job_id: int) -> int:
        """Step updates that arrived between job_id's start and its end."""
        n, inside = 0, False
        for e in self.events:
            if e[0] == "started":
                inside = e[1] == job_id
            elif e[0] == "step" and inside:
                n += 1
        return n


def steps_after_cancel(worker) -> list[int]:
    """Indices of step updates the worker emitted after the running job's cancel flag was set (counted on the
    worker thread at emit time, so a busy GUI thread cannot blur it). At most the step in flight may follow."""
    seen: list[int] = []

    def count(update) -> None:
        job = worker.current_job()
        if job is not None and job.cancel.is_set():
            seen.append(update.index)

    worker.stepUpdate.connect(count, Qt.ConnectionType.DirectConnection)
    return seen


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _services(data_dir, secrets=None) -> AppServices:
    return AppServices(data_dir=data_dir, secrets=secrets or SecretStore(MemoryKeyring()))


@pytest.fixture
def services(tmp_path, backend, tiny_model_dir):
    """App services on a fresh data dir with the session's loopback backend as the selected remote server."""
    s = _services(tmp_path / "data")
    entry = s.settings.add_server("Test backend", backend.url, backend.token, s.secrets)
    entry.not_private_ok = True  # acknowledged once, as the window asks before the first job
    s.settings.selected_server = entry.id
    s.settings.model = str(tiny_model_dir)
    s.settings.params = {"steps": 3, "width": 32, "height": 32, "scheduler": "ddim", "seed": 7}
    s.settings.save()
    return s


@pytest.fixture
def make_window(qtbot):
    def make(services) -> MainWindow:
        window = MainWindow(services)
        qtbot.addWidget(window)
        window.show()
        return window

    return make


def add_server(window: MainWindow, name: str, url: str, token: str):
    """Through the Servers panel when it is there (its serversChanged refreshes the chooser), else directly."""
    panel = window.servers_panel
    if hasattr(panel, "add_server"):
        entry = panel.add_server(name, url, token)
        assert entry is not None
    else:
        entry = window.services.settings.add_server(name, url, token, window.services.secrets)
        window._servers_changed()
    assert window.form.select_server(entry.id), "the server chooser was not refreshed"
    window.services.settings.acknowledge_not_private(entry.id)  # as the user does once when first asked
    return entry


def queue(window: MainWindow, prompt: str = "a red circle", **fields) -> int:
    form = window.form
    form.prompt_edit.setPlainText(prompt)
    spins = {"steps": form.steps_spin, "width": form.width_spin, "height": form.height_spin, "seed": form.seed_spin}
    for name, value in fields.items():
        spins[name].setValue(value)
    job_id = window.generate()
    assert job_id is not None, window.message_label.text()
    return job_id


def wait_ended(qtbot, recorder: Recorder, n: int, timeout: int = TIMEOUT_MS) -> list[tuple]:
    qtbot.waitUntil(lambda: len(recorder.ended()) >= n, timeout=timeout)
    return recorder.ended()


# --- the happy path ----------------------------------------------------------------------------------


def test_generate_end_to_end(qtbot, services, make_window):
    window = make_window(services)
    rec = Recorder(window.worker)
    job = queue(window, steps=3)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("finished", job), event
    result = event[2]

    assert rec.steps == 3  # one preview per step, delivered on the GUI thread
    assert rec.step_threads == {True}
    assert not window.preview.pixmap().isNull()
    assert window.preview.is_final()
    assert window.preview.pixmap().width() == 32
    assert window.progress.value() == window.progress.maximum() == 3
    assert window.timing_chart.bar_count() == 3
    assert "3 steps" in window.timing_chart.totals_text()
    sent, received = window.timing_chart.bytes_totals()
    assert sent == sum(result.bytes_sent) > 0 and received == sum(result.bytes_received) > 0

    privacy = window.privacy_panel
    assert result.key_fingerprint and result.key_fingerprint in privacy.key_label.text()
    assert "ephemeral" in privacy.key_label.text()
    rows = privacy.sent_rows()
    assert any(kind == "ciphertext" for _, kind, _, _ in rows)
    assert any(kind == "tensor" for _, kind, _, _ in rows)
    assert "PSNR" in privacy.leakage_label.text()  # the measured leakage of the job's mode (desktop/core/leakage.py)
    assert "100.0 %" in privacy.fraction_label.text()

    entries = services.gallery.entries()
    assert len(entries) == 1
    # "remember prompt" is off by default: the gallery keeps every setting but the prompts
    assert entries[0].params == replace(result.params, prompt="", negative_prompt="")
    assert entries[0].image_path.is_file()
    assert "finished" in window.statusBar().currentMessage()
    assert window.queue_view.pending_ids() == []


def test_the_default_is_private_on_this_device(qtbot, tmp_path, tiny_model_dir, make_window):
    s = _services(tmp_path / "fresh")
    s.settings.model = str(tiny_model_dir)
    s.settings.params = {"steps": 2, "width": 32, "height": 32, "scheduler": "ddim", "seed": 3}
    s.settings.save()
    window = make_window(s)
    assert window.form.server_combo.currentText() == "This device (private)"
    assert window.privacy_line.text() == "Private: this device (nothing leaves this machine)"
    assert "#2e7d32" in window.privacy_line.styleSheet()  # green
    rec = Recorder(window.worker)
    job = queue(window, steps=2)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("finished", job), event
    result = event[2]
    assert result.mode == "on-device" and sum(result.bytes_sent) == 0
    assert window.timing_chart.bytes_totals() == (0, 0)


def test_an_unattested_server_is_labelled_and_asked_for_once(qtbot, tmp_path, backend, tiny_model_dir, make_window):
    s = _services(tmp_path / "ask")
    s.settings.model = str(tiny_model_dir)
    entry = s.settings.add_server("Rented GPU", backend.url, backend.token, s.secrets)
    s.settings.selected_server = entry.id
    s.settings.params = {"steps": 2, "width": 32, "height": 32, "scheduler": "ddim", "split": "conv_in"}
    s.settings.save()
    window = make_window(s)
    assert window.privacy_line.text().startswith("Not private: this server can rebuild your images")
    assert "#c62828" in window.privacy_line.styleSheet()  # red
    asked = []
    window.confirm = lambda title, text: asked.append(text) or False
    window.form.prompt_edit.setPlainText("a red circle")
    assert window.generate() is None and window.worker.pending_jobs() == []
    assert "Not private" in asked[0] and "Nothing was sent" in window.message_label.text()
    window.confirm = lambda title, text: asked.append(text) or True
    assert window.generate() is not None
    assert len(asked) == 2
    reloaded = type(s.settings).load(tmp_path / "ask")
    assert reloaded.server(entry.id).not_private_ok  # asked once per server: the answer is kept
    assert window.generate() is not None and len(asked) == 2
    window.worker.shutdown()


def test_progress_text_and_chart_helpers(qtbot):
    assert format_eta(12.4) == "12 s"
    assert format_eta(125) == "2 min 05 s"
    assert nice_ceiling(0.26) == pytest.approx(0.3)
    chart = TimingChart()
    qtbot.addWidget(chart)
    chart.resize(400, 250)
    chart.clear(4)
    chart.add_step({"head": 0.01, "server_body": 0.2, "encrypt": 0.02}, 1000, 500)
    assert chart.bar_count() == 1
    shot = chart.grab().toImage()
    ratio = chart.devicePixelRatioF()
    assert (shot.width(), shot.height()) == (round(400 * ratio), round(250 * ratio))
    colours = {shot.pixel(x, y) for x in range(0, shot.width(), 3) for y in range(0, shot.height(), 3)}
    assert len(colours) >= 4  # background, axes, text and the stacked bar's stage colours are drawn
    assert chart.totals()["server_body"] == pytest.approx(0.2)


# --- cancel, queue -----------------------------------------------------------------------------------


def test_cancel_mid_job_then_the_next_job_runs(qtbot, services, make_window):
    window = make_window(services)
    rec = Recorder(window.worker, on_first_step=window.cancel)  # cancel as soon as the first preview arrives
    late = steps_after_cancel(window.worker)
    long_job = queue(window, "a long one", steps=400)
    short_job = queue(window, "a short one", steps=2)
    ended = wait_ended(qtbot, rec, 2)
    assert [e[:2] for e in ended] == [("cancelled", long_job), ("finished", short_job)]
    assert len(late) <= 1  # within one step: at most the step in flight when Cancel was pressed
    assert rec.steps_of(long_job) < 400
    assert rec.steps_of(short_job) == 2
    assert "cancelled" in window.progress.format() or "Done" in window.progress.format()
    assert len(services.gallery.entries()) == 1  # the cancelled job saved nothing


def test_queue_takes_jobs_while_one_runs_and_keeps_order(qtbot, services, make_window):
    services.settings.remember_prompt = True  # the gallery keeps the prompts, which tell the jobs apart below
    window = make_window(services)
    added: list[int] = []
    pending_seen: list[list[int]] = []

    def add_two():
        assert window.worker.current_job() is not None
        added.append(queue(window, "second", steps=2))
        added.append(queue(window, "third", steps=2))
        pending_seen.append(window.queue_view.pending_ids())

    rec = Recorder(window.worker, on_first_step=add_two)
    first = queue(window, "first", steps=12)
    ended = wait_ended(qtbot, rec, 3)
    assert [e[:2] for e in ended] == [("finished", first), ("finished", added[0]), ("finished", added[1])]
    assert pending_seen == [added]
    assert [e.params.prompt for e in services.gallery.entries()] == ["third", "second", "first"]  # newest first
    assert window.queue_view.pending_ids() == []


def test_remove_a_pending_job(qtbot, services, make_window):
    window = make_window(services)
    removed: list[bool] = []
    rec = Recorder(window.worker)
    first = queue(window, "first", steps=2)
    second = queue(window, "second", steps=2)
    window.queue_view.select_job(second)
    assert window.queue_view.remove_button.isEnabled()
    window.queue_view.remove_button.click()
    removed.append(second not in [j.id for j in window.worker.pending_jobs()])
    ended = wait_ended(qtbot, rec, 1)
    qtbot.wait(200)
    assert removed == [True]
    assert [e[:2] for e in rec.ended()] == [("finished", first)] == [e[:2] for e in ended]


# --- errors ------------------------------------------------------------------------------------------


def test_unreachable_server_is_named_and_the_local_server_still_works(qtbot, services, make_window):
    window = make_window(services)
    add_server(window, "Dead box", f"http://127.0.0.1:{_closed_port()}", "hdt_whatever")
    rec = Recorder(window.worker)
    job = queue(window, steps=2)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("failed", job)
    message = window.message_label.text()
    assert "Dead box" in message and "cannot reach" in message
    assert message in window.statusBar().currentMessage()
    assert window.progress.format() == f"Job #{job} failed"

    assert window.form.select_server("local")
    job2 = queue(window, steps=2)
    ended = wait_ended(qtbot, rec, 2)
    assert ended[1][:2] == ("finished", job2), ended[1]
    assert "finished" in window.message_label.text()


def test_bad_token_message_mentions_the_token(qtbot, services, make_window, backend):
    window = make_window(services)
    add_server(window, "Wrong token", backend.url, "hdt_not-the-right-one")
    rec = Recorder(window.worker)
    job = queue(window, steps=2)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("failed", job)
    assert "token" in window.message_label.text() and "Wrong token" in window.message_label.text()
    assert "hdt_not-the-right-one" not in window.message_label.text()


def test_server_dying_mid_job_fails_the_job_and_the_app_keeps_working(qtbot, services, make_window, server_model):
    from tests.conftest import start_backend

    running, flaky = start_backend(server_model)
    try:
        good = services.settings.selected_server
        window = make_window(services)
        add_server(window, "Flaky box", flaky.url, flaky.token)
        # stop the server from another thread when the first step is in (stop() waits for in-flight requests)
        rec = Recorder(window.worker, on_first_step=lambda: threading.Thread(target=running.stop, daemon=True).start())
        job = queue(window, steps=400)
        (event,) = wait_ended(qtbot, rec, 1)
        assert event[:2] == ("failed", job), event
        assert "Flaky box" in window.message_label.text()
        assert "cannot reach" in window.message_label.text() or "answer" in window.message_label.text()

        assert window.form.select_server(good)
        job2 = queue(window, steps=2)
        assert wait_ended(qtbot, rec, 2)[1][:2] == ("finished", job2)
    finally:
        running.stop()


def test_stored_device_key_is_used_when_chosen(qtbot, services, make_window):
    services.settings.key_policy = "device"
    window = make_window(services)
    rec = Recorder(window.worker)
    queue(window, steps=2)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[0] == "finished", event
    info = services.keys.info(event[2].params.he_preset)
    assert info is not None and event[2].key_fingerprint == info.fingerprint
    assert "stored device key" in window.privacy_panel.key_label.text()
    assert info.fingerprint in window.privacy_panel.key_label.text()


def test_gallery_load_settings_fills_the_form(qtbot, services, make_window):
    from hediff.desktop.core.engine import GenerationParams

    window = make_window(services)
    params = GenerationParams(
        prompt="from the gallery", negative_prompt="no", steps=9, seed=99, width=40, height=48, scheduler="euler"
    )
    window.gallery_panel.loadSettingsRequested.emit(params)
    form = window.form
    assert form.params() == params
    assert form.seed_locked  # loading settings back means reproducing them: the seed is kept


def test_bad_input_is_refused_before_queueing(qtbot, services, make_window):
    window = make_window(services)
    window.form.prompt_edit.setPlainText("   ")
    assert window.generate() is None
    assert "prompt is empty" in window.message_label.text()
    window.form.prompt_edit.setPlainText("a red circle")
    window.form.width_spin.setValue(36)  # the form holds only sizes the model accepts
    assert window.form.width_spin.value() == 40
    window.form.steps_spin.setValue(0)
    assert window.form.steps_spin.value() == 1
    assert window.worker.pending_jobs() == [] and window.worker.current_job() is None


# --- closing, settings -------------------------------------------------------------------------------


def test_closing_mid_job_stops_the_worker_and_keeps_finished_images(qtbot, services, make_window, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    asked: list[str] = []  # a job is still queued: the window asks first (tests/test_gui_daily.py); "Yes"
    monkeypatch.setattr(QMessageBox, "question", lambda *args: asked.append(args[2]) or QMessageBox.StandardButton.Yes)
    services.settings.remember_prompt = True  # the gallery keeps the prompts, which tell the jobs apart below
    window = make_window(services)
    rec = Recorder(window.worker)
    done = queue(window, "kept", steps=2)
    wait_ended(qtbot, rec, 1)
    assert rec.ended()[0][:2] == ("finished", done)

    closed: list[bool] = []
    rec.events.clear()
    rec.steps = 0
    rec._on_first_step = lambda: closed.append(window.close())
    late = steps_after_cancel(window.worker)
    queue(window, "interrupted", steps=400)
    queue(window, "never started", steps=2)
    qtbot.waitUntil(lambda: bool(closed), timeout=TIMEOUT_MS)
    assert closed == [True]
    assert asked == ["1 queued job will not run, and the running one stops. Quit?"]
    assert not window.worker.thread_running
    assert len(late) <= 1
    assert [e.params.prompt for e in services.gallery.entries()] == ["kept"]
    window.close()  # a second close is harmless


def test_a_new_window_starts_from_the_models_recommended_settings(services, make_window, tiny_model_dir, tmp_path):
    import shutil

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / "hediff.json").write_text(json.dumps({"recommended": {"guidance": 3.5, "steps": 9}}))
    services.settings.model = str(model)
    services.settings.params = {"seed": 7}
    window = make_window(services)
    assert window.form.guidance_spin.value() == pytest.approx(3.5) and window.form.steps_spin.value() == 9
    window.close()
    services.settings.params = {"guidance": 6.0}  # what the user saved wins
    window = make_window(services)
    assert window.form.guidance_spin.value() == pytest.approx(6.0) and window.form.steps_spin.value() == 9
    window.close()


def test_settings_persist_across_windows(qtbot, services, make_window):
    window = make_window(services)
    window.form.steps_spin.setValue(5)
    window.form.guidance_spin.setValue(4.5)
    window.form.width_spin.setValue(48)
    window.form.scheduler_combo.setCurrentText("euler")
    window.form.seed_spin.setValue(4242)
    window.form.prompt_edit.setPlainText("secret prompt")
    window.resize(770, 640)  # within the offscreen screen (800x800): restoreGeometry clamps to the screen
    qtbot.wait(10)
    window.close()

    again = make_window(_services(services.data_dir, services.secrets))
    form = again.form
    assert form.steps_spin.value() == 5
    assert form.guidance_spin.value() == pytest.approx(4.5)
    assert form.width_spin.value() == 48
    assert form.scheduler_combo.currentText() == "euler"
    assert form.seed_spin.value() == 4242
    assert form.model() == services.settings.model
    assert form.server_id() == services.settings.selected_server
    assert form.prompt_edit.toPlainText() == ""  # prompts are not remembered by default
    assert (again.width(), again.height()) == (770, 640)
    assert "secret prompt" not in (services.data_dir / "settings.json").read_text()


def test_run_gui_opens_the_window_and_shuts_it_down(qtbot, services, monkeypatch):
    from PySide6.QtWidgets import QApplication

    from hediff.desktop.ui.app import run_gui

    seen: list[MainWindow] = []

    def fake_exec(app) -> int:  # the real loop would run until quit(), which the shared test QApplication must not
        qtbot.wait(50)
        seen.extend(w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible())
        return 0

    monkeypatch.setattr(QApplication, "exec", fake_exec)
    assert run_gui(["hediff"], services=services) == 0
    assert [w.windowTitle() for w in seen] == ["HE-Diffusion"]
    assert not seen[0].worker.thread_running  # shut down when the loop ended
    assert (services.data_dir / "settings.json").is_file()
    seen[0].close()
