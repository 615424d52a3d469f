"""The image area: the live per-step preview, then the final decoded image; fit, 1:1 and smooth zoom (wheel,
buttons), panning by dragging a zoomed image, dragging the image out of the app, copying it, and PNG drops.

``ImageView`` is the image with its zoom bar, used for the main preview and for the large view of a gallery image.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QMimeData, QPoint, QPointF, QRect, QRectF, QSize, Qt, QUrl, Signal
from PySide6.QtGui import QColor, QDrag, QFont, QImage, QPainter, QPalette, QPixmap
from PySide6.QtWidgets import (
    QApplication,
    QDialog,
    QHBoxLayout,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

ZOOM_MIN, ZOOM_MAX = 0.05, 64.0
ZOOM_STEP = 1.25  # one button press or one wheel notch
_WHEEL_NOTCH = 120  # angleDelta units of one notch; touchpads send smaller deltas, hence smooth zoom


def pil_to_qimage(image) -> QImage:
    """A PIL image as a QImage that owns its pixels."""
    rgba = image.convert("RGBA")
    data = rgba.tobytes("raw", "RGBA")
    qimage = QImage(data, rgba.width, rgba.height, 4 * rgba.width, QImage.Format.Format_RGBA8888)
    return qimage.copy()  # detach from ``data``


def fit_rect(image_size: QSize, area: QRect) -> QRect:
    """The largest rectangle with the image's aspect ratio centred in ``area``."""
    if image_size.isEmpty() or area.isEmpty():
        return QRect()
    scale = min(area.width() / image_size.width(), area.height() / image_size.height())
    w = max(1, int(image_size.width() * scale))
    h = max(1, int(image_size.height() * scale))
    return QRect(area.x() + (area.width() - w) // 2, area.y() + (area.height() - h) // 2, w, h)


def image_grid(images, gap: int = 2):
    """A job's images as one picture, in seed order, row by row, as near square as they go (DiffusionBee and
    InvokeAI show a batch as a grid)."""
    import math

    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return grid


def copy_image(image: QImage) -> None:
    """The image's pixels on the clipboard. Through setImage, so that Qt makes the clipboard's data itself: a
    QMimeData made in Python and handed to the clipboard is deleted by Qt after the interpreter has finished, and
    the app crashed on exit (SIGSEGV in shiboken) after any copy."""
    QApplication.clipboard().setImage(image)


def png_paths(mime: QMimeData) -> list[Path]:
    """The local .png files a drop carries."""
    if not mime.hasUrls():
        return []
    return [Path(u.toLocalFile()) for u in mime.urls() if u.isLocalFile() and u.toLocalFile().lower().endswith(".png")]


class PreviewWidget(QWidget):
    """Shows a QPixmap fitted to the widget or at a zoom factor (nearest neighbour when blowing pixels up), with a
    caption. Wheel: zoom around the cursor; drag: pan a zoomed image, or drag a fitted image out of the app."""

    PLACEHOLDER = "No image yet.\nWrite a prompt and press Generate."
    zoomChanged = Signal()
    pngDropped = Signal(str)  # a .png file dropped on the image

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._pixmap = QPixmap()
        self._caption = ""
        self._final = False
        self._zoom: float | None = None  # None: fit the area
        self._centre = QPointF()  # the image point at the centre of the area while zoomed
        self._press: QPoint | None = None
        self._press_centre = QPointF()
        self.image_path: Path | None = None  # the file behind the image (gallery PNG), for dragging it out
        self.setMinimumSize(160, 160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setAccessibleName("Image preview")
        self.setAcceptDrops(True)

    # --- API ---

    def set_image(self, image, *, final: bool = False, caption: str = "", path: Path | None = None) -> None:
        """``image``: a PIL image or a QImage. ``final``: the decoded image rather than a latent preview. The zoom
        stays as the user set it (a new image of another size is re-centred)."""
        qimage = image if isinstance(image, QImage) else pil_to_qimage(image)
        if qimage.size() != self._pixmap.size():
            self._centre = QPointF(qimage.width() / 2, qimage.height() / 2)
        self._pixmap = QPixmap.fromImage(qimage)
        self._final = final
        self._caption = caption
        self.image_path = Path(path) if path is not None else None
        self.update()
        self.zoomChanged.emit()

    def set_caption(self, caption: str) -> None:
        self._caption = caption
        self.update()

    def clear(self) -> None:
        self._pixmap = QPixmap()
        self._caption = ""
        self._final = False
        self.image_path = None
        self.update()
        self.zoomChanged.emit()

    def pixmap(self) -> QPixmap:
        return self._pixmap

    def image(self) -> QImage:
        return self._pixmap.toImage()

    def is_final(self) -> bool:
        return self._final

    def caption(self) -> str:
        return self._caption

    def sizeHint(self) -> QSize:
        return QSize(512, 512)

    # --- zoom ---

    def _area(self) -> QRect:
        caption_h = 26 if self._caption else 0
        return self.rect().adjusted(12, 12, -12, -12 - caption_h)

    def is_fit(self) -> bool:
        return self._zoom is None

    def zoom(self) -> float:
        """Screen pixels per image pixel, whether fitted or zoomed."""
        if self._pixmap.isNull():
            return 1.0
        if self._zoom is None:
            return fit_rect(self._pixmap.size(), self._area()).width() / self._pixmap.width()
        return self._zoom

    def zoom_text(self) -> str:
        return ("Fit · " if self.is_fit() else "") + f"{self.zoom() * 100:.0f}%"

    def fit(self) -> None:
        self._zoom = None
        self.update()
        self.zoomChanged.emit()

    def actual_size(self) -> None:
        """1:1, one image pixel per screen pixel."""
        self.set_zoom(1.0)

    def set_zoom(self, zoom: float, anchor: QPointF | None = None) -> None:
        """Zoom to ``zoom`` keeping the image point under ``anchor`` (widget coordinates; the centre if None)."""
        if self._pixmap.isNull():
            return
        zoom = min(ZOOM_MAX, max(ZOOM_MIN, float(zoom)))
        area = self._area()
        centre_w = QPointF(area.center())
        if anchor is not None:
            under = self.image_point(anchor)
            # after zooming, `under` must stay at `anchor`: solve for the image point at the centre
            self._centre = under - (QPointF(anchor) - centre_w) / zoom
        elif self._zoom is None:
            self._centre = QPointF(self._pixmap.width() / 2, self._pixmap.height() / 2)
        self._zoom = zoom
        self._clamp_centre()
        self.update()
        self.zoomChanged.emit()

    def zoom_by(self, factor: float, anchor: QPointF | None = None) -> None:
        self.set_zoom(self.zoom() * factor, anchor)

    def zoom_in(self) -> None:
        self.zoom_by(ZOOM_STEP)

    def zoom_out(self) -> None:
        self.zoom_by(1 / ZOOM_STEP)

    def image_rect(self) -> QRectF:
        """Where the image is painted, in widget coordinates."""
        if self._pixmap.isNull():
            return QRectF()
        area = self._area()
        if self._zoom is None:
            return QRectF(fit_rect(self._pixmap.size(), area))
        z = self._zoom
        top_left = QPointF(area.center()) - self._centre * z
        return QRectF(top_left.x(), top_left.y(), self._pixmap.width() * z, self._pixmap.height() * z)

    def image_point(self, pos: QPointF) -> QPointF:
        """The image coordinates shown at widget position ``pos``."""
        rect = self.image_rect()
        z = rect.width() / max(1, self._pixmap.width())
        return QPointF((pos.x() - rect.left()) / z, (pos.y() - rect.top()) / z)

    def _clamp_centre(self) -> None:
        w, h = self._pixmap.width(), self._pixmap.height()
        self._centre = QPointF(min(w, max(0.0, self._centre.x())), min(h, max(0.0, self._centre.y())))

    def _pannable(self) -> bool:
        if self._zoom is None or self._pixmap.isNull():
            return False
        rect, area = self.image_rect(), QRectF(self._area())
        return rect.width() > area.width() or rect.height() > area.height()

    # --- mouse and keyboard ---

    def wheelEvent(self, event) -> None:
        delta = event.angleDelta().y()
        if not delta or self._pixmap.isNull():
            event.ignore()
            return
        # proportional to the wheel's movement: a touchpad's small deltas zoom smoothly, a notch by ZOOM_STEP
        self.zoom_by(ZOOM_STEP ** (delta / _WHEEL_NOTCH), event.position())
        event.accept()

    def mousePressEvent(self, event) -> None:
        if event.button() == Qt.MouseButton.LeftButton and not self._pixmap.isNull():
            self._press = event.position().toPoint()
            self._press_centre = QPointF(self._centre)
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event) -> None:
        if self._press is None:
            return super().mouseMoveEvent(event)
        moved = event.position().toPoint() - self._press
        if self._pannable():
            self._centre = self._press_centre - QPointF(moved) / self.zoom()
            self._clamp_centre()
            self.update()
        elif moved.manhattanLength() >= QApplication.startDragDistance():
            self._press = None
            self.start_drag()

    def mouseReleaseEvent(self, event) -> None:
        self._press = None
        super().mouseReleaseEvent(event)

    def mouseDoubleClickEvent(self, event) -> None:
        # double click toggles between fitting the area and 1:1
        if self.is_fit():
            self.actual_size()
        else:
            self.fit()

    def drag_mime_data(self) -> QMimeData | None:
        """What dragging the image out carries: the pixels, and the PNG file when there is one (a file manager or
        an editor takes the file with its metadata, a chat or a canvas the pixels)."""
        if self._pixmap.isNull():
            return None
        mime = QMimeData()
        mime.setImageData(self._pixmap.toImage())
        if self.image_path is not None and self.image_path.is_file():
            mime.setUrls([QUrl.fromLocalFile(str(self.image_path))])
        return mime

    def start_drag(self) -> None:
        mime = self.drag_mime_data()
        if mime is None:
            return
        drag = QDrag(self)
        drag.setMimeData(mime)
        drag.setPixmap(self._pixmap.scaled(96, 96, Qt.AspectRatioMode.KeepAspectRatio))
        drag.exec(Qt.DropAction.CopyAction)

    def dragEnterEvent(self, event) -> None:
        if png_paths(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        paths = png_paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.pngDropped.emit(str(paths[0]))

    # --- painting ---

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        pal = self.palette()
        bg = pal.color(QPalette.ColorRole.Window).darker(115)
        p.fillRect(self.rect(), bg)
        area = self._area()
        if self._pixmap.isNull():
            p.setPen(pal.color(QPalette.ColorRole.PlaceholderText))
            font = QFont(self.font())
            font.setPointSizeF(font.pointSizeF() * 1.15)
            p.setFont(font)
            p.drawText(area, Qt.AlignmentFlag.AlignCenter, self.PLACEHOLDER)
        else:
            target = self.image_rect()
            p.save()
            p.setClipRect(area)
            # nearest neighbour shows tiny latents as crisp blocks; smooth filtering for real downscales
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.zoom() < 2.0)
            p.fillRect(target.adjusted(-1, -1, 1, 1), QColor(0, 0, 0, 60))
            p.drawPixmap(target, self._pixmap, QRectF(self._pixmap.rect()))
            p.restore()
            # the zoom level in the top right corner, on a chip readable over any image
            text = self.zoom_text()
            fm = p.fontMetrics()
            chip = QRect(0, 0, fm.horizontalAdvance(text) + 10, fm.height() + 4)
            chip.moveTopRight(QPoint(self.width() - 4, 4))
            p.fillRect(chip, QColor(0, 0, 0, 140))
            p.setPen(QColor(255, 255, 255))
            p.drawText(chip, Qt.AlignmentFlag.AlignCenter, text)
        if self._caption:
            caption_h = 26
            p.setPen(pal.color(QPalette.ColorRole.WindowText))
            rect = QRectF(12, self.height() - caption_h - 6, self.width() - 24, caption_h)
            p.drawText(rect, Qt.AlignmentFlag.AlignCenter, self._caption)
        p.end()


def compact(button: QToolButton) -> QToolButton:
    """As narrow as its text allows: the image bar must fit the centre column of a 1024 px window (~220 px)."""
    button.setFixedWidth(max(24, button.fontMetrics().horizontalAdvance(button.text()) + 12))
    return button


class ImageView(QWidget):
    """A PreviewWidget with its bar: Fit, 1:1, zoom out / in, the zoom level, and Copy."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.preview = PreviewWidget()
        self.fit_button = self._button("Fit", "Fit the image to the view (double-click the image)", self.preview.fit)
        self.actual_button = self._button("1:1", "One image pixel per screen pixel", self.preview.actual_size)
        self.out_button = self._button("−", "Zoom out (mouse wheel)", self.preview.zoom_out)
        self.in_button = self._button("+", "Zoom in (mouse wheel)", self.preview.zoom_in)
        self.copy_button = self._button("Copy", "Copy the image to the clipboard", self.copy)
        self.fit_button.setCheckable(True)
        self.bar = QHBoxLayout()  # compact: the centre column is about 220 px wide in a 1024 px window
        self.bar.setContentsMargins(0, 0, 0, 0)
        self.bar.setSpacing(2)
        for b in (self.fit_button, self.actual_button, self.out_button, self.in_button):
            self.bar.addWidget(b)
        self.bar.addStretch(1)
        self.bar.addWidget(self.copy_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        layout.addWidget(self.preview, 1)
        layout.addLayout(self.bar)
        self.preview.zoomChanged.connect(self._update)
        self._update()

    def _button(self, text: str, tip: str, slot) -> QToolButton:
        b = QToolButton()
        b.setText(text)
        b.setToolTip(tip)
        b.setAutoRaise(True)
        compact(b)
        b.clicked.connect(slot)
        return b

    def copy(self) -> bool:
        """Put the image on the clipboard; False when there is none."""
        if self.preview.pixmap().isNull():
            return False
        copy_image(self.preview.pixmap().toImage())
        return True

    def _update(self) -> None:
        has = not self.preview.pixmap().isNull()
        for b in (self.fit_button, self.actual_button, self.out_button, self.in_button, self.copy_button):
            b.setEnabled(has)
        self.fit_button.setChecked(has and self.preview.is_fit())


class ImageViewer(QDialog):
    """A large, resizable view of one image (a gallery entry) with the same zoom controls."""

    def __init__(self, image: QImage, title: str, path: Path | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(title)
        self.view = ImageView(self)
        self.view.preview.set_image(image, final=True, path=path)
        layout = QVBoxLayout(self)
        layout.addWidget(self.view)
        screen = self.screen().availableGeometry() if self.screen() else QRect(0, 0, 1280, 800)
        self.resize(int(screen.width() * 0.7), int(screen.height() * 0.8))
