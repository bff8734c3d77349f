"""The storage patterns kvsim calibrate measures, and two measurers that run them on a
:class:`~sim.calibrate.storage.DirectFile`: the built-in one (:class:`BuiltinMeasurer`,
io_uring from one thread, or threads issuing ``os.preadv``/``os.pwritev``) and fio
(:class:`FioMeasurer`, the Debian and Termux package ``fio``, whose ``--output-format=json``
report is parsed), run with the engine that issues as the built-in measurer does (its
``io_uring`` engine with ``iodepth`` = the queue depth, or ``psync`` with one thread per
command in flight), so that the two measure the same thing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Protocol

from sim.calibrate.storage import DirectFile, Issuer, random_commands, sequential_commands
from sim.calibrate.uring import UringIssuer
from sim.errors import StorageError

KIB = 1024


@dataclass(frozen=True)
class Pattern:
    """One measured pattern: commands of ``io_bytes``, random or sequential offsets, reads or
    writes, kept ``queue_depth`` deep."""

    io_bytes: int
    queue_depth: int
    random: bool = True
    write: bool = False

    @property
    def kind(self) -> str:
        """fio's name of the pattern: randread, randwrite, read (sequential), write."""
        return ("rand" if self.random else "") + ("write" if self.write else "read")

    @property
    def label(self) -> str:
        return f"{self.kind} {self.io_bytes // KIB} KiB QD {self.queue_depth}"


@dataclass(frozen=True)
class Measurement:
    """What one measurer measured for one pattern (IOPS, MB/s of requested bytes, mean
    latency per command in microseconds)."""

    pattern: Pattern
    measurer: str
    iops: float
    mb_s: float
    mean_latency_us: float
    seconds: float


class Measurer(Protocol):
    name: str

    def measure(self, pattern: Pattern, seconds: float, seed: int) -> Measurement: ...


class BuiltinMeasurer:
    """O_DIRECT commands from page-aligned buffers, through io_uring
    (:class:`sim.calibrate.uring.UringIssuer`) or threads (:class:`Issuer`)."""

    name = "builtin"

    def __init__(self, file: DirectFile, issuer: Issuer | UringIssuer) -> None:
        self.file = file
        self.issuer = issuer

    def measure(self, pattern: Pattern, seconds: float, seed: int) -> Measurement:
        region = self.file.written_bytes
        if pattern.random:
            source = random_commands(region, pattern.io_bytes, pattern.write, seed)
        else:
            source = sequential_commands(region, pattern.io_bytes, pattern.write)
        result = self.issuer.run(
            source, deadline=time.perf_counter() + seconds, queue_depth=pattern.queue_depth
        )
        if not result.commands:
            raise StorageError(f"calibrate: no {pattern.label} command completed")
        return Measurement(
            pattern, self.name, result.iops, result.mb_s, result.mean_latency_us, result.seconds
        )


def fio_available() -> bool:
    """Whether the ``fio`` program is on the PATH."""
    return shutil.which("fio") is not None


class FioMeasurer:
    """fio on the same file, ``--direct=1``, time based, issuing as the built-in measurer does:

    * ``engine="io_uring"`` (the built-in's :class:`~sim.calibrate.uring.UringIssuer`): one job,
      ``--ioengine=io_uring --iodepth=QD``, every pattern one stream of commands kept QD deep;
    * ``engine="psync"`` (the built-in's threads): random patterns with ``--ioengine=psync
      --thread --numjobs=QD`` (QD threads, each issuing one synchronous command at a time);
      sequential ones as one stream kept QD deep, ``--ioengine=libaio --iodepth=QD`` (the
      built-in's threads take consecutive commands from one source), or, where fio has no
      libaio (Termux), QD threads each reading its own stream ``region / QD`` apart.
    """

    name = "fio"

    def __init__(self, file: DirectFile, engine: str = "psync") -> None:
        if not fio_available():
            raise StorageError("calibrate --measurer fio: the fio program is not installed")
        if engine not in ("io_uring", "psync"):
            raise ValueError(f"engine must be io_uring or psync, got {engine!r}")
        self.file = file
        self.engine = engine
        self._engines: dict[str, bool] = {}
        if engine == "io_uring" and not self.has_engine("io_uring"):
            raise StorageError(
                "calibrate: this fio cannot use io_uring here (the built-in measurer does);"
                " use --issuer threads to measure both with threads"
            )
        self.has_libaio()  # now, not in the first measurement's time

    def has_engine(self, engine: str) -> bool:
        """Whether this fio can use ``engine`` on the file (tried once, on one 4 KiB read)."""
        if engine not in self._engines:
            done = subprocess.run(
                ["fio", "--name=probe", f"--filename={self.file.path}", "--direct=1",
                 f"--ioengine={engine}", "--rw=read", "--bs=4096", "--size=4096",
                 "--allow_file_create=0", "--output-format=json"],
                capture_output=True, text=True, timeout=60, check=False,
            )
            self._engines[engine] = done.returncode == 0
        return self._engines[engine]

    def has_libaio(self) -> bool:
        """Whether this fio can use libaio (tried once)."""
        return self.has_engine("libaio")

    def command(self, pattern: Pattern, seconds: float, seed: int) -> list[str]:
        """The fio command line for one pattern."""
        region = self.file.written_bytes
        depth = pattern.queue_depth
        args = [
            "fio", "--name=kvsim", f"--filename={self.file.path}", "--direct=1",
            f"--rw={pattern.kind}", f"--bs={pattern.io_bytes}", "--time_based",
            f"--runtime={max(1, round(seconds * 1000))}ms", "--norandommap",
            f"--randseed={seed}", "--output-format=json", "--allow_file_create=0",
        ]
        one_stream = self.engine == "io_uring" or (not pattern.random and self.has_libaio())
        if self.engine == "io_uring":
            args += ["--ioengine=io_uring", f"--iodepth={depth}"]
        elif pattern.random or not self.has_libaio():
            args += ["--ioengine=psync", "--thread", f"--numjobs={depth}", "--group_reporting"]
        else:
            args += ["--ioengine=libaio", f"--iodepth={depth}"]
        if pattern.random or one_stream:
            args.append(f"--size={region // pattern.io_bytes * pattern.io_bytes}")
        else:
            stream = region // depth // pattern.io_bytes * pattern.io_bytes
            args += [f"--size={stream}", f"--offset_increment={stream}"]
        return args

    def measure(self, pattern: Pattern, seconds: float, seed: int) -> Measurement:
        args = self.command(pattern, seconds, seed)
        try:
            done = subprocess.run(
                args, capture_output=True, text=True, timeout=seconds + 60, check=False
            )
        except subprocess.TimeoutExpired:
            raise StorageError(f"calibrate: fio did not finish {pattern.label}") from None
        report = parse_fio_json(done.stdout, pattern.write)
        if done.returncode or report is None:
            reason = (done.stderr.strip().splitlines() or ["no JSON report"])[-1]
            raise StorageError(f"calibrate: fio failed on {pattern.label}: {reason}")
        iops, bw_bytes, latency_us, runtime_s = report
        return Measurement(pattern, self.name, iops, bw_bytes / 1e6, latency_us, runtime_s)


def parse_fio_json(text: str, write: bool) -> tuple[float, float, float, float] | None:
    """(IOPS, bytes/s, mean completion latency us, runtime s) of the first job (the group, with
    ``--group_reporting``) of a fio JSON report; fio may print notes before the JSON. ``None``
    if the text holds no such report."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
        side = data["jobs"][0]["write" if write else "read"]
        return (
            float(side["iops"]), float(side["bw_bytes"]),
            float(side["lat_ns"]["mean"]) / 1e3, float(side["runtime"]) / 1e3,
        )
    except (ValueError, KeyError, IndexError, TypeError):
        return None
