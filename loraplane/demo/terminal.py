"""Terminal output for the demo: colour when it is wanted, progress lines, and the live streams panel."""

from __future__ import annotations

import os
import shutil
import unicodedata

_ESCAPES = {"\n": "⏎", "\r": "⏎", "\t": " "}


def wants_color(stream) -> bool:
    """ANSI colour only for a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Style:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and code else text

    def bold(self, text: str) -> str:
        return self(text, "1")

    def dim(self, text: str) -> str:
        return self(text, "2")


def printable(text: str) -> str:
    """The base model emits arbitrary bytes; control characters must not reach the terminal raw."""
    return "".join(_ESCAPES.get(c, c if c.isprintable() else "�") for c in text)


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _tail(text: str, room: int) -> str:
    """The end of text that fits in `room` columns, so a live line shows the newest tokens."""
    if _width(text) <= room:
        return text
    out, used = [], 1  # one column for the ellipsis
    for c in reversed(text):
        used += _width(c)
        if used > room:
            break
        out.append(c)
    return "…" + "".join(reversed(out))


class Progress:
    """Status lines on stderr. On a terminal, transient lines (step counters) overwrite each other."""

    def __init__(self, stream):
        self.stream = stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.style = Style(wants_color(stream))
        self._transient = False

    def line(self, text: str, transient: bool = False) -> None:
        if transient and not self.live:
            return  # a log file wants outcomes, not every step
        if self._transient:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text if transient else text + "\n")
        self._transient = transient
        self.stream.flush()

    def for_task(self, label: str):
        """A log function that prefixes `label`: what the training code calls."""
        prefix = self.style.bold(label)

        def log(text: str, transient: bool = False) -> None:
            self.line(f"{prefix}: {text}", transient)
        return log


class StreamPanel:
    """One labelled line per stream. On a terminal the lines are redrawn in place as tokens
    arrive; otherwise each stream is printed once, when it finishes."""

    def __init__(self, stream, rows: list[tuple[str, str]]):
        """rows: (label, ANSI colour code) in display order."""
        self.stream = stream
        self.style = Style(wants_color(stream))
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.rows = rows
        self.texts = {label: "" for label, _ in rows}
        self.done: set[str] = set()
        self.label_width = max(len(label) for label, _ in rows)
        self._drawn = False

    def _line(self, label: str, code: str, room: int | None) -> str:
        text = printable(self.texts[label].lstrip())  # answers start with the space that ends the prompt
        marker = "" if label in self.done or not self.live else "▌"
        if room is not None:
            text = _tail(text, max(8, room - self.label_width - 4))
        return f"  {self.style(label.ljust(self.label_width), code + ';1')}  {self.style(text, code)}{marker}"

    def _draw(self, final: bool = False) -> None:
        room = None if final else shutil.get_terminal_size().columns
        if self._drawn:
            self.stream.write(f"\x1b[{len(self.rows)}F")  # back to the panel's first line
        for label, code in self.rows:
            self.stream.write("\x1b[2K" + self._line(label, code, room) + "\n")
        self._drawn = True
        self.stream.flush()

    def start(self) -> None:
        if self.live:
            self._draw()

    def add(self, label: str, text: str) -> None:
        self.texts[label] += text
        if self.live:
            self._draw()

    def finish(self, label: str) -> None:
        self.done.add(label)
        if self.live:
            self._draw(final=len(self.done) == len(self.rows))
        else:
            code = dict(self.rows)[label]
            self.stream.write(self._line(label, code, None) + "\n")
            self.stream.flush()
