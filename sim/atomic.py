"""Writing a file or a directory so that readers see all of it or none of it.

Results, figures, cached policy passes and assembled model files are written under a temporary
name in the destination's own directory, then renamed over the destination: a rename within one
file system is atomic (POSIX ``rename(2)``), so an interrupted writer (Ctrl-C, a killed worker,
a full disk) never leaves a half-written file under the real name. No ``fsync``: the guarantee is
against interrupted processes, not against power loss before the page cache is flushed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What temporaries look like (``.<name>.tmp-<pid><suffix>``), for sweeping up those a killed
# process left behind.
TEMPORARY_GLOB = ".*.tmp-*"


def temporary_path(path: Path) -> Path:
    """The temporary sibling ``path`` is written to: hidden, tagged with the process id (two
    processes never share one), and ending in ``path``'s suffix (writers that pick a format from
    the name, such as matplotlib's ``savefig``, still see ``.png`` or ``.pdf``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a normal exit rename it to ``path``.

    The caller writes a file (or creates and fills a directory) at the yielded path. On an
    exception the temporary is removed and ``path`` is left as it was. A directory replaces an
    existing directory ``path`` (removed just before the rename). Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    _remove(tmp)  # left by an earlier process that had the same id
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def atomic_write_text(path: Path | str, text: str) -> None:
    """``path.write_text(text)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
