"""The desktop app's everyday tools (pytest-qt, offscreen): key operations off the GUI thread, the Keys tab after a
generation, ... Jobs run against the session's real loopback backend with the tiny model."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import threading
from pathlib import Path

import pytest
import pytestqt  # noqa: F401  # the qtbot fixture; a missing GUI extra must fail these tests, not skip them
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QTimer, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QFontMetrics, QImage, QWheelEvent
from PySide6.QtWidgets import QAbstractButton, QApplication, QDialogButtonBox, QWidget

from hediff.desktop.ui.keys_panel import KeysPanel
from hediff.desktop.ui.queue_view import EMPTY_TEXT
from hediff.desktop.ui.timing_chart import LABELS, TIMING_KEYS
from tests.test_gui_main import Recorder, _services, make_window, queue, services, wait_ended  # noqa: F401


class _GatedKeys:
    """The real DeviceKeys, except that each operation first waits for ``gate``: only a timer on the GUI thread
    opens it, so an operation run on the GUI thread would never end (it would time out and fail)."""

    def __init__(self, keys):
        self._keys = keys
        self.gate = threading.Event()
        self.threads: list[threading.Thread] = []

    def __getattr__(self, name):
        return getattr(self._keys, name)

    def _gated(self, fn, *args):
        self.threads.append(threading.current_thread())
        if not self.gate.wait(20):
            raise TimeoutError("the GUI thread never ran its timer while the key operation was in flight")
        return fn(*args)

    def get_or_create(self, preset):
        return self._gated(self._keys.get_or_create, preset)

    def rotate(self, preset):
        return self._gated(self._keys.rotate, preset)


@pytest.mark.parametrize("operation", ["create", "rotate"])
def test_key_operations_leave_the_event_loop_running_and_their_result_lands(qtbot, services, operation):  # noqa: F811
    panel = KeysPanel(services)
    qtbot.addWidget(panel)
    before = services.keys.get_or_create("fast").fingerprint if operation == "rotate" else None
    panel.refresh()
    gated = _GatedKeys(services.keys)
    services.keys = gated
    ticks: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1) or (len(ticks) >= 3 and gated.gate.set()))
    timer.start(10)

    started = panel.start_create("fast") if operation == "create" else panel.start_rotate("fast")
    assert started and panel.busy
    box = panel.preset_boxes["fast"]
    assert not any(b.isEnabled() for b in (box.create_button, box.rotate_button, box.delete_button))
    assert "Working" in panel.status_label.text()
    assert panel.wait(30_000)
    timer.stop()
    assert len(ticks) >= 3  # the GUI thread ran its timer while the operation was in flight
    assert gated.threads and threading.main_thread() not in gated.threads
    info = services.keys.info("fast")
    assert info is not None and info.fingerprint != before
    assert box.fingerprint.text() == info.fingerprint  # what the user sees
    assert info.fingerprint in panel.status_label.text()
    assert box.rotate_button.isEnabled() and not box.create_button.isEnabled()


def test_a_second_key_operation_waits_for_the_first(qtbot, services):  # noqa: F811
    panel = KeysPanel(services)
    qtbot.addWidget(panel)
    gated = _GatedKeys(services.keys)
    services.keys = gated
    assert panel.start_create("fast")
    assert not panel.start_create("paper")
    assert "still running" in panel.result_label.text()
    gated.gate.set()
    assert panel.wait(30_000)
    assert services.keys.info("fast") is not None and services.keys.info("paper") is None


def test_the_keys_tab_shows_the_device_key_a_generation_created(qtbot, services, make_window):  # noqa: F811
    services.settings.key_policy = "device"
    window = make_window(services)
    window.form.encryption_combo.setCurrentIndex(window.form.encryption_combo.findData("full"))
    preset = window.form.params().he_preset
    box = window.keys_panel.preset_boxes[preset]
    assert box.fingerprint.text() == "no device key"
    rec = Recorder(window.worker)
    job = queue(window, steps=2)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("finished", job), event
    info = services.keys.info(preset)
    assert info is not None and box.fingerprint.text() == info.fingerprint
    window.close()


def test_one_short_no_keyring_message_everywhere(qtbot, tmp_path):
    from keyring.backends import fail

    from hediff.desktop.core.keystore import KeyringUnavailable, SecretStore, keyring_advice
    from hediff.desktop.core.services import AppServices
    from hediff.desktop.ui.servers_panel import ServersPanel

    bare = AppServices(data_dir=tmp_path / "data", secrets=SecretStore(fail.Keyring()))
    with pytest.raises(KeyringUnavailable) as raised:  # what the CLI and the API print
        bare.secrets.get("server-token:x")
    message = str(raised.value)
    assert message.startswith("No usable system keyring (no keyring backend was found). To fix: ")
    assert keyring_advice() in message and "passphrase" in message and len(message) < 260
    keys, servers = KeysPanel(bare), ServersPanel(bare)
    qtbot.addWidget(keys)
    qtbot.addWidget(servers)
    assert keys.keyring_label.text() == servers.keyring_label.text() == message
    seen = []
    servers.ask_server = lambda **kw: seen.append(kw) or None
    servers.add_button.click()
    assert seen[0]["token_blocked"] == message  # the server dialog's note over its disabled token field


# --- the queue and the Timing tab ------------------------------------------------------------------


def test_the_queue_keeps_its_order_and_moves_only_when_asked(qtbot, services, make_window):  # noqa: F811
    window = make_window(services)
    view = window.queue_view
    running = queue(window, "long", steps=400)
    qtbot.waitUntil(lambda: window.worker.current_job() is not None)
    waiting = [queue(window, name, steps=2) for name in ("second", "third", "fourth")]
    assert view.pending_ids() == waiting
    view.select_job(waiting[2])
    rows = view.row_texts()
    item = view.list.item(3)
    window.worker.queueChanged.emit()  # any change of the queue (a step, another job queued) redraws it
    QApplication.processEvents()
    assert view.row_texts() == rows and view.list.item(3) is item  # the same row objects, in place
    assert view.selected_job_id() == waiting[2]

    qtbot.mouseClick(view.up_button, Qt.MouseButton.LeftButton)  # "fourth" one place sooner
    qtbot.waitUntil(lambda: view.pending_ids() == [waiting[0], waiting[2], waiting[1]])
    assert [j.id for j in window.worker.pending_jobs()] == [waiting[0], waiting[2], waiting[1]]
    assert view.selected_job_id() == waiting[2]  # the selection follows the job
    assert view.row_texts()[2].startswith(f"#{waiting[2]} queued")

    view.reorderRequested.emit([waiting[1], waiting[0], waiting[2]])  # what dropping a dragged row sends
    qtbot.waitUntil(lambda: view.pending_ids() == [waiting[1], waiting[0], waiting[2]])
    assert [j.id for j in window.worker.pending_jobs()] == [waiting[1], waiting[0], waiting[2]]
    assert view.row_texts()[0].startswith(f"#{running} running")  # the running job stays first

    for job_id in waiting:
        window.worker.remove_pending(job_id)
    window.cancel()
    qtbot.waitUntil(lambda: window.worker.current_job() is None, timeout=60_000)
    assert view.row_texts() == [EMPTY_TEXT]
    window.close()


@pytest.mark.parametrize("size", [(1024, 700), (1920, 1080)])
def test_the_timing_legend_is_whole_at_common_window_sizes(qtbot, services, make_window, size):  # noqa: F811
    window = make_window(services)
    window.resize(*size)
    window.tabs.setCurrentWidget(window.timing_chart)
    qtbot.waitUntil(lambda: window.size().toTuple() == size)
    QApplication.processEvents()
    chart = window.timing_chart
    chart.clear(3)
    for _ in range(3):  # long totals ("1 min 15 s") are the widest values the legend shows
        chart.add_step({k: 25.0 for k in TIMING_KEYS})
    # the tabs panel is as wide as its widest tab needs: the chart is whole on screen, not cut at the window's edge
    assert chart.visibleRegion().boundingRect().size() == chart.size()
    for i in range(window.tabs.count()):
        window.tabs.setCurrentIndex(i)
        QApplication.processEvents()
        page = window.tabs.widget(i)
        assert page.visibleRegion().boundingRect().width() == page.width(), window.tabs.tabText(i)
    window.tabs.setCurrentWidget(chart)
    QApplication.processEvents()
    # and the image bar fits the centre column
    for button in window.image_view.findChildren(QAbstractButton):
        assert button.visibleRegion().boundingRect().size() == button.size(), button.text()
    fm = QFontMetrics(chart.font())
    plot, header, entries = chart.legend_layout()
    assert len(entries) == len(TIMING_KEYS)
    values = chart._legend_values()
    for key, rect in entries:
        assert chart.rect().contains(rect), (key, rect, chart.rect())
        assert 16 + fm.horizontalAdvance(LABELS[key]) + 8 + fm.horizontalAdvance(values[key]) <= rect.width()
        assert not rect.intersects(plot)
        assert all(not rect.intersects(other) for k, other in entries if k != key)
    assert plot.width() >= 200 and plot.height() >= 80  # the bars stay readable too
    window.close()


# --- the image: zoom, large view, export larger, copy, drag out, PNG in, seeds ------------------------


def _finished_job(qtbot, window, **fields):
    rec = Recorder(window.worker)
    job = queue(window, **fields)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("finished", job), event
    return event[2]


def test_zoom_fit_one_to_one_wheel_and_buttons(qtbot, services, make_window):  # noqa: F811
    window = make_window(services)
    window.resize(1280, 800)
    _finished_job(qtbot, window, steps=2)
    view, preview = window.image_view, window.preview
    side = preview.pixmap().width()
    assert preview.is_fit() and preview.zoom() > 4  # a 32 px image fills the view
    assert preview.zoom_text().startswith("Fit · ") and view.fit_button.isChecked()
    view.actual_button.click()
    assert preview.zoom() == 1.0 and preview.image_rect().width() == side and preview.zoom_text() == "100%"
    assert not view.fit_button.isChecked()
    view.in_button.click()
    assert preview.zoom() == pytest.approx(1.25) and preview.zoom_text() == "125%"
    view.out_button.click()
    view.out_button.click()
    assert preview.zoom() == pytest.approx(0.8)

    # the wheel zooms around the cursor: the image point under it stays under it
    view.actual_button.click()
    cursor = preview.image_rect().topLeft() + QPointF(8, 8)
    under = preview.image_point(cursor)
    for delta in (40, 40, 40, 120):  # a touchpad's small steps, then one notch: 1.25 ** 2 in all
        qtbot.wait(1)
        event = QWheelEvent(
            cursor,
            preview.mapToGlobal(cursor),
            QPoint(),
            QPoint(0, delta),
            Qt.MouseButton.NoButton,
            Qt.KeyboardModifier.NoModifier,
            Qt.ScrollPhase.NoScrollPhase,
            False,
        )
        QApplication.sendEvent(preview, event)
    assert preview.zoom() == pytest.approx(1.25**2)
    after = preview.image_point(cursor)
    assert (after.x(), after.y()) == pytest.approx((under.x(), under.y()))
    view.fit_button.click()
    assert preview.is_fit() and preview.image_rect().width() > side
    window.close()


def test_large_view_and_export_larger(qtbot, services, make_window, tmp_path):  # noqa: F811
    from PIL import Image

    window = make_window(services)
    _finished_job(qtbot, window, steps=2)
    panel = window.gallery_panel
    panel.select(panel.entry_ids()[0])
    viewer = panel.view_selected()
    screen = viewer.screen().availableGeometry()
    assert viewer.isVisible() and viewer.width() >= 0.7 * screen.width() - 1  # large: most of the screen
    assert viewer.view.preview.pixmap().width() == 32 and viewer.view.preview.zoom() > 10
    viewer.view.actual_button.click()
    assert viewer.view.preview.zoom() == 1.0
    viewer.close()

    source = Image.open(panel.selected_entry().image_path).convert("RGB")
    panel.scale_combo.setCurrentIndex(panel.scale_combo.findData(8))
    crisp = panel.export_selected(tmp_path / "crisp.png")
    assert crisp is not None and "8× crisp" in panel.status_label.text()
    with Image.open(crisp) as im:
        assert im.size == (256, 256)
        big = im.convert("RGB")
    # nearest: every 8x8 block is one source pixel
    assert big.resize((32, 32), Image.Resampling.NEAREST).tobytes() == source.tobytes()
    assert big.crop((0, 0, 8, 8)).getcolors() == [(64, source.getpixel((0, 0)))]
    panel.smooth_check.setChecked(True)
    panel.scale_combo.setCurrentIndex(panel.scale_combo.findData(2))
    smooth = panel.export_selected(tmp_path / "smooth.png")
    with Image.open(smooth) as im:
        assert im.size == (64, 64) and "hediff:seed" in im.text
        assert len(im.convert("RGB").getcolors(1 << 16)) > len(source.getcolors(1 << 16))  # filtered, not blocks
    assert panel.export_selected(tmp_path / "bad.png", scale=5) is None
    assert "must be one of 1, 2, 3, 4, 6, 8" in panel.result_label.text()
    window.close()


def test_copy_and_drag_carry_the_image_and_its_file(qtbot, services, make_window):  # noqa: F811
    window = make_window(services)
    _finished_job(qtbot, window, steps=2)
    entry = window.services.gallery.entries()[0]
    assert window.preview.image_path == entry.image_path
    mime = window.preview.drag_mime_data()
    assert [u.toLocalFile() for u in mime.urls()] == [str(entry.image_path)]
    assert mime.hasImage() and mime.imageData().size() == window.preview.pixmap().size()

    clipboard = QApplication.clipboard()
    clipboard.clear()
    window.image_view.copy_button.click()
    assert clipboard.image().size().toTuple() == (32, 32)
    assert clipboard.image().pixel(5, 5) == QImage(str(entry.image_path)).pixel(5, 5)
    clipboard.clear()
    panel = window.gallery_panel
    panel.select(entry.id)
    assert panel.copy_selected() and clipboard.image().size().toTuple() == (32, 32)
    dragged = panel.list.mimeData(panel.list.selectedItems())  # what dragging a thumbnail out carries
    assert [u.toLocalFile() for u in dragged.urls()] == [str(entry.image_path)] and dragged.hasImage()
    window.close()


def test_dropping_a_png_loads_its_settings_and_seed_buttons(qtbot, services, make_window, tmp_path):  # noqa: F811
    services.settings.embed_prompt_in_png = True  # the gallery's PNG carries the prompt
    window = make_window(services)
    result = _finished_job(qtbot, window, steps=2, seed=4242)
    form = window.form
    assert form.seed_spin.value() != 4242 or not form.seed_locked  # Generate moved on to a new seed

    window.reuse_seed_button.click()  # one click: the shown image's seed, kept
    assert form.seed_spin.value() == 4242 and form.seed_locked
    form.seed_random_button.click()  # one click: a new random seed
    assert form.seed_spin.value() != 4242

    panel = window.gallery_panel
    panel.select(panel.entry_ids()[0])
    with_prompt = panel.selected_entry().image_path
    form.steps_spin.setValue(9)
    form.prompt_edit.setPlainText("something else")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(with_prompt))])
    drop = QDropEvent(
        QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    # Qt delivers a drop only inside a real drag-and-drop session, so the test hands it to the handler Qt calls
    enter = QDragEnterEvent(
        QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    window.preview.dragEnterEvent(enter)
    assert enter.isAccepted()
    window.preview.dropEvent(drop)
    assert form.params().prompt == result.params.prompt, window.message_label.text()
    assert (form.steps_spin.value(), form.seed_spin.value()) == (2, 4242) and form.seed_locked
    assert f"Settings loaded from {with_prompt.name}" in window.message_label.text()

    without = panel.export_selected(tmp_path / "without.png", include_prompt=False)
    form.prompt_edit.setPlainText("my own prompt")
    form.steps_spin.setValue(9)
    assert window.load_png(without)
    assert form.params().prompt == "my own prompt" and form.steps_spin.value() == 2
    assert "yours was kept" in window.message_label.text()

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "other.png")
    assert not window.load_png(tmp_path / "other.png")
    assert "carries no HE-Diffusion settings" in window.message_label.text()
    assert form.steps_spin.value() == 2
    window.close()


# --- prompt history and gallery search ---------------------------------------------------------------


def _history_menu(form) -> list[str]:
    return [a.text() for a in form.history_menu.actions()]


def test_prompt_history_is_session_only_unless_prompts_are_remembered(qtbot, services, make_window):  # noqa: F811
    assert not services.settings.remember_prompt  # the default
    window = make_window(services)
    assert _history_menu(window.form) == ["No prompts yet this session"]
    queue(window, "a red circle", steps=400)
    queue(window, "a blue square", steps=2)
    queue(window, "a red circle", steps=2)  # again: moves to the top, listed once
    assert window.form.history_prompts() == ["a red circle", "a blue square"]
    window.form.history_menu.actions()[1].trigger()  # picking one puts it into the prompt box
    assert window.form.prompt_edit.toPlainText() == "a blue square"
    for job in window.worker.pending_jobs():
        window.worker.remove_pending(job.id)
    window.cancel()
    window.close()
    written = (services.data_dir / "settings.json").read_text()
    assert "blue square" not in written and "red circle" not in written
    again = make_window(_services(services.data_dir, services.secrets))
    assert again.form.history_prompts() == []
    again.close()


def test_remembered_prompt_history_survives_a_restart(qtbot, services, make_window):  # noqa: F811
    services.settings.remember_prompt = True
    services.settings.save()
    window = make_window(services)
    queue(window, "a lighthouse at dusk", steps=400)
    queue(window, "a fox in snow", steps=2)
    for job in window.worker.pending_jobs():
        window.worker.remove_pending(job.id)
    window.cancel()
    window.close()
    again = make_window(_services(services.data_dir, services.secrets))
    assert again.form.history_prompts() == ["a fox in snow", "a lighthouse at dusk"]
    # turning "remember prompts" off forgets them at the next save
    again.services.settings.remember_prompt = False
    again.prompt_history.sync()
    again.services.settings.save()
    assert "fox" not in (services.data_dir / "settings.json").read_text()
    again.close()


def test_gallery_search_by_prompt_model_and_date(qtbot, services, make_window, tiny_model_dir):  # noqa: F811
    import dataclasses
    import time

    services.settings.remember_prompt = True  # prompts are kept, hence searchable
    window = make_window(services)
    result = _finished_job(qtbot, window, steps=2)
    gallery = services.gallery
    other = dataclasses.replace(result, params=dataclasses.replace(result.params, prompt="a green triangle"))
    then = time.mktime((2025, 3, 14, 9, 26, 0, 0, 0, -1))
    gallery.clock = lambda: then
    gallery.add(other, False, remember_prompt=True, model="/models/other-model")
    panel = window.gallery_panel
    panel.refresh()
    assert len(panel.entry_ids()) == 2
    newest = gallery.entries()[0]
    assert newest.model == str(tiny_model_dir)

    def shown(query: str) -> list[str]:
        panel.search_edit.setText(query)
        return [panel._entries[i].params.prompt for i in panel.entry_ids()]

    assert shown("red") == ["a red circle"]
    assert shown("TRIANGLE green") == ["a green triangle"]
    assert shown("other-model") == ["a green triangle"]
    assert shown(str(tiny_model_dir)) == ["a red circle"]
    assert shown("2025-03-14") == ["a green triangle"]
    assert shown("") == ["a red circle", "a green triangle"]
    assert shown("purple") == [] and panel.list.isHidden()
    assert panel.empty_label.text() == "No image matches “purple” (2 in the gallery)."
    window.close()


# --- preferences -------------------------------------------------------------------------------------


def test_preferences_are_stored_and_applied(qtbot, services, make_window, tmp_path, monkeypatch):  # noqa: F811
    from hediff.desktop.core.appdata import default_data_dir
    from hediff.desktop.core.settings import DEVICE_SERVER_ID, Settings

    monkeypatch.delenv("HEDIFF_DATA_DIR", raising=False)
    config = tmp_path / "config"
    services.settings.remember_prompt = True
    window = make_window(services)
    queue(window, "a secret prompt", steps=400)
    window.cancel()
    dialog = window.open_preferences(config=config, modal=False)
    assert dialog.remember_check.isChecked() and not dialog.embed_check.isChecked()
    assert dialog.server_combo.currentText() == "Test backend"

    (tmp_path / "a-file").write_text("x")
    dialog.data_dir_edit.setText(str(tmp_path / "a-file" / "data"))  # under a file: cannot be a folder
    dialog.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    assert dialog.isVisible() and "cannot be used" in dialog.error_label.text()
    assert default_data_dir(config) != tmp_path / "a-file" / "data"

    dialog.data_dir_edit.setText(str(tmp_path / "elsewhere"))
    dialog.server_combo.setCurrentIndex(dialog.server_combo.findData(DEVICE_SERVER_ID))
    dialog.preview_combo.setCurrentIndex(dialog.preview_combo.findData("none"))
    dialog.remember_check.setChecked(False)
    dialog.embed_check.setChecked(True)
    dialog.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    assert not dialog.isVisible()
    assert default_data_dir(config) == tmp_path / "elsewhere" and (tmp_path / "elsewhere").is_dir()
    stored = Settings.load(services.data_dir)
    assert (stored.selected_server, stored.preview_kind) == (DEVICE_SERVER_ID, "none")
    assert not stored.remember_prompt and stored.embed_prompt_in_png
    assert "secret prompt" not in (services.data_dir / "settings.json").read_text()  # history forgotten on disk
    assert window.form.server_id() == DEVICE_SERVER_ID
    assert window.message_label.text() == "Preferences saved."
    qtbot.waitUntil(lambda: window.worker.current_job() is None, timeout=60_000)
    window.close()


def test_preview_off_shows_progress_only(qtbot, services, make_window):  # noqa: F811
    services.settings.preview_kind = "none"
    window = make_window(services)
    seen = {}

    def at_first_step():
        seen["empty"] = window.preview.pixmap().isNull()
        seen["caption"] = window.preview.caption()

    rec = Recorder(window.worker, on_first_step=at_first_step)
    job = queue(window, steps=3)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("finished", job)
    assert seen == {"empty": True, "caption": "Step 1 / 3 (preview off in Preferences)"}
    assert window.preview.is_final() and not window.preview.pixmap().isNull()  # the result is shown
    window.close()


# --- model manager -----------------------------------------------------------------------------------


def test_model_manager_adds_describes_and_sets_the_default(qtbot, services, make_window, tiny_model_dir, tmp_path):  # noqa: F811
    import json
    import shutil

    from hediff.common.settings import SizeLimits
    from hediff.desktop.core.settings import Settings

    services.settings.model = "embedded"
    services.settings.params = {"seed": 7}
    window = make_window(services)
    dialog = window.open_model_manager(modal=False)
    assert dialog.specs() == ["embedded"] and dialog.item_texts() == ["Embedded model  (default)"]
    assert dialog.size_label.text() == "128 × 128 px (up to 256 px)"
    assert dialog.recommended_label.text() == "guidance 2, steps 20"
    assert dialog.split_rows() == [(s, "yes") for s in ("conv_in", "down0.resnet0", "u1", "u2", "u3")]
    assert not dialog.remove_button.isEnabled()

    (tmp_path / "not-a-model").mkdir()
    assert not dialog.add_folder(tmp_path / "not-a-model")
    assert "model_index.json" in dialog.result_label.text() and dialog.specs() == ["embedded"]

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "my-model"))
    (folder / "hediff.json").write_text(json.dumps({"recommended": {"guidance": 3.5, "steps": 12}}))
    assert dialog.add_folder(folder)
    assert dialog.specs() == ["embedded", str(folder)] and dialog.selected_spec() == str(folder)
    native = SizeLimits.from_model_folder(folder).native_side
    assert dialog.size_label.text().startswith(f"{native} × {native} px")
    assert dialog.recommended_label.text() == "guidance 3.5, steps 12"
    rows = dict(dialog.split_rows())
    assert rows == {"conv_in": "yes", "down0.resnet0": "yes", "u1": "yes", "u2": "no", "u3": "yes"}
    why = dialog.splits_table.item(3, 2).text()
    assert "needs at least 3 down blocks" in why  # the tiny UNet has two
    assert window.form.model_combo.findText(str(folder)) >= 0  # offered in the form at once

    dialog.default_button.click()
    assert window.form.model() == str(folder)
    assert (window.form.guidance_spin.value(), window.form.steps_spin.value()) == (3.5, 12)
    assert dialog.item_texts() == ["Embedded model", "my-model  (default)"]
    stored = Settings.load(services.data_dir)
    assert stored.model == str(folder) and stored.models == [str(folder)]

    dialog.remove_button.click()
    assert dialog.specs() == ["embedded"] and window.form.model() == "embedded"
    assert Settings.load(services.data_dir).models == [] and folder.is_dir()  # forgotten, not deleted
    dialog.close()
    window.close()


# --- notification --------------------------------------------------------------------------------------


def test_a_job_that_ends_while_the_window_is_inactive_notifies(qtbot, services, make_window):  # noqa: F811
    from hediff.desktop.ui.notify import Notifier

    window = make_window(services)
    other = QWidget()  # the app the user switched to
    qtbot.addWidget(other)
    other.show()
    other.activateWindow()
    qtbot.waitUntil(lambda: not window.isActiveWindow())
    result = _finished_job(qtbot, window, steps=2, seed=99)
    (how, title, text) = window.notifier.shown[-1]
    assert how == ("tray" if Notifier.tray_available() else "alert")
    assert title.startswith("Job #") and title.endswith(" finished")
    assert text.startswith(f"Seed {result.params.seed}, ") and text.endswith("; in the gallery.")

    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow)
    _finished_job(qtbot, window, steps=2)
    assert len(window.notifier.shown) == 1  # the user was here: no notification
    window.close()


def test_the_app_exits_cleanly_after_copying_an_image():
    """Qt deletes the clipboard's data after Python has finished: data made in Python crashed the app on exit."""
    import subprocess
    import sys

    code = (
        "from PySide6.QtWidgets import QApplication\n"
        "from PySide6.QtGui import QImage\n"
        "from hediff.desktop.ui.preview import copy_image\n"
        "app = QApplication([])\n"
        "image = QImage(8, 8, QImage.Format.Format_RGB32)\n"
        "image.fill(0xFF0000)\n"
        "copy_image(image)\n"
        "assert QApplication.clipboard().image().pixel(1, 1) == image.pixel(1, 1)\n"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
