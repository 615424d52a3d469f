"""The image area: the live per-step preview, then the final decoded image, scaled to fit and kept in aspect."""

from __future__ import annotations

from PySide6.QtCore import QRect, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPalette, QPixmap
from PySide6.QtWidgets import QSizePolicy, QWidget


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


class PreviewWidget(QWidget):
    """Shows a QPixmap scaled to the widget (nearest neighbour when blowing up small latents), with a caption."""

    PLACEHOLDER = "No image yet.\nWrite a prompt and press Generate."

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._pixmap = QPixmap()
        self._caption = ""
        self._final = False
        self.setMinimumSize(160, 160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setAccessibleName("Image preview")

    # --- API ---

    def set_image(self, image, *, final: bool = False, caption: str = "") -> None:
        """``image``: a PIL image or a QImage. ``final``: the decoded image rather than a latent preview."""
        qimage = image if isinstance(image, QImage) else pil_to_qimage(image)
        self._pixmap = QPixmap.fromImage(qimage)
        self._final = final
        self._caption = caption
        self.update()

    def set_caption(self, caption: str) -> None:
        self._caption = caption
        self.update()

    def clear(self) -> None:
        self._pixmap = QPixmap()
        self._caption = ""
        self._final = False
        self.update()

    def pixmap(self) -> QPixmap:
        return self._pixmap

    def is_final(self) -> bool:
        return self._final

    def caption(self) -> str:
        return self._caption

    def sizeHint(self) -> QSize:
        return QSize(512, 512)

    # --- painting ---

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        pal = self.palette()
        bg = pal.color(QPalette.ColorRole.Window).darker(115)
        p.fillRect(self.rect(), bg)
        caption_h = 26 if self._caption else 0
        area = self.rect().adjusted(12, 12, -12, -12 - caption_h)
        if self._pixmap.isNull():
            p.setPen(pal.color(QPalette.ColorRole.PlaceholderText))
            font = QFont(self.font())
            font.setPointSizeF(font.pointSizeF() * 1.15)
            p.setFont(font)
            p.drawText(area, Qt.AlignmentFlag.AlignCenter, self.PLACEHOLDER)
        else:
            target = fit_rect(self._pixmap.size(), area)
            upscale = target.width() / max(1, self._pixmap.width())
            # nearest neighbour shows tiny latents as crisp blocks; smooth filtering for real downscales
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, upscale < 2.0)
            p.fillRect(target.adjusted(-1, -1, 1, 1), QColor(0, 0, 0, 60))
            p.drawPixmap(target, self._pixmap)
        if self._caption:
            p.setPen(pal.color(QPalette.ColorRole.WindowText))
            rect = QRectF(12, self.height() - caption_h - 6, self.width() - 24, caption_h)
            p.drawText(rect, Qt.AlignmentFlag.AlignCenter, self._caption)
        p.end()
