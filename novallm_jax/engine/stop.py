"""Stop strings on streamed text: never return a stop string, and hold back text that may be the start of one."""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    """Feeds text pieces in; returns the text safe to emit and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""  # text not yet emitted, because it could begin a stop string
        self._hold = max((len(s) - 1 for s in self.stops), default=0)

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text to emit now, stopped). After a stop, the text is cut before the stop string."""
        text = self._held + piece
        if not self.stops:
            return text, False
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            self._held = ""
            return text[:cut], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop string."""
        text, self._held = self._held, ""
        return text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
