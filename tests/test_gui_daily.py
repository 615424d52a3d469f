"""The main window as a daily tool (pytest-qt, offscreen): nothing cut off at common window sizes, the panel
widths remembered, what a job shows while it runs and after, quitting with queued jobs. Jobs run against the
session's real loopback backend with the tiny model."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtWidgets import (
    QAbstractButton,
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QMessageBox,
    QScrollArea,
    QSpinBox,
)

from hediff.common import settings as gs
from hediff.desktop.ui.main_window import WINDOW_TITLE, progress_text
from hediff.desktop.ui.params_form import U_SPLIT_ENCRYPTION_TEXT
from tests.test_gui_main import Recorder, _services, make_window, queue, services, wait_ended  # noqa: F401


def _form_fields(form):
    for kind in (QComboBox, QSpinBox, QDoubleSpinBox, QAbstractButton):
        for widget in form.findChildren(kind):
            if widget.isVisible():
                yield widget


def _cut_off(form) -> list[str]:
    """Fields of the form that the window shows only part of (or none of)."""
    cut = []
    for widget in _form_fields(form):
        shown = widget.visibleRegion().boundingRect()
        if shown.size() != widget.rect().size():
            name = widget.accessibleName() or widget.toolTip()[:30] or type(widget).__name__
            cut.append(f"{name}: {widget.width()}x{widget.height()} shows {shown.width()}x{shown.height()}")
    return cut


@pytest.mark.parametrize("size", [(1024, 700), (1280, 800), (1920, 1080)])
def test_no_field_of_the_form_is_cut_off(qtbot, services, make_window, size):  # noqa: F811
    window = make_window(services)
    window.resize(*size)
    qtbot.waitUntil(lambda: window.size().toTuple() == size)
    QApplication.processEvents()
    scroll = window.form.parentWidget().parentWidget()
    assert isinstance(scroll, QScrollArea)
    assert _cut_off(window.form) == []
    assert scroll.horizontalScrollBar().maximum() == 0
    assert scroll.verticalScrollBar().maximum() == 0  # the whole form fits: no scrolling at all
    window.close()


def test_a_small_window_scrolls_the_form_vertically_only(qtbot, services, make_window):  # noqa: F811
    window = make_window(services)
    window.resize(window.minimumSizeHint().width(), 480)
    QApplication.processEvents()
    scroll = window.form.parentWidget().parentWidget()
    assert scroll.horizontalScrollBar().maximum() == 0
    assert scroll.verticalScrollBar().maximum() > 0
    # whatever is in view is whole in width: the panel is as wide as the form needs
    assert all(w.visibleRegion().boundingRect().width() in (0, w.width()) for w in _form_fields(window.form))
    window.close()


def test_panel_widths_are_remembered(qtbot, services, make_window):  # noqa: F811
    window = make_window(services)
    window.resize(1280, 800)
    QApplication.processEvents()
    left, centre, right = window.splitter.sizes()
    window.splitter.moveSplitter(left + 60, 1)
    wanted = window.splitter.sizes()
    assert wanted[0] == left + 60
    window.close()

    again = make_window(_services(services.data_dir, services.secrets))
    again.resize(1280, 800)
    QApplication.processEvents()
    assert again.splitter.sizes() == wanted
    again.close()


def test_u_shaped_split_shows_that_nothing_is_encrypted(qtbot, services, make_window):  # noqa: F811
    form = make_window(services).form
    form.split_combo.setCurrentText("conv_in")
    form.encryption_combo.setCurrentIndex(form.encryption_combo.findData("full"))
    chosen = form.encryption_combo.currentText()
    for split in gs.U_SPLITS:
        form.split_combo.setCurrentText(split)
        combo = form.encryption_combo  # with no item chosen, Qt paints the placeholder text
        assert combo.currentIndex() == -1
        assert combo.placeholderText() == U_SPLIT_ENCRYPTION_TEXT == "none (latent stays here)"
        assert not form.encryption_combo.isEnabled()
        assert form.params().encryption == "none"
    form.split_combo.setCurrentText("conv_in")  # back to a split that sends the latent: the choice is kept
    assert form.encryption_combo.currentText() == chosen and form.params().encryption == "full"


def test_plms_progress_names_its_warm_up_evaluation():
    assert progress_text(3, 3, 3) == "step 3 / 3"
    assert progress_text(7, 21, 20) == "7 / 21: 20 steps (+1 warm-up evaluation)"


def test_a_job_shows_the_real_size_its_progress_and_clears_the_last_ones_traces(qtbot, services, make_window):  # noqa: F811
    window = make_window(services)
    native = window.form.native_side()
    assert native  # the tiny model's config says
    window.show_error("an old error from the last job")
    window.preview.set_caption("the last job's caption")
    seen: dict[str, object] = {}

    def at_first_step():
        seen["queue"] = window.queue_view.list.item(0).text()
        seen["title"] = window.windowTitle()
        seen["progress"] = window.progress.format()
        seen["caption"] = window.preview.caption()
        seen["message"] = window.message_label.text()

    rec = Recorder(window.worker, on_first_step=at_first_step)
    window.form.scheduler_combo.setCurrentText("plms")
    job = queue(window, steps=3, width=0, height=0)  # "native"
    (event,) = wait_ended(qtbot, rec, 1)
    assert event[:2] == ("finished", job)
    assert f"{native}×{native}" in seen["queue"] and "0×0" not in seen["queue"]
    assert seen["message"] == ""  # the old error went when the job started
    assert seen["title"] == f"25% · job #{job} · {WINDOW_TITLE}"  # 1 of 4 evaluations
    assert seen["progress"].startswith("1 / 4: 3 steps (+1 warm-up evaluation), ETA")
    assert seen["caption"] == "Predicted final image at 1 / 4"
    assert window.progress.format().startswith("Done: 3 steps (+1 warm-up evaluation) in")
    assert f"{native}×{native}" in window.preview.caption()
    assert window.windowTitle() == WINDOW_TITLE
    window.close()


def test_quitting_with_queued_jobs_asks_first(qtbot, services, make_window, monkeypatch):  # noqa: F811
    window = make_window(services)
    asked: list[str] = []
    answer = [QMessageBox.StandardButton.No]

    def question(_parent, _title, text, *_args):
        asked.append(text)
        return answer[0]

    monkeypatch.setattr(QMessageBox, "question", question)
    running = queue(window, "long", steps=400)
    waiting = [queue(window, "second", steps=2), queue(window, "third", steps=2)]
    qtbot.waitUntil(lambda: window.worker.current_job() is not None)
    assert not window.close()  # "No": the window stays, the jobs too
    assert asked == ["2 queued jobs will not run, and the running one stops. Quit?"]
    assert [j.id for j in window.worker.pending_jobs()] == waiting
    assert window.worker.current_job().id == running
    answer[0] = QMessageBox.StandardButton.Yes
    assert window.close()
    assert not window.worker.is_busy() or window._shut_down


def test_changing_the_model_applies_its_recommendations_except_fields_set_by_hand(
    qtbot,
    services,  # noqa: F811
    make_window,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    import json
    import shutil

    first = Path(shutil.copytree(tiny_model_dir, tmp_path / "first"))
    (first / "hediff.json").write_text(json.dumps({"recommended": {"guidance": 3.5, "steps": 9}}))
    second = Path(shutil.copytree(tiny_model_dir, tmp_path / "second"))
    (second / "hediff.json").write_text(json.dumps({"recommended": {"guidance": 1.5, "steps": 14}}))
    services.settings.model = str(first)
    services.settings.params = {"seed": 7}
    form = make_window(services).form
    assert (form.guidance_spin.value(), form.steps_spin.value()) == (3.5, 9)

    form.set_model(str(second))  # nothing set by hand: both recommendations apply
    assert (form.guidance_spin.value(), form.steps_spin.value()) == (1.5, 14)

    form.steps_spin.setValue(5)  # the user's own steps stay; guidance still follows the model
    form.set_model(str(first))
    assert (form.guidance_spin.value(), form.steps_spin.value()) == (3.5, 5)
