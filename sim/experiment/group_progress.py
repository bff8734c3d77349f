"""Progress inside a pass group: which run, which phase, how many layers or steps are done.

A pass group runs in a worker (a local process, a Dask worker, or the coordinating process
itself when there is one worker). Inside it, :class:`GroupProgress` counts the policy pass's
layers and each replay's decode steps and hands a small state mapping to a *sink* at most once
per ``interval_s``: in a worker process the sink is a :class:`ProgressFile` (a few hundred
bytes of JSON replaced atomically, so a reader never sees half a file) that the coordinator
reads in the poll loop it already runs (:func:`read_progress`); in-process it is a callback.
The coordinator shows :func:`describe` of each state as the postfix of its runs bar
(:func:`sim.progress.progress`: tqdm on a terminal, a plain line at most every 30 s in a log).

Cost: one ``time.monotonic()`` call and a comparison per layer or step, plus one small file
write per second: nothing next to a replay step (milliseconds).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: seconds between two reports of a group's progress
REPORT_INTERVAL_S = 1.0


class GroupProgress:
    """Counts one pass group's work and reports it to ``sink`` (at most every ``interval_s``,
    and at every phase change)."""

    def __init__(
        self,
        sink: Callable[[dict[str, Any]], None] | None,
        interval_s: float = REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink, self.interval_s, self.clock = sink, interval_s, clock
        self.state: dict[str, Any] = {}
        self._last = -float("inf")

    def start(self, run: str, phase: str, total: int, unit: str) -> None:
        """A new phase (``"policy pass"`` in layers, ``"replay"`` in steps) of ``run``."""
        self.state = {"run": run, "phase": phase, "done": 0, "total": int(total), "unit": unit}
        self._emit(self.clock())

    def advance(self, n: int = 1) -> None:
        """``n`` more units of the current phase are done."""
        self.state["done"] += n
        now = self.clock()
        if now - self._last >= self.interval_s:
            self._emit(now)

    def _emit(self, now: float) -> None:
        self._last = now
        if self.sink is not None:
            self.sink(dict(self.state))


class ProgressFile:
    """A sink writing each state as JSON to ``path`` (write to a sibling, then rename).

    Failing to write (a full disk, a directory a Dask worker cannot see) only loses progress
    reports, never the run: errors are swallowed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)
        except OSError:
            try:  # a full disk leaves an empty temporary behind
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def read_progress(path: str | Path) -> dict[str, Any] | None:
    """The last state a :class:`ProgressFile` wrote, ``None`` if there is none (yet)."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def describe(state: dict[str, Any]) -> str:
    """``"dynakv: replay 3000/7168 step"``: one state as a short text."""
    try:
        return (
            f"{state['run']}: {state['phase']} {state['done']}/{state['total']} {state['unit']}"
        )
    except KeyError:
        return ""
