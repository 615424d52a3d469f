"""Telling the user a job finished while they were in another window: a desktop notification through the system
tray where the desktop has one (QSystemTrayIcon.showMessage), and the task bar entry's alert everywhere."""

from __future__ import annotations

from PySide6.QtWidgets import QApplication, QStyle, QSystemTrayIcon, QWidget


class Notifier:
    """``notify(title, text)``; ``shown`` keeps what was shown (the status bar and tests read it)."""

    def __init__(self, window: QWidget):
        self.window = window
        self.shown: list[tuple[str, str, str]] = []  # (how, title, text)
        self._tray: QSystemTrayIcon | None = None

    @staticmethod
    def tray_available() -> bool:
        return QSystemTrayIcon.isSystemTrayAvailable() and QSystemTrayIcon.supportsMessages()

    def notify(self, title: str, text: str) -> str:
        """Show a notification; returns how: "tray" (a desktop notification) or "alert" (the task bar entry
        flashes: desktops without a notification area)."""
        QApplication.alert(self.window)
        how = "alert"
        if self.tray_available():
            if self._tray is None:
                icon = self.window.windowIcon()
                if icon.isNull():
                    icon = self.window.style().standardIcon(QStyle.StandardPixmap.SP_DialogApplyButton)
                self._tray = QSystemTrayIcon(icon, self.window)
                self._tray.setToolTip(self.window.windowTitle())
                self._tray.messageClicked.connect(self._raise_window)
            self._tray.show()
            self._tray.showMessage(title, text, QSystemTrayIcon.MessageIcon.Information, 8000)
            how = "tray"
        self.shown.append((how, title, text))
        return how

    def _raise_window(self) -> None:
        self.window.showNormal()
        self.window.raise_()
        self.window.activateWindow()
