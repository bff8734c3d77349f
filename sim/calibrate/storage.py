"""Measuring storage on a real file: O_DIRECT reads and writes at a chosen queue depth.

The pieces, reusable by anything that issues I/O on real storage (a replayer of a simulated
flash schedule as much as the calibration's fixed patterns):

* :class:`DirectFile`: a measurement file under a directory, opened with ``O_DIRECT`` (the page
  cache is bypassed, so every read reaches the device), preallocated, and always removed by
  :meth:`DirectFile.close` (a ``with`` block removes it on any error, Ctrl-C included).
  ``O_DIRECT`` needs every offset, size and buffer address aligned to the device's logical block
  size: offsets and sizes here are multiples of :data:`ALIGN`, and buffers are anonymous
  ``mmap`` regions, which start on a page boundary.
* :class:`Issuer`: ``queue_depth`` worker threads, each with its own page-aligned buffer,
  taking commands ``(write, offset, size)`` from one shared source and issuing them with
  ``os.preadv`` / ``os.pwritev``; a thread blocks in the system call (without the GIL) until
  its command completes, so at most ``queue_depth`` commands are in flight, the way fio's
  ``psync`` engine with ``numjobs`` threads (or ``libaio`` with ``iodepth``) keeps them.
  :meth:`Issuer.run` returns when the source is exhausted or a deadline has passed and every
  command taken has completed, with every command's latency (and, with ``timeline=True``,
  each command's issue and completion time in the source's order: what ``kvsim replay``,
  :mod:`sim.io_replay`, times a simulated schedule's batches with).
* :func:`random_commands` / :func:`sequential_commands`: the command sources of the patterns.

Why the file's size matters although ``O_DIRECT`` bypasses the page cache: the device and the
layers under the file system have caches of their own that ``O_DIRECT`` does not bypass: an SSD
or UFS controller's DRAM (its mapping table and a read buffer; UFS 4.0 devices may use host
memory, HPB), the SLC write cache of TLC NAND (writes land at SLC speed until it fills), and on
a virtual machine the host's page cache under the virtual disk. Random reads over a region
that fits in one of them measure that cache, not the NAND; a region of several GiB spreads
them over more data than such caches hold (a phone's UFS has a few hundred MiB of SLC cache
per 100 GB, controllers a few MiB to 1 GiB of DRAM), which is why the default file is 8 GiB.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.errors import StorageError

#: alignment of every offset and size (O_DIRECT needs the logical block size; 4 KiB covers
#: every disk and flash device, and is UFS's logical block)
ALIGN = 4096
#: the measurement file's name under the measured directory (one per process)
FILE_PREFIX = ".kvsim-calibrate-"
#: free space kept beyond the measurement file
FREE_MARGIN_BYTES = 256 * 2**20

#: one command: (write?, offset in bytes, size in bytes)
Command = tuple[bool, int, int]


#: file systems that keep files in memory: O_DIRECT there (tmpfs accepts it since Linux 6.6)
#: reaches no storage device
MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})


def mount_of(directory: Path) -> tuple[str, str, str]:
    """(mount point, file system type, device) of the mount holding ``directory``, from
    ``/proc/mounts`` (``("", "unknown", "unknown")`` where there is none)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ("", "unknown", "unknown")
    resolved = str(directory.resolve())
    best = ("", "unknown", "unknown")
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, parts[2], parts[0])
    return best


def check_directory(
    directory: Path, size_bytes: int, command: str = "calibrate",
    smaller: str = "use a smaller --size",
) -> None:
    """Refuse (:class:`StorageError`, one line) a directory that does not exist, is not one,
    is on a file system kept in memory, cannot be written into, or has less free space than
    ``size_bytes`` plus a margin. ``command`` names the command in the message, ``smaller``
    says how to need less space."""
    if not directory.exists():
        raise StorageError(f"{command} --path: {directory} does not exist")
    if not directory.is_dir():
        raise StorageError(f"{command} --path: {directory} is not a directory")
    _, fs_type, _ = mount_of(directory)
    if fs_type in MEMORY_FILE_SYSTEMS:
        raise StorageError(
            f"{command} --path: {directory} is on {fs_type}, which keeps files in memory "
            "(O_DIRECT reaches no storage there); measure a directory on the storage device"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StorageError(
            f"{command} --path: {directory} is not writable (permissions or a read-only file "
            "system)"
        )
    free = shutil.disk_usage(directory).free
    if free < size_bytes + FREE_MARGIN_BYTES:
        raise StorageError(
            f"{command} --path: {directory} has {free / 2**30:.2f} GiB free; the measurement "
            f"file needs {size_bytes / 2**30:.2f} GiB plus {FREE_MARGIN_BYTES // 2**20} MiB "
            f"({smaller})"
        )


def aligned_buffer(size_bytes: int, seed: int | None = None) -> mmap.mmap:
    """An anonymous memory region of ``size_bytes`` (rounded up to pages): page-aligned, as
    O_DIRECT needs; zeroed, or random bytes from ``seed`` (data a device cannot compress)."""
    pages = -(-size_bytes // mmap.PAGESIZE)
    buffer = mmap.mmap(-1, pages * mmap.PAGESIZE)
    if seed is not None:
        buffer.write(np.random.default_rng(seed).bytes(len(buffer)))
        buffer.seek(0)
    return buffer


class DirectFile:
    """A measurement file of up to ``size_bytes`` under ``directory``, opened with O_DIRECT for
    reads and writes; removed by :meth:`close` (use it as a context manager).

    Refused with one line (:class:`StorageError`, the file removed) where O_DIRECT is: not
    offered by the platform, refused when opening (tmpfs, ``/dev/shm``: ``EINVAL``) or on the
    first aligned write and read (some file systems accept the flag and refuse the I/O).
    ``written_bytes`` is how much of the file (from offset 0) holds data: reads must stay
    below it (the rest is unwritten, read as zeros without reaching the device).
    """

    def __init__(self, directory: Path, size_bytes: int, command: str = "calibrate",
                 prefix: str = FILE_PREFIX) -> None:
        self.command = command
        if size_bytes < ALIGN or size_bytes % ALIGN:
            raise StorageError(
                f"{command} --size: must be a positive multiple of {ALIGN} bytes, got {size_bytes}"
            )
        if not hasattr(os, "O_DIRECT"):
            raise StorageError(f"{command}: this platform has no O_DIRECT (Linux and Android do)")
        self.directory = directory
        self.path = directory / f"{prefix}{os.getpid()}.dat"
        self.size_bytes = size_bytes
        self.written_bytes = 0
        self.fd = -1
        try:
            self.path.unlink(missing_ok=True)  # left by a killed process with this pid
            try:
                self.fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600
                )
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise self._refused() from None
                raise
            self._probe()
            self._preallocate()
        except BaseException:
            self.close()
            raise

    def _refused(self) -> StorageError:
        return StorageError(
            f"{self.command} --path: {self.directory} refuses O_DIRECT (tmpfs such as /dev/shm "
            "does);"
            " measure a directory on the storage device itself"
        )

    def _probe(self) -> None:
        """One aligned write and read: the file system really does direct I/O."""
        buffer = aligned_buffer(ALIGN)
        try:
            buffer.write(os.urandom(ALIGN))
            if os.pwritev(self.fd, [buffer], 0) != ALIGN or os.preadv(
                self.fd, [buffer], 0
            ) != ALIGN:
                raise self._refused()
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise self._refused() from None
            raise
        finally:
            buffer.close()

    def _preallocate(self) -> None:
        """Reserve the blocks now: a full disk fails here, not in the middle of a measurement."""
        if not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(self.fd, 0, self.size_bytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StorageError(
                    f"{self.command} --path: no space for a {self.size_bytes / 2**30:.2f} GiB "
                    f"measurement file in {self.directory}"
                    + (" (use a smaller --size)" if self.command == "calibrate" else "")
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise

    def close(self) -> None:
        """Close and remove the file (safe to call twice)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class IoResult:
    """What one :meth:`Issuer.run` did: commands and bytes completed, the time from its start
    to the last completion, and every command's latency (us, in completion order per thread)."""

    commands: int
    bytes: int
    seconds: float
    latencies_us: np.ndarray
    #: with ``Issuer.run(..., timeline=True)``: each command's (issue, completion) time in us
    #: from the run's start, one row per command in the order the source gave them
    timeline_us: np.ndarray | None = None
    #: ``time.perf_counter_ns()`` at the run's start (the timeline's zero)
    start_ns: int = 0

    @property
    def iops(self) -> float:
        return self.commands / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_s(self) -> float:
        """MB/s (1e6 bytes/s) of the bytes completed."""
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def mean_latency_us(self) -> float:
        return float(self.latencies_us.mean()) if self.latencies_us.size else 0.0


class _Job:
    """One :meth:`Issuer.run`: the shared command source and what the workers report back."""

    def __init__(self, source: Iterator[Command], deadline: float | None, workers: int,
                 timeline: bool = False) -> None:
        self.source = source
        self.deadline = deadline
        self.timeline = timeline
        self.taken = 0  # commands taken from the source so far
        self.marks: list[list[tuple[int, int, int]]] = []  # (index, issue ns, completion ns)
        self.lock = threading.Lock()
        self.stopped = False
        self.remaining = workers
        self.done = threading.Event()
        self.latencies: list[list[int]] = []
        self.commands = 0
        self.bytes = 0
        self.error: BaseException | None = None

    def next(self) -> tuple[int, Command] | None:
        """The source's next command and its index, or ``None``: stop."""
        with self.lock:
            if self.stopped:
                return None
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                self.stopped = True
                return None
            command = next(self.source, None)
            if command is None:
                self.stopped = True
                return None
            self.taken += 1
            return self.taken - 1, command

    def report(self, latencies: list[int], n_bytes: int, error: BaseException | None,
               marks: list[tuple[int, int, int]] | None = None) -> None:
        with self.lock:
            self.latencies.append(latencies)
            if marks is not None:
                self.marks.append(marks)
            self.commands += len(latencies)
            self.bytes += n_bytes
            if error is not None:
                self.stopped = True
                if self.error is None:
                    self.error = error
            self.remaining -= 1
            if not self.remaining:
                self.done.set()


class Issuer:
    """Issue commands on an O_DIRECT descriptor with at most ``queue_depth`` in flight (see the
    module docstring). The worker threads live until :meth:`close` (a context manager), so
    many short runs (a replayer's per-step batches) do not pay for starting threads."""

    def __init__(self, fd: int, queue_depth: int, max_io_bytes: int) -> None:
        if queue_depth < 1 or max_io_bytes < ALIGN or max_io_bytes % ALIGN:
            raise ValueError(
                f"queue_depth must be >= 1 and max_io_bytes a positive multiple of {ALIGN}"
            )
        self.fd = fd
        self.queue_depth = queue_depth
        self.max_io_bytes = max_io_bytes
        self._inboxes: list[queue.SimpleQueue[_Job | None]] = []
        self._threads: list[threading.Thread] = []
        # random buffers, and a stamp that makes every written 4 KiB block unique: a device
        # can neither compress nor deduplicate what is written
        self._stamp = 0
        self._job: _Job | None = None
        for index in range(queue_depth):
            inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._work, args=(inbox, aligned_buffer(max_io_bytes, seed=index)),
                name=f"kvsim-io-{index}", daemon=True,
            )
            self._inboxes.append(inbox)
            self._threads.append(thread)
            thread.start()

    def run(
        self, source: Iterator[Command], deadline: float | None = None,
        queue_depth: int | None = None, timeline: bool = False,
    ) -> IoResult:
        """Issue the commands of ``source`` (until it ends or ``time.perf_counter()`` passes
        ``deadline``) with at most ``queue_depth`` (default: all the workers) in flight.

        The source is read under a lock, one command at a time, by whichever worker is free:
        commands start in the source's order (a source may block, say until a command's
        release time, and holds the workers back meanwhile). ``timeline``: also return each
        command's issue and completion time (:attr:`IoResult.timeline_us`)."""
        depth = self.queue_depth if queue_depth is None else queue_depth
        if not 1 <= depth <= self.queue_depth:
            raise ValueError(f"queue_depth must be in [1, {self.queue_depth}], got {depth}")
        job = _Job(source, deadline, depth, timeline)
        self._job = job
        start_ns = time.perf_counter_ns()
        start = time.perf_counter()
        for inbox in self._inboxes[:depth]:
            inbox.put(job)
        job.done.wait()
        seconds = time.perf_counter() - start
        if job.error is not None:
            raise job.error
        latencies = np.concatenate(
            [np.asarray(part, dtype=np.float64) for part in job.latencies]
        ) / 1e3 if job.latencies else np.zeros(0)
        timeline_us = None
        if timeline:
            timeline_us = np.zeros((job.taken, 2), dtype=np.float64)
            for marks in job.marks:
                for index, issued, completed in marks:
                    timeline_us[index] = ((issued - start_ns) / 1e3, (completed - start_ns) / 1e3)
        return IoResult(job.commands, job.bytes, seconds, latencies, timeline_us, start_ns)

    def _work(self, inbox: queue.SimpleQueue[_Job | None], buffer: mmap.mmap) -> None:
        view = memoryview(buffer)
        blocks = np.frombuffer(buffer, dtype=np.uint64)
        words_per_block = ALIGN // 8
        while True:
            job = inbox.get()
            if job is None:
                view.release()
                del blocks
                buffer.close()
                return
            latencies: list[int] = []
            marks: list[tuple[int, int, int]] | None = [] if job.timeline else None
            moved = 0
            error: BaseException | None = None
            try:
                while (taken := job.next()) is not None:
                    index, (write, offset, size) = taken
                    if size > self.max_io_bytes:
                        raise ValueError(f"command of {size} bytes > {self.max_io_bytes}")
                    if write:
                        self._stamp += 1  # a race between threads only repeats a stamp
                        blocks[: size // 8 : words_per_block] = self._stamp << 20 | np.arange(
                            size // ALIGN, dtype=np.uint64
                        )
                    # released however the call ends: the buffer closes only without views
                    with view[:size] as chunk:
                        t0 = time.perf_counter_ns()
                        if write:
                            n = os.pwritev(self.fd, [chunk], offset)
                        else:
                            n = os.preadv(self.fd, [chunk], offset)
                        t1 = time.perf_counter_ns()
                    latencies.append(t1 - t0)
                    if marks is not None:
                        marks.append((index, t0, t1))
                    if n != size:
                        raise OSError(
                            errno.EIO, f"short {'write' if write else 'read'}: {n} of {size} "
                            f"bytes at offset {offset}"
                        )
                    moved += size
            except BaseException as exc:  # reported to run(), which raises it
                error = exc
            job.report(latencies, moved, error, marks)

    def close(self) -> None:
        """Stop the commands not yet taken, then stop and join the worker threads (safe to call
        twice; after an interruption the threads finish the commands they are in)."""
        if self._job is not None:
            with self._job.lock:
                self._job.stopped = True
        for inbox in self._inboxes:
            inbox.put(None)
        for thread in self._threads:
            thread.join()
        self._inboxes, self._threads = [], []

    def __enter__(self) -> Issuer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def random_commands(
    region_bytes: int, io_bytes: int, write: bool, seed: int, chunk: int = 4096
) -> Iterator[Command]:
    """Endless commands of ``io_bytes`` at uniformly random offsets aligned to ``io_bytes``
    (fio's default ``blockalign``) in ``[0, region_bytes)``, with replacement."""
    slots = region_bytes // io_bytes
    if slots < 1:
        raise ValueError(f"a region of {region_bytes} bytes holds no {io_bytes}-byte command")
    rng = np.random.default_rng(seed)
    while True:
        for slot in rng.integers(0, slots, size=chunk).tolist():
            yield (write, slot * io_bytes, io_bytes)


def sequential_commands(
    region_bytes: int, io_bytes: int, write: bool, wrap: bool = True
) -> Iterator[Command]:
    """Commands of ``io_bytes`` at consecutive offsets from 0 through ``region_bytes`` (once,
    or over and over with ``wrap``)."""
    slots = region_bytes // io_bytes
    if slots < 1:
        raise ValueError(f"a region of {region_bytes} bytes holds no {io_bytes}-byte command")
    while True:
        for slot in range(slots):
            yield (write, slot * io_bytes, io_bytes)
        if not wrap:
            return
