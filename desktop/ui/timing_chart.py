"""Per-step timing as stacked bars (one segment per engine timing key), a legend with totals, and bytes moved."""

from __future__ import annotations

import math

from PySide6.QtCore import QPointF, QRect, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFontMetrics, QPainter, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QToolTip, QWidget

try:
    from hediff.desktop.core.engine import TIMING_KEYS
except ImportError:  # pragma: no cover - the engine always exists in this repo
    TIMING_KEYS = ("head", "select", "encrypt", "upload", "server_body", "server_he", "download", "decrypt")

LABELS = {
    "head": "head (client)",
    "select": "select",
    "encrypt": "encrypt",
    "upload": "upload",
    "server_body": "server body",
    "server_he": "server HE",
    "download": "download",
    "decrypt": "decrypt",
}
LEGEND_ORDER = tuple(reversed(TIMING_KEYS))  # the stack's order, top to bottom
# Tableau 10: distinguishable, colour-blind friendly enough, readable on light and dark backgrounds
COLORS = {
    "head": QColor("#4e79a7"),
    "select": QColor("#9c755f"),
    "encrypt": QColor("#e15759"),
    "upload": QColor("#76b7b2"),
    "server_body": QColor("#59a14f"),
    "server_he": QColor("#edc948"),
    "download": QColor("#b07aa1"),
    "decrypt": QColor("#f28e2b"),
}


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.0f} ms" if s >= 0.1 else f"{s * 1e3:.1f} ms"
    if s < 60:
        return f"{s:.2f} s"
    return f"{int(s // 60)} min {s % 60:.0f} s"


def axis_label(s: float) -> str:
    """A round axis value without trailing zeros: "5 s", "250 ms", "2.5 ms"."""
    if s >= 1.0:
        return f"{s:g} s"
    if s >= 1e-3:
        return f"{s * 1e3:g} ms"
    return f"{s * 1e6:g} µs"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def nice_ceiling(x: float) -> float:
    """The smallest round value (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) at or above x: the axis maximum."""
    if x <= 0:
        return 1e-3
    exp = math.floor(math.log10(x))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * 10**exp >= x * 0.999999:
            return m * 10**exp
    return 10 ** (exp + 1)


class TimingChart(QWidget):
    """``clear(total_steps)``, then ``add_step`` per StepUpdate, or ``set_result`` for a finished generation."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._steps: list[dict[str, float]] = []
        self._sent: list[int] = []
        self._received: list[int] = []
        self._total_steps = 0
        self._extra: dict[str, float] = {}  # setup / decode / total once a generation finished
        self._bar_rects: list[QRectF] = []
        self.setMouseTracking(True)
        self.setMinimumSize(240, 200)  # narrower tabs put the legend under the chart
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setAccessibleName("Per-step timing chart")

    # --- data ---

    def clear(self, total_steps: int = 0) -> None:
        self._steps, self._sent, self._received = [], [], []
        self._total_steps = max(0, int(total_steps))
        self._extra = {}
        self.update()

    def add_step(self, timings: dict[str, float], bytes_sent: int = 0, bytes_received: int = 0, total=None) -> None:
        self._steps.append({k: float(timings.get(k, 0.0)) for k in TIMING_KEYS})
        self._sent.append(int(bytes_sent))
        self._received.append(int(bytes_received))
        if total:
            self._total_steps = max(self._total_steps, int(total))
        self.update()

    def add_update(self, update) -> None:
        """One engine StepUpdate."""
        self.add_step(update.timings, update.bytes_sent, update.bytes_received, update.total)

    def set_result(self, result) -> None:
        """The whole (finished) GenerationResult: every step, plus setup, decode and wall-clock totals."""
        self._steps = [{k: float(t.get(k, 0.0)) for k in TIMING_KEYS} for t in result.step_timings]
        self._sent = [int(b) for b in result.bytes_sent]
        self._received = [int(b) for b in result.bytes_received]
        self._total_steps = len(self._steps)
        self._extra = {"setup": result.setup_s, "decode": result.decode_s, "total": result.total_s}
        self.update()

    def bar_count(self) -> int:
        return len(self._steps)

    def totals(self) -> dict[str, float]:
        return {k: sum(s[k] for s in self._steps) for k in TIMING_KEYS}

    def bytes_totals(self) -> tuple[int, int]:
        return sum(self._sent), sum(self._received)

    def totals_text(self) -> str:
        """Time over all steps (and the wall clock once finished)."""
        if not self._steps:
            return "No steps yet"
        text = f"{len(self._steps)} steps: {format_seconds(sum(self.totals().values()))}"
        if self._extra:
            text += (
                f" · setup {format_seconds(self._extra['setup'])} · decode {format_seconds(self._extra['decode'])}"
                f" · total {format_seconds(self._extra['total'])}"
            )
        else:
            text += f" · mean {format_seconds(sum(self.totals().values()) / len(self._steps))} per step"
        return text

    def bytes_text(self, per_step: bool = True) -> str:
        sent, received = self.bytes_totals()
        n = max(1, len(self._steps))
        text = f"↑ {format_bytes(sent)} sent · ↓ {format_bytes(received)} received"
        if per_step:
            text += f" ({format_bytes(sent / n)} / {format_bytes(received / n)} per step)"
        return text

    def sizeHint(self) -> QSize:
        return QSize(400, 260)

    # --- painting ---

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        pal = self.palette()
        text = pal.color(QPalette.ColorRole.WindowText)
        muted = pal.color(QPalette.ColorRole.PlaceholderText)
        p.fillRect(self.rect(), pal.color(QPalette.ColorRole.Base))
        fm = QFontMetrics(self.font())
        line = fm.height()
        pad = 8

        # the totals line(s) at the bottom
        footer = self._footer_lines()
        footer_h = len(footer) * (line + 2) + 4
        chart, header, entries = self.legend_layout(fm, footer_h)

        # title
        p.setPen(text)
        title = "Time per step"
        if self._total_steps:
            title += f" ({len(self._steps)} / {self._total_steps})"
        p.drawText(QRect(pad, pad, chart.width() + 40, line), Qt.AlignmentFlag.AlignLeft, title)

        self._paint_bars(p, chart, fm, text, muted)
        self._paint_legend(p, header, entries, fm)

        y = self.height() - footer_h
        for i, s in enumerate(footer):
            p.setPen(text if i == 0 else muted)
            if i == 1 and fm.horizontalAdvance(s) > self.width() - 2 * pad:
                s = self.bytes_text(per_step=False)
            s = fm.elidedText(s, Qt.TextElideMode.ElideRight, self.width() - 2 * pad)
            p.drawText(QRect(pad, y, self.width() - 2 * pad, line), Qt.AlignmentFlag.AlignLeft, s)
            y += line + 2
        p.end()

    def _footer_lines(self) -> list[str]:
        return [self.totals_text(), self.bytes_text()] if self._steps else ["No steps yet"]

    def _paint_bars(self, p: QPainter, chart: QRect, fm: QFontMetrics, text: QColor, muted: QColor) -> None:
        self._bar_rects = []
        stacks = [sum(s.values()) for s in self._steps]
        top = nice_ceiling(max(stacks) if stacks else 0.0)
        labels = {0.0: "0", 0.5: axis_label(top * 0.5), 1.0: axis_label(top)}
        axis_w = max(fm.horizontalAdvance(t) for t in labels.values()) + 8
        top_margin = fm.height() // 2 + 2  # room for the top y label
        plot = QRect(
            chart.left() + axis_w,
            chart.top() + top_margin,
            chart.width() - axis_w,
            chart.height() - fm.height() - 2 - top_margin,
        )
        if plot.width() < 10 or plot.height() < 10:
            return
        # grid and y labels
        grid = QColor(muted)
        grid.setAlpha(70)
        for frac, label in labels.items():
            y = plot.bottom() - frac * plot.height()
            p.setPen(QPen(grid, 1, Qt.PenStyle.SolidLine if frac == 0 else Qt.PenStyle.DashLine))
            p.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
            p.setPen(muted)
            p.drawText(
                QRectF(chart.left(), y - fm.height() / 2, axis_w - 4, fm.height()),
                Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                label,
            )
        slots = max(self._total_steps, len(self._steps), 1)
        slot_w = plot.width() / slots
        gap = min(4.0, slot_w * 0.2) if slot_w > 3 else 0.0
        for i, step in enumerate(self._steps):
            x = plot.left() + i * slot_w + gap / 2
            w = max(1.0, slot_w - gap)
            y = float(plot.bottom())
            for k in TIMING_KEYS:
                h = step[k] / top * plot.height()
                if h <= 0:
                    continue
                p.fillRect(QRectF(x, y - h, w, h), COLORS[k])
                y -= h
            self._bar_rects.append(QRectF(x, plot.top(), w, plot.height()))
        # x labels: first, last, and a few in between
        p.setPen(muted)
        label_w = fm.horizontalAdvance(str(slots)) + 8
        every = max(1, math.ceil(label_w / max(slot_w, 1e-6)))
        every = next((m for m in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000) if m >= every), every)
        shown = [i for i in range(slots) if (i + 1) % every == 0]
        if every == 1 or (every - 1) * slot_w >= label_w:
            shown.insert(0, 0)  # step 1, when it does not crowd the next label
        shown = shown or [0]
        if shown[-1] != slots - 1 and (slots - 1 - shown[-1]) * slot_w >= label_w:
            shown.append(slots - 1)
        for i in shown:
            cx = plot.left() + (i + 0.5) * slot_w
            p.drawText(
                QRectF(cx - label_w, plot.bottom() + 2, 2 * label_w, fm.height()),
                Qt.AlignmentFlag.AlignHCenter,
                str(i + 1),
            )
        if not self._steps:
            flags = int(Qt.AlignmentFlag.AlignCenter) | int(Qt.TextFlag.TextWordWrap)
            text = "Timings appear here while a generation runs"
            box = fm.boundingRect(plot.adjusted(8, 0, -8, 0), flags, text)
            p.fillRect(box.adjusted(-6, -3, 6, 3), self.palette().color(QPalette.ColorRole.Window))
            p.drawText(box, flags, text)

    def _legend_values(self) -> dict[str, str]:
        totals = self.totals()
        return {k: format_seconds(totals[k]) if self._steps else "–" for k in TIMING_KEYS}

    def legend_layout(self, fm: QFontMetrics | None = None, footer_h: int | None = None):
        """(chart rect, "all steps" header rect, [(timing key, entry rect)]): the legend beside the chart when the
        widget is wide enough for both, else under it in as many columns as fit, so that no entry is cut off in a
        narrow tab (1024 px windows)."""
        fm = fm or QFontMetrics(self.font())
        if footer_h is None:
            footer_h = len(self._footer_lines()) * (fm.height() + 2) + 4
        line, pad, row = fm.height(), 8, fm.height() + 4
        values = [*self._legend_values().values(), "99.9 ms", "59.99 s"]
        entry_w = 16 + max(fm.horizontalAdvance(LABELS[k]) for k in TIMING_KEYS) + 12
        entry_w += max(fm.horizontalAdvance(v) for v in values)
        top = pad + line + 4
        bottom = self.height() - footer_h - pad
        if self.width() - entry_w - 3 * pad >= 200:  # room for a readable chart beside the legend
            chart = QRect(pad, top, self.width() - entry_w - 3 * pad, bottom - top - line)
            left = self.width() - entry_w - pad
            header = QRect(left, pad, entry_w, line)
            entries = [(k, QRect(left, pad + (i + 1) * row, entry_w, line)) for i, k in enumerate(LEGEND_ORDER)]
            return chart, header, entries
        columns = max(1, min(2, (self.width() - 2 * pad + 12) // (entry_w + 12)))
        col_w = (self.width() - 2 * pad - 12 * (columns - 1)) // columns
        rows = math.ceil(len(LEGEND_ORDER) / columns)
        legend_top = bottom - (rows + 1) * row + 4
        chart = QRect(pad, top, self.width() - 2 * pad, legend_top - top - line)
        header = QRect(pad, legend_top, self.width() - 2 * pad, line)
        entries = [
            (k, QRect(pad + (i // rows) * (col_w + 12), legend_top + (i % rows + 1) * row, col_w, line))
            for i, k in enumerate(LEGEND_ORDER)
        ]
        return chart, header, entries

    def _paint_legend(self, p: QPainter, header: QRect, entries, fm: QFontMetrics) -> None:
        pal = self.palette()
        values = self._legend_values()
        p.setPen(pal.color(QPalette.ColorRole.PlaceholderText))
        p.drawText(header, Qt.AlignmentFlag.AlignRight, "all steps")
        for k, rect in entries:
            sw = QRect(rect.left(), rect.top() + (fm.height() - 10) // 2, 10, 10)
            p.fillRect(sw, COLORS[k])
            p.setPen(pal.color(QPalette.ColorRole.WindowText))
            p.drawText(rect.adjusted(16, 0, 0, 0), Qt.AlignmentFlag.AlignLeft, LABELS[k])
            p.drawText(rect, Qt.AlignmentFlag.AlignRight, values[k])

    # --- hover ---

    def mouseMoveEvent(self, event) -> None:
        pos = event.position()
        for i, rect in enumerate(self._bar_rects):
            if rect.contains(pos):
                step = self._steps[i]
                lines = [f"Step {i + 1}: {format_seconds(sum(step.values()))}"]
                lines += [f"{LABELS[k]}: {format_seconds(step[k])}" for k in TIMING_KEYS]
                lines.append(f"↑ {format_bytes(self._sent[i])}  ↓ {format_bytes(self._received[i])}")
                QToolTip.showText(event.globalPosition().toPoint(), "\n".join(lines), self)
                return
        QToolTip.hideText()
