"""The form's image to image, batch count and LoRA list (pytest-qt, offscreen), what loading settings restores, and
a batch in the gallery. Jobs run on this device or against the session's real loopback backend, tiny model."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
from pathlib import Path

import numpy as np
import pytest
import pytestqt  # noqa: F401  # the qtbot fixture; a missing GUI extra must fail these tests, not skip them
from PIL import Image
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from hediff.common import settings as gs
from hediff.common.lora import DEFAULT_WEIGHT_NAME
from hediff.desktop.ui.params_form import ParamsForm
from tests.test_gui_daily import _cut_off, _form_fields
from tests.test_gui_main import Recorder, _services, make_window, queue, services, wait_ended  # noqa: F401


def _picture(path: Path, size=(40, 24), colour=(200, 60, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _lora_folder(path: Path) -> Path:
    """A folder that looks like a diffusers LoRA to the form (the weights are read only where a model loads)."""
    path.mkdir()
    (path / DEFAULT_WEIGHT_NAME).write_bytes(b"{}")
    return path


def _drop(widget, path: Path) -> bool:
    """Drag ``path`` over ``widget`` and drop it; whether the drag was accepted. Qt delivers a drop only inside a
    real drag-and-drop session, so the test hands the events to the handlers Qt calls."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    args = (QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    enter = QDragEnterEvent(*args)
    enter.ignore()
    widget.dragEnterEvent(enter)
    if enter.isAccepted():
        widget.dropEvent(QDropEvent(*args))
    return enter.isAccepted()


@pytest.fixture
def form(qtbot):
    form = ParamsForm()
    qtbot.addWidget(form)
    form.show()
    return form


def test_an_init_image_is_dropped_shown_and_cleared_and_strength_follows_it(form, tmp_path):
    assert form.params().init_image == "" and not form.strength_spin.isEnabled()
    assert not form.init_box.isVisible() and form.init_toggle.text() == "Image to image"
    assert form.strength_spin.toolTip().lower() == gs.help_text("strength").lower()
    assert (form.strength_spin.minimum(), form.strength_spin.maximum()) == gs.bounds("strength")

    photo = _picture(tmp_path / "holiday.jpg", (40, 24))
    assert _drop(form.init_thumb, photo)
    assert form.init_box.isVisible()  # the section opens on what was dropped
    assert form.params().init_image == str(photo)
    assert form.strength_spin.isEnabled()
    assert form.init_name.text() == "holiday.jpg, 40×24"
    assert form.init_toggle.text() == "Image to image: holiday.jpg"
    assert not form.init_thumb.pixmap().isNull() and form.init_thumb.pixmap().width() == 60  # 40x24 fitted in 60

    assert not _drop(form.init_thumb, tmp_path / "notes.txt")  # not a picture: the drag is refused
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert _drop(form.init_thumb, broken)
    assert "not a readable picture" in form.init_message.text() and form.init_message.isVisible()
    assert form.params().init_image == str(photo)  # the last good one stays

    form.strength_spin.setValue(0.35)
    assert form.params().strength == 0.35
    form.init_clear.click()
    assert form.params().init_image == "" and not form.strength_spin.isEnabled()
    assert form.init_thumb.pixmap().isNull() and form.init_toggle.text() == "Image to image"


def test_the_count_spin_box_runs_to_the_settings_models_maximum(form):
    assert (form.count_spin.minimum(), form.count_spin.maximum()) == (1, gs.MAX_COUNT)
    assert form.count_spin.value() == 1
    form.count_spin.setValue(gs.MAX_COUNT + 5)
    assert form.params().count == gs.MAX_COUNT
    assert form.count_spin.toolTip().lower() == gs.help_text("count").lower()


def test_loras_are_checked_when_added_scaled_and_removed(form, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not form.add_lora(str(empty))
    assert f"must hold {DEFAULT_WEIGHT_NAME}" in form.lora_message.text()
    assert not form.add_lora(str(tmp_path / "nowhere"))
    assert "does not exist" in form.lora_message.text()
    assert form.params().lora == ()

    style = _lora_folder(tmp_path / "watercolour")
    detail = _lora_folder(tmp_path / "detail")
    assert form.add_lora(str(style)) and form.add_lora(str(detail), 0.5)
    assert not form.lora_message.isVisible() and form.lora_box.isVisible()
    assert form.lora_toggle.text() == "LoRA: 2"
    assert [r.name_label.text() for r in form._lora_rows] == ["watercolour", "detail"]
    assert not form.add_lora(str(style)) and "already" in form.lora_message.text()
    form._lora_rows[0].scale_spin.setValue(0.75)
    assert form.params().lora == (f"{style}:0.75", f"{detail}:0.5")

    form.set_loras([f"{style}:0.3333", f"{detail}:1"])  # a scale the spin box rounds is kept as given
    assert form._lora_rows[0].scale_spin.value() == 0.333
    assert form.params().lora == (f"{style}:0.3333", f"{detail}:1")
    form._lora_rows[0].remove_button.click()
    assert form.params().lora == (f"{detail}:1",) and form.lora_toggle.text() == "LoRA: 1"


def test_params_and_stored_settings_round_trip_all_four(form, tmp_path):
    photo = _picture(tmp_path / "start.png")
    lora = _lora_folder(tmp_path / "style")
    settings = gs.GenerationSettings(
        prompt="a cat", steps=9, seed=40, init_image=str(photo), strength=0.45, lora=(f"{lora}:0.6",), count=3
    )
    form.set_params(settings)
    assert form.params() == settings
    assert form.init_name.text() == "start.png, 40×24" and form.lora_toggle.text() == "LoRA: 1"

    other = ParamsForm()
    other.load_dict(json.loads(json.dumps(settings.to_dict(include_prompt=True))))  # lists, as stored
    assert other.params() == settings
    other.load_dict({"init_image": "", "lora": [], "count": 1})
    assert (other.params().init_image, other.params().lora, other.params().count) == ("", (), 1)
    assert not other.strength_spin.isEnabled() and other.lora_toggle.text() == "LoRA"
    other.deleteLater()

    # settings naming files that are gone since keep them, marked, so the job says so rather than drop them
    gone = gs.GenerationSettings(init_image=str(tmp_path / "gone.png"), lora=(f"{tmp_path / 'gone'}:1",))
    form.set_params(gone)
    assert form.params().init_image == gone.init_image and form.params().lora == (f"{tmp_path / 'gone'}:1",)
    assert form.init_name.text() == "gone.png (missing)"
    assert form._lora_rows[0].name_label.text() == "gone (not usable)"


@pytest.mark.parametrize("size", [(1024, 700), (1920, 1080)])
def test_the_open_sections_are_never_cut_off_in_width(qtbot, services, make_window, tmp_path, size):  # noqa: F811
    # closed, the form fits 1024x700 whole (tests/test_gui_daily.py); open, it scrolls vertically only
    window = make_window(services)
    window.resize(*size)
    qtbot.waitUntil(lambda: window.size().toTuple() == size)
    form = window.form
    assert form.choose_init_image(str(_picture(tmp_path / "a-long-holiday-photo-name-from-the-camera-20261207.png")))
    assert form.init_toggle.text() == "Image to image: a-long-h…1207.png"
    assert form.add_lora(str(_lora_folder(tmp_path / "a-lora-with-a-rather-long-folder-name")), 0.8)
    QApplication.processEvents()
    scroll = form.parentWidget().parentWidget()
    assert scroll.horizontalScrollBar().maximum() == 0
    if size == (1920, 1080):
        assert _cut_off(form) == [] and scroll.verticalScrollBar().maximum() == 0
    else:
        assert all(w.visibleRegion().boundingRect().width() in (0, w.width()) for w in _form_fields(form))
    window.close()


def test_the_privacy_line_and_tab_say_where_the_init_image_goes(qtbot, services, make_window, tmp_path):  # noqa: F811
    from hediff.desktop.core.settings import DEVICE_SERVER_ID

    window = make_window(services)
    form = window.form
    assert "init image" not in window.privacy_line.text()
    assert form.choose_init_image(str(_picture(tmp_path / "me.png", (32, 32))))
    line = window.privacy_line.text()
    assert line.startswith("Not private")
    assert "The init image is read and encoded on this machine; the server gets what the split sends" in line
    assert "activations at conv_in" in line
    form.select_server(DEVICE_SERVER_ID)
    assert window.privacy_line.text() == (
        "Private: this device (nothing leaves this machine). "
        "The init image is read and encoded on this machine and never leaves it."
    )
    form.init_clear.click()
    assert window.privacy_line.text() == "Private: this device (nothing leaves this machine)"
    window.close()


def test_an_img2img_batch_runs_and_the_gallery_lists_each_image_with_its_seed(qtbot, services, make_window, tmp_path):  # noqa: F811
    services.settings.remember_prompt = True  # the sidecar keeps the init image's path only with the prompts
    window = make_window(services)
    form = window.form
    photo = _picture(tmp_path / "start.png", (32, 32), (30, 90, 200))
    assert form.choose_init_image(str(photo))
    form.strength_spin.setValue(0.5)
    form.count_spin.setValue(3)
    rec = Recorder(window.worker)
    job = queue(window, "a blue square, redrawn", steps=4, seed=20, width=0, height=0)
    assert "picture's size · 3 images" in window.queue_view.list.item(0).text()
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("finished", job), event
    result = event[2]
    assert len(result.images) == 3 and rec.steps == 2  # int(4 x 0.5) steps of img2img

    privacy = window.privacy_panel.init_image_label.text()
    assert privacy.startswith("start.png: The init image is read and encoded on this machine; the server gets")
    pixmap = window.preview.pixmap()
    assert (pixmap.width(), pixmap.height()) == (2 * 32 + 2, 2 * 32 + 2)  # three images in a 2x2 grid
    assert "seeds 20–22" in window.preview.caption()

    panel = window.gallery_panel
    panel.refresh()
    texts = [panel.list.item(i).text() for i in range(panel.list.count())]
    # the steps asked for, as every caption counts them (img2img runs int(4 x 0.5) of them)
    assert texts == ["seed 20 · 1/3\n4 steps", "seed 21 · 2/3\n4 steps", "seed 22 · 3/3\n4 steps"]
    entries = services.gallery.entries()
    from hediff.desktop.core.gallery import settings_from_png

    for i, entry in enumerate(entries):
        assert entry.params.seed == 20 + i and entry.params.count == 3 and entry.params.init_image == str(photo)
        assert settings_from_png(entry.image_path).seed == 20 + i  # each image's own metadata
        stored = np.asarray(Image.open(entry.image_path).convert("RGB"))
        assert np.array_equal(stored, np.asarray(result.images[i].convert("RGB")))
    panel.select(entries[1].id)
    assert "seed 21, image 2 of 3 of one job" in panel.details.text()

    # load settings from the second image: its seed, the job's count, strength and picture come back
    form.set_params(gs.GenerationSettings(prompt="something else"))
    assert form.params().init_image == "" and form.params().count == 1
    panel.load_selected()
    restored = form.params()
    assert (restored.seed, restored.count, restored.strength, restored.init_image) == (21, 3, 0.5, str(photo))
    assert form.init_name.text() == "start.png, 32×32"

    # a PNG dropped on the window: its metadata has no prompt or picture name (not embedded), the rest comes back
    form.set_params(gs.GenerationSettings(prompt="mine"))
    form.count_spin.setValue(1)
    assert window.load_png(entries[2].image_path)
    restored = form.params()
    assert (restored.seed, restored.count, restored.strength) == (22, 3, 0.5)
    assert (restored.prompt, restored.init_image) == ("mine", "")
    assert form.choose_init_image(str(photo))
    assert window.load_png(entries[0].image_path)
    assert (form.params().seed, form.params().init_image) == (20, str(photo))  # the form's picture is kept
    window.close()


def test_an_on_device_job_with_a_lora_and_the_settings_it_restores_in_a_new_window(
    qtbot,
    tmp_path,
    tiny_model_dir,
    make_window,  # noqa: F811
):
    from tests.test_lora import _random_lora

    lora = _random_lora(tiny_model_dir, tmp_path / "lora", seed=5)
    s = _services(tmp_path / "data")
    s.settings.model = str(tiny_model_dir)
    s.settings.params = {"steps": 2, "width": 32, "height": 32, "scheduler": "ddim", "seed": 3}
    s.settings.save()
    window = make_window(s)
    form = window.form
    assert form.add_lora(str(lora), 0.7)
    form.count_spin.setValue(2)
    rec = Recorder(window.worker)
    queue(window, "a lora'd circle", steps=2, seed=3)
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[0] == "finished", event
    assert event[2].params.lora == (f"{lora}:0.7",) and len(event[2].images) == 2
    entries = s.gallery.entries()
    assert [e.params.seed for e in entries] == [3, 4]
    form.set_loras([])
    assert window.load_png(entries[1].image_path)  # the second image's PNG: its seed, the job's LoRA and count
    assert (form.params().seed, form.params().lora, form.params().count) == (4, (f"{lora}:0.7",), 2)
    window.close()

    again = make_window(_services(s.data_dir, s.secrets))  # the stored last settings
    assert again.form.params().lora == (f"{lora}:0.7",) and again.form.params().count == 2
    assert again.form.lora_toggle.text() == "LoRA: 1"
    again.close()


def test_the_gallery_keeps_the_picture_name_only_with_the_prompts_and_refuses_a_bad_batch_record(tmp_path):
    from hediff.desktop.core.engine import GenerationResult
    from hediff.desktop.core.gallery import Gallery

    images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    params = gs.GenerationSettings(prompt="p", seed=9, count=3, init_image=str(tmp_path / "me.png"), strength=0.4)
    result = GenerationResult(params=params, image=images[0], latent=np.zeros((3, 4, 1, 1)), images=images)
    gallery = Gallery(tmp_path / "gallery")
    added = gallery.add_all(result, include_prompt_in_png=False)
    assert [(e.params.seed, e.batch_index, e.batch_id) for e in added] == [
        (9, 0, added[0].id),
        (10, 1, added[0].id),
        (11, 2, added[0].id),
    ]
    read = gallery.entries()
    assert [e.id for e in read] == [e.id for e in added]  # a job's images together, in seed order
    assert all(e.params.init_image == "" and e.params.prompt == "" and e.params.strength == 0.4 for e in read)

    sidecar = gallery.root / f"{added[1].id}.json"
    data = json.loads(sidecar.read_text())
    data["batch"] = ["not", "a", "record"]
    sidecar.write_text(json.dumps(data))
    assert [e.id for e in gallery.entries()] == [added[0].id, added[2].id]
    assert gallery.problems == [f"gallery entry {added[1].id}.json is corrupt (bad batch) and was skipped"]
