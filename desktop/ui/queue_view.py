"""The job queue under the image: the running job, then pending jobs that can be moved or removed.

Rows stay where they are while the queue changes (texts are updated in place, the selection and scroll position
kept); the order changes only when the user asks: the Up / Down buttons or dragging a queued row.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

_ID_ROLE = Qt.ItemDataRole.UserRole
EMPTY_TEXT = "No jobs. Generate adds one; you can queue more while one runs."


def describe_job(job, running: bool = False) -> str:
    p = job.params
    prompt = " ".join(p.prompt.split())
    if len(prompt) > 38:
        prompt = prompt[:37] + "…"
    state = "running" if running else "queued"
    # 0: the window fills in the model's native size when it knows it; img2img's picture sets its own size
    size = f"{p.width}×{p.height}" if p.width and p.height else "picture's size" if p.init_image else "native size"
    images = f" · {p.count} images" if p.count > 1 else ""
    return f"#{job.id} {state} · {p.steps} steps · {size}{images}\n{prompt}"


class _QueueList(QListWidget):
    """A list whose queued rows can be dragged into a new order; the running row stays first."""

    reordered = Signal(list)  # the queued job ids in their new order

    def dropEvent(self, event) -> None:
        super().dropEvent(event)
        ids = [self.item(i).data(_ID_ROLE) for i in range(self.count())]
        self.reordered.emit([int(i) for i in ids if i is not None])


class QueueView(QWidget):
    removeRequested = Signal(int)  # a pending job's id
    moveRequested = Signal(int, int)  # a pending job's id, places to move (-1: sooner, +1: later)
    reorderRequested = Signal(list)  # pending job ids in the order the user dragged them into

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        header = QHBoxLayout()
        self.title = QLabel("Queue")
        self.title.setStyleSheet("font-weight: 600;")
        header.addWidget(self.title)
        header.addStretch(1)
        self.up_button = QToolButton()
        self.up_button.setText("↑")
        self.up_button.setToolTip("Run the selected queued job sooner")
        self.up_button.clicked.connect(lambda: self._move_selected(-1))
        self.down_button = QToolButton()
        self.down_button.setText("↓")
        self.down_button.setToolTip("Run the selected queued job later")
        self.down_button.clicked.connect(lambda: self._move_selected(1))
        self.remove_button = QToolButton()
        self.remove_button.setText("Remove")
        self.remove_button.setToolTip("Remove the selected queued job")
        self.remove_button.clicked.connect(self._remove_selected)
        for b in (self.up_button, self.down_button, self.remove_button):
            b.setEnabled(False)
            header.addWidget(b)
        layout.addLayout(header)
        self.list = _QueueList()
        self.list.setAlternatingRowColors(True)
        self.list.setWordWrap(True)
        self.list.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.list.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.list.itemSelectionChanged.connect(self._selection_changed)
        self.list.reordered.connect(self.reorderRequested)
        layout.addWidget(self.list)
        self.set_jobs(None, [])

    def set_jobs(self, current, pending) -> None:
        """Show the running and queued jobs. Rows are updated in place, so a row the mouse is over keeps its place
        unless a job before it left the queue."""
        selected = self.selected_job_id()
        rows: list[tuple[str, int | None, bool]] = []
        if current is not None:
            rows.append((describe_job(current, running=True), None, True))  # cancelled, not removed or moved
        rows += [(describe_job(job), job.id, False) for job in pending]
        empty = not rows
        if empty:
            rows.append((EMPTY_TEXT, None, False))
        self.list.blockSignals(True)
        while self.list.count() > len(rows):
            self.list.takeItem(self.list.count() - 1)
        for i, (text, job_id, running) in enumerate(rows):
            item = self.list.item(i)
            if item is None:
                item = QListWidgetItem()
                self.list.addItem(item)
            if item.text() != text:
                item.setText(text)
            item.setData(_ID_ROLE, job_id)
            font = QFont(self.list.font())
            font.setBold(running)
            item.setFont(font)
            flags = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
            if job_id is not None:
                flags |= Qt.ItemFlag.ItemIsDragEnabled
            item.setFlags(Qt.ItemFlag.NoItemFlags if empty else flags)
            item.setSelected(job_id is not None and job_id == selected)
        self.list.blockSignals(False)
        n = len(pending)
        self.title.setText(f"Queue ({n})" if n else "Queue")  # short: the column is narrow in small windows
        self.title.setToolTip(f"{n} job{'s' if n != 1 else ''} waiting")
        self._selection_changed()

    def pending_ids(self) -> list[int]:
        ids = []
        for i in range(self.list.count()):
            job_id = self.list.item(i).data(_ID_ROLE)
            if job_id is not None:
                ids.append(int(job_id))
        return ids

    def row_texts(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def selected_job_id(self) -> int | None:
        for item in self.list.selectedItems():
            job_id = item.data(_ID_ROLE)
            if job_id is not None:
                return int(job_id)
        return None

    def select_job(self, job_id: int) -> None:
        for i in range(self.list.count()):
            item = self.list.item(i)
            item.setSelected(item.data(_ID_ROLE) == job_id)

    def _selection_changed(self) -> None:
        job_id = self.selected_job_id()
        ids = self.pending_ids()
        self.remove_button.setEnabled(job_id is not None)
        self.up_button.setEnabled(job_id is not None and ids.index(job_id) > 0)
        self.down_button.setEnabled(job_id is not None and ids.index(job_id) < len(ids) - 1)

    def _move_selected(self, offset: int) -> None:
        job_id = self.selected_job_id()
        if job_id is not None:
            self.moveRequested.emit(job_id, offset)

    def _remove_selected(self) -> None:
        job_id = self.selected_job_id()
        if job_id is not None:
            self.removeRequested.emit(job_id)
