"""Issuing O_DIRECT commands through io_uring: one thread, no hand-offs between threads.

:class:`UringIssuer` does what :class:`sim.calibrate.storage.Issuer` does (the same commands,
at most ``queue_depth`` in flight, the same :class:`~sim.calibrate.storage.IoResult`) through
Linux's io_uring with the ``liburing`` binding (PyPI ``liburing``; the ``fidelity`` extra):
each command is prepared as a ``readv`` / ``writev`` on a page-aligned ``mmap`` buffer of its
queue slot and submitted at once, and completions are reaped by polling, so a command's
completion time is taken within microseconds of the kernel posting it.

Why a second issuer: the thread issuer starts a batch's commands one thread hand-off apart.
Measured on this project's 2-core VM (ext4 on a virtual disk, otherwise idle, 300 batches of
random 4 KiB reads each from an idle device, medians): a batch of 4 / 8 / 32 commands took
197 / 325 / 1,119 us with threads (their issue times spread over 66 / 158 / 555 us) and
153 / 223 / 536 us through io_uring. A replay of many short batches (a layer's few cache-miss
reads) then measures the threads, not the storage.

``releases_s`` (optional, per command in the source's order): the earliest time, in seconds
from the run's start, at which the command may be submitted; the issuer keeps reaping
completions while it waits (the thread issuer's sources sleep instead, which would delay the
reaping here).
"""

from __future__ import annotations

import errno
import gc
import mmap
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sim.calibrate.storage import ALIGN, Command, IoResult, aligned_buffer
from sim.errors import StorageError


def uring_available() -> str | None:
    """``None`` if io_uring can be used here, else why not (one line)."""
    try:
        import liburing
    except ImportError:
        return "the liburing package is not installed (pip install 'kvsim[fidelity]')"
    ring = liburing.Ring()
    try:
        liburing.io_uring_queue_init(2, ring, 0)
    except OSError as exc:  # disabled by sysctl (io_uring_disabled), seccomp, an old kernel
        return f"io_uring is refused here ({exc.strerror or exc})"
    liburing.io_uring_queue_exit(ring)
    return None


#: the ways of issuing commands (``auto``: io_uring where it works, else threads)
ISSUERS = ("auto", "threads", "io_uring")


def choose_issuer(issuer: str, command: str) -> str:
    """``threads`` or ``io_uring`` for ``issuer`` (``auto``: io_uring where it works); a
    requested io_uring that cannot work here is a one-line :class:`StorageError`."""
    if issuer not in ISSUERS:
        raise StorageError(f"{command} --issuer: one of {', '.join(ISSUERS)}, got {issuer!r}")
    if issuer == "threads":
        return issuer
    problem = uring_available()
    if problem is None:
        return "io_uring"
    if issuer == "io_uring":
        raise StorageError(f"{command} --issuer io_uring: {problem}")
    return "threads"


class UringIssuer:
    """Issue commands on an O_DIRECT descriptor through io_uring with at most
    ``queue_depth`` in flight (a context manager; see the module docstring)."""

    def __init__(self, fd: int, queue_depth: int, max_io_bytes: int) -> None:
        if queue_depth < 1 or max_io_bytes < ALIGN or max_io_bytes % ALIGN:
            raise ValueError(
                f"queue_depth must be >= 1 and max_io_bytes a positive multiple of {ALIGN}"
            )
        problem = uring_available()
        if problem:
            raise StorageError(f"--issuer io_uring: {problem}")
        import liburing

        self._L: Any = liburing
        self.fd = fd
        self.queue_depth = queue_depth
        self.max_io_bytes = max_io_bytes
        self._ring = liburing.Ring()
        self._cqe = liburing.Cqe()
        entries = 1 << max(1, (queue_depth - 1).bit_length())
        liburing.io_uring_queue_init(entries, self._ring, 0)
        self._buffers: list[mmap.mmap] = [
            aligned_buffer(max_io_bytes, seed=index) for index in range(queue_depth)
        ]
        self._views = [memoryview(buffer) for buffer in self._buffers]
        self._blocks = [np.frombuffer(buffer, dtype=np.uint64) for buffer in self._buffers]
        self._stamp = 0
        self._closed = False

    def run(
        self, source: Iterator[Command], deadline: float | None = None,
        queue_depth: int | None = None, timeline: bool = False,
        releases_s: Sequence[float] | np.ndarray | None = None,
    ) -> IoResult:
        """Issue the commands of ``source`` (until it ends or ``time.perf_counter()`` passes
        ``deadline``), at most ``queue_depth`` (default: all slots) in flight, each not before
        its ``releases_s`` entry; ``timeline``: also each command's issue and completion time
        (us from the run's start, in the source's order)."""
        L = self._L
        depth = self.queue_depth if queue_depth is None else queue_depth
        if not 1 <= depth <= self.queue_depth:
            raise ValueError(f"queue_depth must be in [1, {self.queue_depth}], got {depth}")
        free = list(range(depth))
        in_flight: dict[int, tuple[int, int, int, Any]] = {}  # slot -> index, size, t0, iovec
        latencies: list[int] = []
        marks: list[tuple[int, int, int]] = []
        moved = 0
        taken = 0
        exhausted = False
        start_ns = time.perf_counter_ns()
        start = time.perf_counter()
        words_per_block = ALIGN // 8

        def reap() -> bool:
            """Take every completion posted; True if there was one."""
            nonlocal moved
            got = False
            while True:
                try:
                    L.io_uring_peek_cqe(self._ring, self._cqe)
                except BlockingIOError:
                    return got
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EINTR):
                        return got
                    raise
                t1 = time.perf_counter_ns()
                entry = self._cqe[0]
                slot = int(entry.user_data)
                index, size, t0, _iovec = in_flight.pop(slot)
                try:
                    result = entry.res  # the binding raises the command's error here
                finally:
                    L.io_uring_cqe_seen(self._ring, entry)
                    free.append(slot)
                if result != size:
                    raise OSError(errno.EIO, f"short I/O: {result} of {size} bytes")
                latencies.append(t1 - t0)
                marks.append((index, t0, t1))
                moved += size
                got = True

        try:
            while True:
                while free and not exhausted:
                    if deadline is not None and time.perf_counter() >= deadline:
                        exhausted = True
                        break
                    command = next(source, None)
                    if command is None:
                        exhausted = True
                        break
                    write, offset, size = command
                    if size > self.max_io_bytes:
                        raise ValueError(f"command of {size} bytes > {self.max_io_bytes}")
                    if releases_s is not None:
                        release_ns = start_ns + int(float(releases_s[taken]) * 1e9)
                        while time.perf_counter_ns() < release_ns:
                            reap()
                    slot = free.pop()
                    if write:
                        self._stamp += 1  # every written 4 KiB block unique (no dedup)
                        self._blocks[slot][: size // 8 : words_per_block] = (
                            self._stamp << 20 | np.arange(size // ALIGN, dtype=np.uint64)
                        )
                    iovec = L.Iovec([self._views[slot][:size]])
                    sqe = L.io_uring_get_sqe(self._ring)
                    if write:
                        L.io_uring_prep_writev(sqe, self.fd, iovec, offset)
                    else:
                        L.io_uring_prep_readv(sqe, self.fd, iovec, offset)
                    L.io_uring_sqe_set_data64(sqe, slot)
                    t0 = time.perf_counter_ns()
                    L.io_uring_submit(self._ring)
                    in_flight[slot] = (taken, size, t0, iovec)
                    taken += 1
                    reap()
                if not in_flight:
                    break
                reap()  # poll: a completion is timed when the kernel posts it
        except BaseException:
            self._drain(in_flight)
            raise
        seconds = time.perf_counter() - start
        timeline_us = None
        if timeline:
            timeline_us = np.zeros((taken, 2), dtype=np.float64)
            for index, issued, completed in marks:
                timeline_us[index] = ((issued - start_ns) / 1e3, (completed - start_ns) / 1e3)
        return IoResult(len(latencies), moved, seconds,
                        np.asarray(latencies, dtype=np.float64) / 1e3, timeline_us, start_ns)

    def _drain(self, in_flight: dict[int, Any]) -> None:
        """Wait for the commands still in flight (their buffers must outlive them)."""
        L = self._L
        while in_flight:
            try:
                L.io_uring_wait_cqe(self._ring, self._cqe)
                entry = self._cqe[0]
                slot = int(entry.user_data)
                try:
                    _ = entry.res
                except OSError:
                    pass
                L.io_uring_cqe_seen(self._ring, entry)
                in_flight.pop(slot, None)
            except OSError:
                break

    def close(self) -> None:
        """Release the ring and the buffers (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self._L.io_uring_queue_exit(self._ring)
        self._blocks.clear()
        gc.collect()  # the binding's Iovec objects hold exports of the buffers' slices
        for view, buffer in zip(self._views, self._buffers, strict=True):
            try:
                view.release()
                buffer.close()
            except BufferError:  # still exported: the buffer goes with its last reference
                pass

    def __enter__(self) -> UringIssuer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
