"""Flash model speed (simulated commands per CPU second) and per-preset bandwidth curves.

Run: ``python benchmarks/bench_flash.py`` (plain prints; no pytest needed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import simpy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.hardware import Flash, ResourceFlash, load_device, preset_names  # noqa: E402
from sim.hardware.flash import EventFlash, read_bandwidth_curve  # noqa: E402

KIB = 1024


def one_big_batch(cls: type, params, size_bytes: int, n_commands: int) -> tuple[float, float]:
    """(commands per CPU second, simulated MB/s) for one batch of identical reads."""
    env = simpy.Environment()
    flash = cls(env, params)
    start = time.process_time()
    flash.read(np.full(n_commands, size_bytes, dtype=np.int64))
    env.run()
    cpu_s = time.process_time() - start
    return n_commands / cpu_s, n_commands * size_bytes / env.now


def many_small_batches(
    cls: type, params, batch_size: int, n_batches: int, size_bytes: int
) -> float:
    """Commands per CPU second when a process submits batches one after another (engine-like)."""
    env = simpy.Environment()
    flash = cls(env, params)
    sizes = np.full(batch_size, size_bytes, dtype=np.int64)

    def decode():
        for _ in range(n_batches):
            yield flash.read(sizes)

    env.process(decode())
    start = time.process_time()
    env.run()
    return batch_size * n_batches / (time.process_time() - start)


def main() -> None:
    params = load_device("ufs40-flagship").flash
    print("Simulator speed (ufs40-flagship), simulated commands per CPU second")
    for cls, n in ((Flash, 300_000), (EventFlash, 300_000), (ResourceFlash, 30_000)):
        for size in (4 * KIB, 128 * KIB):
            rate, mb_s = one_big_batch(cls, params, size, n)
            print(
                f"  {cls.__name__:13s} {size // KIB:4d} KiB x {n:7d}: "
                f"{rate:10,.0f} cmd/s  (simulated {mb_s:7.1f} MB/s)"
            )
    for cls in (Flash, EventFlash):
        rate = many_small_batches(cls, params, batch_size=24, n_batches=10_000,
                                  size_bytes=16 * KIB)
        print(f"  {cls.__name__:13s} 10,000 batches of 24 x 16 KiB: {rate:10,.0f} cmd/s")

    sizes = [4 * KIB * 2**i for i in range(8)]  # 4 KiB .. 512 KiB
    for name in preset_names():
        flash = load_device(name).flash
        print(
            f"\n{name}: read IOPS limit {flash.read_iops_limit:,.0f}/s, "
            f"knee {flash.read_knee_bytes:,.0f} B, link {flash.read_bandwidth_mb_s:,.0f} MB/s"
        )
        print(f"  {'I/O size':>10s} {'MB/s':>8s} {'IOPS':>10s}")
        for size, mb_s in zip(sizes, read_bandwidth_curve(flash, sizes), strict=True):
            print(f"  {size // KIB:7d} KiB {mb_s:8.1f} {mb_s * 1e6 / size:10,.0f}")


if __name__ == "__main__":
    main()
