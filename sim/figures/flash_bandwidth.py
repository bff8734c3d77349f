"""DynaKV Fig. 3b: read bandwidth of the simulated UFS device against contiguous I/O size.

For every distinct device of the experiment's runs (each run's resolved device from its
run.yaml, so sweep overrides such as ``device.flash.queue_depth`` count), the SimPy flash model
is driven at full queue depth with reads of one size (:func:`sim.hardware.flash.
read_bandwidth_curve`, as ``benchmarks/bench_flash.py`` does) and the delivered MB/s is
plotted against the size on a log axis. Dashed lines give the two analytic ceilings of the
model: the IOPS bound ``parallel_units / read latency x size`` (small I/O; lower if the queue
depth, not the units, limits the command rate) and the link bound ``read_bandwidth_mb_s``
(large I/O); the dotted vertical line is their crossing, the knee ``read_bandwidth_mb_s x
latency / parallel_units`` (about 24 KB on UFS 4.0).

Files: ``fig3b_read_bandwidth.{pdf,png}`` and the curve as ``fig3b_read_bandwidth.{csv,md}``
(device, io_kib, io_bytes, read_mb_s, iops, iops_bound_mb_s, link_mb_s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.figures._runs import unique_runs
from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.style import COLUMN_IN, MARKERS, OKABE_ITO, apply_style, plt, save_figure
from sim.hardware import DeviceParams
from sim.hardware.flash import FlashParams, read_bandwidth_curve

KIB = 1024
DEFAULT_SIZES_KIB = [4, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512]


def experiment_devices(results: Results) -> list[tuple[str, DeviceParams]]:
    """(label, device) of every distinct resolved device of the runs, in summary order.

    A device that differs from the preset of its name (swept overrides) is labelled with the
    numbers that differ (``ufs40-flagship (queue_depth=8)``); a device whose name is no preset
    is compared with the first device of that name.
    """
    from sim.hardware import load_device

    seen: dict[str, DeviceParams] = {}
    for run_id in unique_runs(results.summary)["run_id"]:
        data = results.settings(run_id).get("device")
        if not isinstance(data, dict):
            raise KvsimError(f"fig3b_read_bandwidth: run {run_id} has no device in its run.yaml")
        key = json.dumps(data, sort_keys=True)
        if key not in seen:
            seen[key] = DeviceParams.model_validate(data)
    first_of: dict[str, DeviceParams] = {}
    out = []
    for device in seen.values():
        if device.name not in first_of:
            try:
                first_of[device.name] = load_device(device.name)
            except KvsimError:
                first_of[device.name] = device
        base = first_of[device.name]
        label = device.name
        if base != device:
            diffs = [
                f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                for section in ("flash", "dram", "compute")
                for k, v in getattr(device, section).model_dump().items()
                if getattr(base, section).model_dump()[k] != v
            ]
            label = f"{device.name} ({', '.join(diffs) or 'variant'})"
        out.append((label, device))
    return out


def iops_bound_mb_s(flash: FlashParams, size_bytes: np.ndarray | float) -> np.ndarray:
    """The model's command-rate ceiling times the size (MB/s), ignoring the link: commands/us
    = min(parallel_units / latency, queue_depth / (latency + size / bandwidth))."""
    size = np.asarray(size_bytes, dtype=np.float64)
    latency, bw = flash.read_command_latency_us, flash.read_bandwidth_mb_s
    rate = np.minimum(flash.parallel_units / latency, flash.queue_depth / (latency + size / bw))
    return rate * size


def knee_bytes(flash: FlashParams) -> float:
    """Size where the IOPS bound meets the link bound (inf if the queue never fills the link:
    queue depth 1). Units bound: ``bw x latency / units``; queue bound: ``bw x latency /
    (queue_depth - 1)``."""
    bw_lat = flash.read_bandwidth_mb_s * flash.read_command_latency_us
    by_queue = bw_lat / (flash.queue_depth - 1) if flash.queue_depth > 1 else float("inf")
    return max(bw_lat / flash.parallel_units, by_queue)


def bandwidth_table(
    devices: list[tuple[str, DeviceParams]], sizes_kib: list[float], n_commands: int
) -> pd.DataFrame:
    """The curve of each device: simulated MB/s per I/O size plus the two analytic ceilings."""
    rows = []
    for label, device in devices:
        flash: FlashParams = device.flash
        sizes = [int(round(s * KIB)) for s in sizes_kib if s * KIB <= flash.max_io_bytes]
        mb_s = read_bandwidth_curve(flash, sizes, n_commands=n_commands)
        for size, bw in zip(sizes, mb_s, strict=True):
            rows.append({
                "device": label,
                "io_kib": size / KIB,
                "io_bytes": size,
                "read_mb_s": bw,
                "iops": bw * 1e6 / size,
                "iops_bound_mb_s": float(iops_bound_mb_s(flash, size)),
                "link_mb_s": flash.read_bandwidth_mb_s,
                "knee_kib": knee_bytes(flash) / KIB,
            })
    return pd.DataFrame(rows)


@FIGURES.register("fig3b_read_bandwidth")
@dataclass
class ReadBandwidth(Figure):
    """Fig. 3b: simulated read bandwidth (MB/s) vs contiguous I/O size (KiB), per device.

    Options: ``sizes_kib`` (I/O sizes, KiB; those above a device's ``max_io_bytes`` are
    skipped; at most 64), ``n_commands`` (reads per size, submitted at once; the start-up
    transient costs about one command latency of the total; at most 10**6: the figure
    simulates every command, about 0.25 s per 100,000, and holds their sizes in memory).
    """

    sizes_kib: list[float] = field(default_factory=lambda: list(DEFAULT_SIZES_KIB))
    n_commands: int = 2000

    def __post_init__(self) -> None:
        if not self.sizes_kib or any(float(s) <= 0 for s in self.sizes_kib):
            raise ValueError(f"sizes_kib must be a non-empty list of sizes > 0, got "
                             f"{self.sizes_kib!r}")
        if len(self.sizes_kib) > 64:
            raise ValueError(f"sizes_kib: at most 64 sizes, got {len(self.sizes_kib)}")
        if not 1 <= int(self.n_commands) <= 10**6:
            raise ValueError(f"n_commands must be in [1, 10**6], got {self.n_commands}")

    def draw(self, results: Results) -> list[Path]:
        devices = experiment_devices(results)
        table = bandwidth_table(devices, sorted(float(s) for s in self.sizes_kib),
                                int(self.n_commands))
        stem = results.out_dir / "fig3b_read_bandwidth"
        written = atomic_write_table(table, stem)
        apply_style()
        fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.4))
        top = 0.0
        for i, (label, device) in enumerate(devices):
            rows = table[table["device"] == label]
            colour, marker = OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]
            flash = device.flash
            ax.plot(rows["io_kib"], rows["read_mb_s"], marker=marker, ms=3.5, lw=1.2,
                    color=colour, label=label, zorder=3)
            grid = np.geomspace(rows["io_kib"].min(), rows["io_kib"].max(), 200)
            ceiling = np.minimum(iops_bound_mb_s(flash, grid * KIB), flash.read_bandwidth_mb_s)
            ax.plot(grid, ceiling, ls="--", lw=0.7, color=colour, alpha=0.8, zorder=2)
            knee = knee_bytes(flash)
            if np.isfinite(knee):
                ax.axvline(knee / KIB, ls=":", lw=0.7, color=colour)
                ax.annotate(f"knee {knee / 1e3:.0f} KB", (knee / KIB, 0.02),
                            xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                            color=colour, ha="right", va="bottom")
            top = max(top, flash.read_bandwidth_mb_s)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(table["io_kib"])))
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.tick_params(axis="x", labelsize=6)
        ax.set_ylim(0, top * 1.12)
        ax.set_xlabel("contiguous read size (KiB, log scale)")
        ax.set_ylabel("read bandwidth (MB/s)")
        ax.text(0.03, 0.97, "IOPS-bound", transform=ax.transAxes, fontsize=6.5, va="top")
        ax.text(0.97, 0.97, "bandwidth-bound", transform=ax.transAxes, fontsize=6.5,
                va="top", ha="right")
        ax.grid(alpha=0.3, lw=0.5)
        ax.plot([], [], ls="--", lw=0.7, color="0.3", label="model ceilings")
        ax.legend(frameon=False, loc="lower right", fontsize=6)
        fig.tight_layout()
        return written + save_figure(fig, stem)
