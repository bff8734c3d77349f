"""A trace is verified once, and the verdict remembered: no run consumes an unverified trace.

Full verification (:meth:`sim.trace.format.Trace.verify`: every file's sha256 against the
manifest, every key, value and query finite) reads the whole trace, hundreds of MB for a long
one. It runs once; the passed verdict is kept in ``.verified.json`` inside the trace directory,
keyed by the trace's *fingerprint*: the sha256 of ``manifest.json`` (which holds every file's
checksum) and each file's size, mtime and ctime. Later runs compare fingerprints, a ``stat`` per
file: any change to any file (a rewrite, a copy, a flipped byte written back) changes its mtime
or ctime and makes the verdict stale, so the trace is verified again. A verdict that is missing,
unreadable, of another version or of the wrong shape is a miss, never an error. The writer
(:class:`sim.trace.writer.TraceWriter`) records the verdict of the trace it has just written
(it checksummed the files and checked every value finite as it wrote them). A trace directory
kvsim cannot write into is verified on each run instead (the verdict cannot be kept).

The coordinator of ``kvsim run`` verifies every trace of a plan before anything is written
(:func:`verify_once`) and hands the fingerprint to its workers, which check that the trace they
open still has it (:func:`check_unchanged`, cheap) before using it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sim.errors import KvsimError, TraceError
from sim.trace.format import MANIFEST_NAME, Trace

VERDICT_NAME = ".verified.json"
#: bump when what a verification checks changes, so older verdicts are misses
VERDICT_VERSION = 1


def fingerprint(path: Path | str, files: list[str]) -> dict[str, Any]:
    """The identity of a trace's bytes without reading them: the manifest's sha256 and the
    (size, mtime_ns, ctime_ns) of the manifest and of every file in ``files``."""
    path = Path(path)
    stats = {}
    for name in [MANIFEST_NAME, *files]:
        st = (path / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    manifest = hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
    return {"version": VERDICT_VERSION, "manifest_sha256": manifest, "files": stats}


def _trace_fingerprint(trace: Trace) -> dict[str, Any]:
    try:
        return fingerprint(trace.path, [name for name, _entry in trace.iter_files()])
    except OSError as exc:
        raise TraceError(f"trace {trace.path}: cannot read ({exc.strerror or exc})") from None


def _recorded(path: Path) -> Any:
    try:
        return json.loads((path / VERDICT_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def record(path: Path | str, verdict: dict[str, Any]) -> bool:
    """Keep a passed verification's fingerprint beside the trace; False if it cannot be written
    (a read-only trace directory: the trace is then verified on every run)."""
    from sim.atomic import atomic_write_text  # sim.atomic imports nothing of the trace package

    try:
        atomic_write_text(Path(path) / VERDICT_NAME, json.dumps(verdict, indent=1) + "\n")
    except (OSError, KvsimError):  # KvsimError: sim.atomic's one-line form of an OSError
        return False
    return True


def is_verified(trace: Trace) -> bool:
    """The trace has a recorded verdict that matches its current fingerprint."""
    return _recorded(trace.path) == _trace_fingerprint(trace)


def verify_once(trace: Trace, again: bool = False) -> tuple[dict[str, Any], bool]:
    """Verify ``trace`` unless a matching verdict is recorded (``again``: whatever is recorded);
    returns (its fingerprint, whether the full verification ran). Raises :class:`TraceError`
    (one line, naming the file) if a checksum differs or a value is not finite."""
    current = _trace_fingerprint(trace)
    if not again and _recorded(trace.path) == current:
        return current, False
    trace.verify()
    # the files did not change while they were read (else this verdict would describe bytes
    # that were never checked)
    if _trace_fingerprint(trace) != current:
        raise TraceError(f"trace {trace.path}: changed while it was being verified; try again")
    record(trace.path, current)
    return current, True


def check_unchanged(trace: Trace, verified: dict[str, Any]) -> None:
    """Raise :class:`TraceError` unless ``trace`` still has the fingerprint ``verified`` (from
    :func:`verify_once`, taken by the process that verified it)."""
    current = _trace_fingerprint(trace)
    if current == verified:
        return
    changed = sorted(
        name for name in {*current["files"], *verified.get("files", {})}
        if current["files"].get(name) != verified.get("files", {}).get(name)
    )
    what = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "") or MANIFEST_NAME
    raise TraceError(
        f"trace {trace.path}: {what} changed after the trace was verified; run again to "
        "verify it anew"
    )
