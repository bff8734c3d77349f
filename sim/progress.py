"""Progress bars that suit where they are shown.

On a terminal, :func:`progress` is a tqdm bar redrawn in place. Anywhere else (a CI log, a file
``kvsim run ... 2> log``), redrawing in place writes every update as one more carriage-return
record, thousands per run; there it is a :class:`LineProgress` that writes at most one plain line
every ``interval_s`` seconds (none for work shorter than that) and one closing line if it wrote
any, so logs stay short and still show long work moving.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from tqdm import tqdm

#: seconds between two lines of progress in a log that is not a terminal
LOG_INTERVAL_S = 30.0


class Progress(Protocol):
    """What kvsim's long-running loops call on a progress bar (a subset of tqdm's interface)."""

    def update(self, n: float = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def close(self) -> Any: ...


class LineProgress:
    """Progress for a log: one line per ``interval_s`` at most, then a closing line.

    A line reads ``desc: 12/30 layer (40%), 35 s elapsed, about 52 s left [postfix]``.
    """

    def __init__(
        self,
        total: float | None,
        desc: str = "",
        unit: str = "it",
        stream: IO[str] | None = None,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s(={interval_s}) must be > 0")
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.clock = clock
        self.n: float = 0
        self.postfix = ""
        self.lines_written = 0
        self.started = clock()
        self._last_line = self.started
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last_line >= self.interval_s:
            self._write(now)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.lines_written:
            self._write(self.clock(), final=True)

    def line(self, now: float, final: bool = False) -> str:
        """The text of one progress line at time ``now``."""
        elapsed = now - self.started
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            count = f"{self.n:g}/{self.total:g} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count = f"{self.n:g} {self.unit}"
        parts = [count]
        parts.append(f"{elapsed:.0f} s elapsed")
        if not final and self.total and 0 < self.n < self.total:
            parts.append(f"about {elapsed * (self.total - self.n) / self.n:.0f} s left")
        tail = f" [{self.postfix}]" if self.postfix else ""
        return head + ", ".join(parts) + tail

    def _write(self, now: float, final: bool = False) -> None:
        self.stream.write(self.line(now, final) + "\n")
        self.stream.flush()
        self.lines_written += 1
        self._last_line = now


class _Silent:
    """A disabled progress bar."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress(
    total: float | None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    stream: IO[str] | None = None,
    leave: bool = False,
) -> Progress:
    """A progress bar for ``total`` units of work, written to ``stream`` (default stderr).

    ``enabled=False`` gives a bar that writes nothing. On a terminal: a tqdm bar (``leave``
    keeps it on screen when done); elsewhere: a :class:`LineProgress`.
    """
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=stream)
    return LineProgress(total, desc, unit, stream)
