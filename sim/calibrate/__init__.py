"""``kvsim calibrate``: measure the storage under a directory and the CPU this runs on, fit the
device model to the measurements and write a device preset whose every number names the
measurement it came from.

The time budget (``seconds``) is shared out before anything runs: up to 20% writes the
measurement file (the sequential-write figure of the fill), 15% times the CPU kernels, and the
rest is split evenly over the storage patterns (:data:`PATTERNS`), so the whole takes about
``seconds`` whatever the device (the fill stops at its share: a slow device measures a smaller
file, which the preset's header says). Modules: :mod:`~sim.calibrate.storage` (the O_DIRECT
file and the threads that issue commands on it), :mod:`~sim.calibrate.uring` (issuing them
through io_uring from one thread instead), :mod:`~sim.calibrate.patterns` (the patterns
and the built-in and fio measurers), :mod:`~sim.calibrate.fit` (the flash model's parameters),
:mod:`~sim.calibrate.cpu` (numpy kernels and the roofline), :mod:`~sim.calibrate.preset` (the
YAML).
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from sim.atomic import unwritable
from sim.calibrate.cpu import CpuMeasurements, RooflineFit, fit_roofline, measure_cpu
from sim.calibrate.fit import FlashFit, Observation, fit_flash
from sim.calibrate.patterns import (
    KIB,
    BuiltinMeasurer,
    FioMeasurer,
    Measurement,
    Measurer,
    Pattern,
    fio_available,
)
from sim.calibrate.preset import CalibrationContext, preset_text, write_preset
from sim.calibrate.storage import (
    DirectFile,
    Issuer,
    check_directory,
    mount_of,
    sequential_commands,
)
from sim.calibrate.uring import UringIssuer, choose_issuer
from sim.errors import ConfigError, StorageError
from sim.hardware.device import DeviceParams
from sim.progress import progress

#: queue depths of the 4 KiB random-read sweep
QUEUE_DEPTHS = (1, 2, 4, 8, 16, 32)
#: I/O sizes (KiB) of the bandwidth curve (DynaKV Fig. 3b), at the deepest queue
IO_SIZES_KIB = (4, 8, 16, 32, 64, 128, 256, 512)
#: the sequential patterns' command size and queue depth
SEQUENTIAL_KIB, SEQUENTIAL_QD = 512, 8
PATTERNS: tuple[Pattern, ...] = (
    *(Pattern(4 * KIB, qd) for qd in QUEUE_DEPTHS),
    *(Pattern(kib * KIB, QUEUE_DEPTHS[-1]) for kib in IO_SIZES_KIB[1:]),
    Pattern(SEQUENTIAL_KIB * KIB, SEQUENTIAL_QD, random=False),
    Pattern(SEQUENTIAL_KIB * KIB, SEQUENTIAL_QD, random=False, write=True),
    Pattern(4 * KIB, 1, write=True),
)
MAX_IO_BYTES = max(p.io_bytes for p in PATTERNS)
MAX_QUEUE_DEPTH = max(p.queue_depth for p in PATTERNS)

DEFAULT_SECONDS = 180.0
MIN_SECONDS = 5.0
MAX_SECONDS = 86400.0  # a day
DEFAULT_SIZE_BYTES = 8 * 2**30
#: smallest measurement file: a few of the largest commands per thread
MIN_SIZE_BYTES = 16 * 2**20
FILL_SHARE, CPU_SHARE = 0.20, 0.15
MEASURERS = ("auto", "builtin", "fio", "both")


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured, fitted and wrote."""

    measurements: tuple[Measurement, ...]
    flash: FlashFit
    cpu: CpuMeasurements
    roofline: RooflineFit
    device: DeviceParams
    out: Path
    report: str


def check_arguments(
    directory: Path, out: Path, seconds: float, size_bytes: int, measurer: str
) -> None:
    """Every problem found before anything is created, as one-line errors."""
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ConfigError(
            f"calibrate --seconds: must be in [{MIN_SECONDS:g}, {MAX_SECONDS:g}], got {seconds:g}"
        )
    if size_bytes < MIN_SIZE_BYTES:
        raise ConfigError(
            f"calibrate --size: must be at least {MIN_SIZE_BYTES // 2**20} MiB, got "
            f"{size_bytes} bytes"
        )
    if measurer not in MEASURERS:
        raise ConfigError(f"calibrate --measurer: one of {', '.join(MEASURERS)}, got {measurer!r}")
    if measurer in ("fio", "both") and not fio_available():
        raise StorageError(f"calibrate --measurer {measurer}: the fio program is not installed")
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"calibrate --out: the preset's name must end in .yaml, got {out}")
    if out.is_dir():
        raise ConfigError(f"calibrate --out: {out} is a directory")
    problem = unwritable(out.parent, margin=len(f"..tmp-{os.getpid()}.yaml"))
    if problem:
        raise ConfigError(f"calibrate --out: {problem}")
    check_directory(directory, size_bytes)


def _describe_storage(directory: Path) -> str:
    """``ext4 on /dev/vda`` for the mount holding ``directory``."""
    _, fs_type, device = mount_of(directory)
    return f"{fs_type} on {device}"


def calibrate(
    directory: Path,
    out: Path,
    seconds: float = DEFAULT_SECONDS,
    size_bytes: int = DEFAULT_SIZE_BYTES,
    measurer: str = "auto",
    model: str = "llama-3.2-1b",
    show_progress: bool = True,
    stream: IO[str] | None = None,
    issuer: str = "auto",
) -> Calibration:
    """Measure, fit, write the preset to ``out`` (see the module docstring). ``issuer``: how
    the built-in measurer issues its commands, ``threads``, ``io_uring`` or ``auto`` (io_uring
    where it works, as ``kvsim replay`` does: calibrate and replay alike)."""
    from sim.config import load_model_geometry

    started = time.perf_counter()
    check_arguments(directory, out, seconds, size_bytes, measurer)
    make_issuer = UringIssuer if choose_issuer(issuer, "calibrate") == "io_uring" else Issuer
    size_bytes = size_bytes // MAX_IO_BYTES * MAX_IO_BYTES  # whole largest commands
    geometry = load_model_geometry(model, "calibrate --model")
    if measurer == "auto":
        measurer = "fio" if fio_available() else "builtin"
    bar = progress(seconds, desc="calibrate", unit="s", enabled=show_progress, stream=stream)
    shown = [0]  # whole seconds the bar shows

    def tick(label: str) -> None:
        """Advance the bar to the whole seconds elapsed (never past the budget)."""
        elapsed = int(min(time.perf_counter() - started, seconds))
        if elapsed > shown[0]:
            bar.update(elapsed - shown[0])
            shown[0] = elapsed
        bar.set_postfix_str(label)

    try:
        with DirectFile(directory, size_bytes) as file, make_issuer(
            file.fd, MAX_QUEUE_DEPTH, MAX_IO_BYTES
        ) as io:
            tick("writing the measurement file")
            fill_deadline = started + FILL_SHARE * seconds
            fill = io.run(
                sequential_commands(size_bytes, MAX_IO_BYTES, write=True, wrap=False),
                deadline=fill_deadline, queue_depth=SEQUENTIAL_QD,
            )
            file.written_bytes = fill.bytes
            if file.written_bytes < MIN_SIZE_BYTES:
                raise StorageError(
                    f"calibrate: only {fill.bytes / 2**20:.0f} MiB of the measurement file was "
                    f"written in {fill.seconds:.1f} s; give more --seconds"
                )
            tick("storage patterns")
            measurers: list[Measurer] = []
            if measurer in ("fio", "both"):
                measurers.append(FioMeasurer(
                    file, "io_uring" if isinstance(io, UringIssuer) else "psync"))
            if measurer in ("builtin", "both"):
                measurers.insert(0, BuiltinMeasurer(file, io))
            measurements = _measure_storage(
                measurers, started + (1 - CPU_SHARE) * seconds, tick
            )
        tick("CPU and DRAM")
        cpu_seconds = max(1.0, started + seconds - time.perf_counter())
        cpu = measure_cpu(geometry, cpu_seconds)
        roofline = fit_roofline(cpu.kernels)
        tick("fitting")
        primary = "fio" if measurer in ("fio", "both") else "builtin"
        flash = fit_flash([
            Observation(m.pattern.write, m.pattern.io_bytes, m.pattern.queue_depth, m.mb_s,
                        m.pattern.label)
            for m in measurements if m.measurer == primary
        ])
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        context = CalibrationContext(
            name=out.stem,
            description=(
                f"Calibrated by kvsim calibrate on {socket.gethostname()} "
                f"({platform.machine()}, {os.cpu_count()} CPUs) at {now}: storage under "
                f"{directory.resolve()} ({_describe_storage(directory)}); the built-in "
                f"measurer's commands issued "
                + ("through io_uring." if isinstance(io, UringIssuer) else "by threads.")
            ),
            directory=directory.resolve(), file_bytes=file.written_bytes,
            fill_mb_s=fill.mb_s, fill_seconds=fill.seconds, measurer=primary,
            seconds=seconds, model=geometry.name,
        )
        text = preset_text(context, measurements, flash, cpu, roofline)
        device = write_preset(out, text)
        tick("done")
    finally:
        bar.close()
    report = _report(context, measurements, flash, cpu, roofline, out,
                     time.perf_counter() - started)
    return Calibration(tuple(measurements), flash, cpu, roofline, device, out, report)


def _measure_storage(
    measurers: list[Measurer], deadline: float, tick: Callable[[str], None]
) -> list[Measurement]:
    """Every pattern with every measurer, by ``deadline`` (``time.perf_counter``). With two
    measurers each pattern is measured in alternating slices (A B B A, twice with a longer
    budget), so that a device whose speed drifts (a shared or throttled disk, a write cache
    filling) affects both alike; a measurer's figure is the sum of its slices. Each run gets
    an even share of the time left, less what runs have cost beyond their measuring time so far
    (fio's start, say)."""
    budget_s = deadline - time.perf_counter()
    slices = 1 if len(measurers) == 1 else (2 if budget_s / len(PATTERNS) < 4 else 4)
    runs_left = len(PATTERNS) * slices * len(measurers)
    overhead = {m.name: 0.0 for m in measurers}
    out: list[Measurement] = []
    for index, pattern in enumerate(PATTERNS):
        tick(pattern.label)
        parts: dict[str, list[Measurement]] = {m.name: [] for m in measurers}
        for part in range(slices):
            # A B, then B A: a drift (writes filling a cache, say) favours neither
            for measurer in measurers if part % 2 == 0 else measurers[::-1]:
                share = (deadline - time.perf_counter()) / runs_left
                seconds = max(0.05, share - overhead[measurer.name])
                t0 = time.perf_counter()
                parts[measurer.name].append(
                    measurer.measure(pattern, seconds, seed=1000 * index + part + 1)
                )
                spent = time.perf_counter() - t0 - seconds
                overhead[measurer.name] = max(overhead[measurer.name], spent)
                runs_left -= 1
        for name, taken in parts.items():
            total_s = sum(m.seconds for m in taken)
            commands = sum(m.iops * m.seconds for m in taken)
            out.append(Measurement(
                pattern, name, commands / total_s, commands * pattern.io_bytes / total_s / 1e6,
                sum(m.mean_latency_us * m.iops * m.seconds for m in taken) / commands,
                total_s,
            ))
    return out


def _report(
    context: CalibrationContext, measurements: list[Measurement], flash: FlashFit,
    cpu: CpuMeasurements, roofline: RooflineFit, out: Path, elapsed: float,
) -> str:
    """What the command prints: the measurements, the fits' residuals, the preset's path."""
    lines = [
        f"storage: {context.directory} ({_describe_storage(context.directory)}), "
        f"{context.file_bytes / 2**30:.2f} GiB written at {context.fill_mb_s:,.0f} MB/s",
    ]
    names = sorted({m.measurer for m in measurements}, key=lambda n: n != "builtin")
    header = f"{'pattern':<26}" + "".join(
        f"{name + ' IOPS':>14}{name + ' MB/s':>13}{'lat us':>9}" for name in names
    )
    if len(names) == 2:
        header += f"{names[1] + '/' + names[0]:>14}"
    lines.append(header)
    for pattern in PATTERNS:
        row = [m for name in names for m in measurements
               if m.pattern == pattern and m.measurer == name]
        text = f"{pattern.label:<26}" + "".join(
            f"{m.iops:>14,.0f}{m.mb_s:>13,.1f}{m.mean_latency_us:>9,.0f}" for m in row
        )
        if len(row) == 2:
            text += f"{100 * (row[1].mb_s / row[0].mb_s - 1):>+13.1f}%"
        lines.append(text)
    for fit in (flash, *flash.others):
        kept = "kept" if fit is flash else "not kept"
        lines.append(f"flash fit ({context.measurer}, {kept}): {fit.summary()}; residuals:")
        lines += ["  " + line for line in fit.residual_lines()]
    lines.append(
        f"compute ({cpu.threads} BLAS thread(s), {context.model} sizes): "
        f"{roofline.cpu_gflops:.2f} GFLOP/s, weight stream {roofline.bandwidth_mb_s:,.0f} MB/s,"
        f" copy {cpu.copy_mb_s:,.0f} MB/s, overhead {roofline.kernel_overhead_us:.1f} us/kernel"
        + ("" if roofline.attention_gflops is None
           else f", attention {roofline.attention_gflops:.2f} GFLOP/s") + ":"
    )
    lines += ["  " + line for line in roofline.residual_lines()]
    lines.append(f"preset: {out} ({elapsed:.0f} s); use it as `device: {out}`")
    return "\n".join(lines)
