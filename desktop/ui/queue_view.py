"""The job queue under the Generate button: the running job, then pending jobs that can be removed."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton, QVBoxLayout, QWidget


def describe_job(job, running: bool = False) -> str:
    p = job.params
    prompt = " ".join(p.prompt.split())
    if len(prompt) > 38:
        prompt = prompt[:37] + "…"
    state = "running" if running else "queued"
    return f"#{job.id} {state} · {p.steps} steps · {p.width}×{p.height}\n{prompt}"


class QueueView(QWidget):
    removeRequested = Signal(int)  # a pending job's id

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        header = QHBoxLayout()
        self.title = QLabel("Queue")
        self.title.setStyleSheet("font-weight: 600;")
        header.addWidget(self.title)
        header.addStretch(1)
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Remove the selected queued job")
        self.remove_button.setEnabled(False)
        self.remove_button.clicked.connect(self._remove_selected)
        header.addWidget(self.remove_button)
        layout.addLayout(header)
        self.list = QListWidget()
        self.list.setAlternatingRowColors(True)
        self.list.setWordWrap(True)
        self.list.itemSelectionChanged.connect(self._selection_changed)
        layout.addWidget(self.list)
        self.set_jobs(None, [])

    def set_jobs(self, current, pending) -> None:
        selected = self.selected_job_id()
        self.list.clear()
        if current is not None:
            item = QListWidgetItem(describe_job(current, running=True))
            item.setData(Qt.ItemDataRole.UserRole, None)  # the running job is cancelled, not removed
            font = QFont(item.font())
            font.setBold(True)
            item.setFont(font)
            self.list.addItem(item)
        for job in pending:
            item = QListWidgetItem(describe_job(job))
            item.setData(Qt.ItemDataRole.UserRole, job.id)
            self.list.addItem(item)
            if job.id == selected:
                item.setSelected(True)
        if current is None and not pending:
            item = QListWidgetItem("No jobs. Generate adds one; you can queue more while one runs.")
            item.setFlags(Qt.ItemFlag.NoItemFlags)
            self.list.addItem(item)
        n = len(pending)
        self.title.setText(f"Queue ({n} waiting)" if n else "Queue")
        self._selection_changed()

    def pending_ids(self) -> list[int]:
        ids = []
        for i in range(self.list.count()):
            job_id = self.list.item(i).data(Qt.ItemDataRole.UserRole)
            if job_id is not None:
                ids.append(int(job_id))
        return ids

    def selected_job_id(self) -> int | None:
        for item in self.list.selectedItems():
            job_id = item.data(Qt.ItemDataRole.UserRole)
            if job_id is not None:
                return int(job_id)
        return None

    def select_job(self, job_id: int) -> None:
        for i in range(self.list.count()):
            item = self.list.item(i)
            item.setSelected(item.data(Qt.ItemDataRole.UserRole) == job_id)

    def _selection_changed(self) -> None:
        self.remove_button.setEnabled(self.selected_job_id() is not None)

    def _remove_selected(self) -> None:
        job_id = self.selected_job_id()
        if job_id is not None:
            self.removeRequested.emit(job_id)
