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

from sim.errors import OutputError

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
    exception the temporary is removed and ``path`` is left as it was; an :class:`OSError` (a
    full disk, a read-only directory, a name too long) becomes one-line :class:`OutputError`
    naming ``path``. A directory replaces an existing directory ``path`` (removed just before the
    rename). Parent directories are created.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # left by an earlier process that had the same id
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {os_error_text(exc)}") from exc
    finally:
        try:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)
        except OSError:  # the temporary's name itself is impossible (too long, under a file)
            pass


def os_error_text(exc: OSError) -> str:
    """An OSError's reason without its file name (``No space left on device``), or its first
    line when it carries no ``strerror`` (pyarrow's I/O errors)."""
    if exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def unwritable(path: Path | str, margin: int = 0) -> str | None:
    """Why a directory at ``path`` cannot be made or written into (``None``: it can), found
    without writing anything: a name longer than a file name can be (the last one with
    ``margin`` bytes to spare, for a temporary sibling's prefix and suffix), a file in its
    place or among its parents, or a nearest existing directory this process may not write
    into (permissions, a read-only file system)."""
    path = Path(os.path.abspath(path))
    limit = 255
    for i, part in enumerate(path.parts[1:], start=2):
        spare = margin if i == len(path.parts) else 0
        if len(os.fsencode(part)) + spare > limit:
            return (
                f"the name {shorten_name(part)!r} is {len(os.fsencode(part))} bytes long; a file "
                f"name holds at most {limit - spare} here"
            )
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            return f"{path} is a file, not a directory"
        return f"{existing} is a file, so no directory can be made under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable (permissions or a read-only file system)"
    return None


def shorten_name(name: str, keep: int = 40) -> str:
    """``name`` cut to about ``keep`` characters for a message (``aaaa...aaaa``)."""
    return name if len(name) <= keep else f"{name[: keep // 2]}...{name[-keep // 4:]}"


def atomic_write_text(path: Path | str, text: str) -> None:
    """``path.write_text(text)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
