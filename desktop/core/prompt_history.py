"""Recent prompts, newest first. Qt-free.

Prompts are what a user most wants kept private, so the history follows the "remember prompts" setting (off by
default): off, it lives in this process only and is never written; on, it is kept in the settings file (0600)
like the last-used prompt. Turning the setting off forgets what was stored at the next save.
"""

from __future__ import annotations

MAX_PROMPTS = 50


class PromptHistory:
    def __init__(self, settings, limit: int = MAX_PROMPTS):
        self._settings = settings
        self._limit = limit
        stored = settings.prompt_history if settings.remember_prompt else []
        self._items: list[str] = [p for p in stored if isinstance(p, str) and p.strip()][:limit]

    def items(self) -> list[str]:
        return list(self._items)

    def add(self, prompt: str) -> None:
        """Put ``prompt`` first (once); the settings hold it only while prompts are remembered (the caller saves)."""
        prompt = " ".join(str(prompt).split())
        if not prompt:
            return
        self._items = [prompt, *(p for p in self._items if p != prompt)][: self._limit]
        self.sync()

    def matching(self, text: str) -> list[str]:
        """Prompts holding every word of ``text`` (case-insensitive), newest first."""
        words = text.lower().split()
        return [p for p in self._items if all(w in p.lower() for w in words)]

    def clear(self) -> None:
        self._items = []
        self.sync()

    def sync(self) -> None:
        """Mirror into the settings when prompts are remembered, else keep them out of it."""
        self._settings.prompt_history = list(self._items) if self._settings.remember_prompt else []
