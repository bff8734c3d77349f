"""Whether O_DIRECT works under a directory (tests that measure real storage skip where not)."""

from __future__ import annotations

from pathlib import Path

from sim.calibrate.storage import DirectFile
from sim.errors import StorageError


def direct_io_problem(directory: Path) -> str | None:
    """Why O_DIRECT cannot be used under ``directory`` (None: it can)."""
    try:
        with DirectFile(directory, 1 << 20):
            return None
    except StorageError as exc:
        return str(exc)
