"""Whether O_DIRECT works under a directory (tests that measure real storage skip where not),
and a file system that refuses it, for the tests of that error."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sim.calibrate.storage import DirectFile
from sim.errors import StorageError


def direct_io_problem(directory: Path) -> str | None:
    """Why O_DIRECT cannot be used under ``directory`` (None: it can)."""
    try:
        with DirectFile(directory, 1 << 20):
            return None
    except StorageError as exc:
        return str(exc)


@contextmanager
def o_direct_refused() -> Iterator[None]:
    """``os.open`` as on a file system that refuses O_DIRECT (tmpfs, some FUSE mounts): the
    file is created, then the open fails with EINVAL."""
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            real_open(path, flags & ~os.O_DIRECT, *args)  # the file exists, then EINVAL
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", refusing_open)
        yield
