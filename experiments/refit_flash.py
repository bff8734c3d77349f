"""Re-fit the flash model to storage measurements already made, without measuring again.

    python experiments/refit_flash.py [PRESET.yaml] [--check]

Reads the measurement lines that head a preset written by ``kvsim calibrate`` (``#   builtin
randread 4 KiB QD 1   17,435 IOPS   71.4 MB/s  mean latency   54.7 us``; the measurer the
header names, ``storage measured with ...``) and fits both unit choices of the flash model
(:func:`sim.calibrate.fit.fit_flash`): each fit's parameters, its residual per measurement and
its rms log error, the better one first. Without a preset, the measurements of this
repository's development machine (``results/calibration/this-machine.yaml``, calibrated on
2026-12-07 22:32 UTC, copied below) are used. ``--check`` adds the 4 KiB queue-depth sweep's
mean latencies against each fit's SimPy model at the commands the device held on average.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.calibrate.fit import FlashFit, Observation, fit_flash, steady_mb_s  # noqa: E402
from sim.hardware.flash import FlashParams  # noqa: E402

#: the storage lines of results/calibration/this-machine.yaml's header (kvsim calibrate,
#: built-in measurer through io_uring, 8 GiB file on ext4 on /dev/vda, 180 s budget)
THIS_MACHINE = """\
# Calibrated by `kvsim calibrate` (180 s budget): storage measured with builtin on a 8.00 GiB file
#   builtin randread 4 KiB QD 1            17,435 IOPS      71.4 MB/s  mean latency      54.7 us
#   builtin randread 4 KiB QD 2            27,582 IOPS     113.0 MB/s  mean latency      59.3 us
#   builtin randread 4 KiB QD 4            41,954 IOPS     171.8 MB/s  mean latency      71.3 us
#   builtin randread 4 KiB QD 8            53,860 IOPS     220.6 MB/s  mean latency     109.2 us
#   builtin randread 4 KiB QD 16           61,305 IOPS     251.1 MB/s  mean latency     181.4 us
#   builtin randread 4 KiB QD 32           75,244 IOPS     308.2 MB/s  mean latency     297.7 us
#   builtin randread 8 KiB QD 32           63,109 IOPS     517.0 MB/s  mean latency     373.3 us
#   builtin randread 16 KiB QD 32          47,003 IOPS     770.1 MB/s  mean latency     534.4 us
#   builtin randread 32 KiB QD 32          31,536 IOPS   1,033.4 MB/s  mean latency     878.8 us
#   builtin randread 64 KiB QD 32          18,265 IOPS   1,197.0 MB/s  mean latency   1,658.6 us
#   builtin randread 128 KiB QD 32          9,820 IOPS   1,287.1 MB/s  mean latency   3,202.9 us
#   builtin randread 256 KiB QD 32          4,372 IOPS   1,146.1 MB/s  mean latency   7,288.4 us
#   builtin randread 512 KiB QD 32          2,086 IOPS   1,093.9 MB/s  mean latency  15,317.9 us
#   builtin read 512 KiB QD 8               2,356 IOPS   1,235.2 MB/s  mean latency   3,389.5 us
#   builtin write 512 KiB QD 8              5,353 IOPS   2,806.6 MB/s  mean latency   1,482.0 us
#   builtin randwrite 4 KiB QD 1           14,982 IOPS      61.4 MB/s  mean latency      60.7 us
"""

_LINE = re.compile(
    r"^#\s+(?P<measurer>\w+)\s+(?P<kind>randread|read|randwrite|write)\s+(?P<kib>\d+) KiB "
    r"QD (?P<qd>\d+)\s+(?P<iops>[\d,.]+) IOPS\s+(?P<mb_s>[\d,.]+) MB/s\s+mean latency\s+"
    r"(?P<lat>[\d,.]+) us$"
)


def read_measurements(text: str) -> list[tuple[Observation, float]]:
    """The storage measurements of a preset header: (observation, mean latency us) of the
    measurer the header names (``storage measured with X``), else of the first one listed."""
    named = re.search(r"storage measured with (\w+)", text)
    rows = [m for line in text.splitlines() if (m := _LINE.match(line.strip()))]
    if not rows:
        raise SystemExit("refit_flash: no storage measurement lines in the preset's header")
    measurer = named.group(1) if named else rows[0]["measurer"]
    out = []
    for m in rows:
        if m["measurer"] != measurer:
            continue
        label = f"{m['kind']} {m['kib']} KiB QD {m['qd']}"
        out.append((Observation("write" in m["kind"], int(m["kib"]) * 1024, int(m["qd"]),
                                float(m["mb_s"].replace(",", "")), label),
                    float(m["lat"].replace(",", ""))))
    return out


def _device(fit: FlashFit) -> FlashParams:
    return FlashParams(
        read_bandwidth_mb_s=fit.read_bandwidth_mb_s,
        write_bandwidth_mb_s=fit.write_bandwidth_mb_s, queue_depth=fit.queue_depth,
        parallel_units=fit.parallel_units, read_command_latency_us=fit.read_command_latency_us,
        write_command_latency_us=fit.write_command_latency_us, page_size_bytes=4096,
        max_io_bytes=512 * 1024, unit_choice=fit.unit_choice,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", type=Path)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = args.preset.read_text() if args.preset else THIS_MACHINE
    rows = read_measurements(text)
    started = time.perf_counter()
    best = fit_flash([o for o, _ in rows])
    print(f"fitted in {time.perf_counter() - started:.1f} s ({len(rows)} measurements)")
    for rank, fit in enumerate((best, *best.others)):
        print(f"\n{'kept' if rank == 0 else 'other'}: {fit.summary()}")
        for line in fit.residual_lines():
            print("  " + line)
        if args.check:
            _latency_check(fit, rows)


def _latency_check(fit: FlashFit, rows: list[tuple[Observation, float]]) -> None:
    """The 4 KiB sweep's mean latencies against the model's with as many commands inside the
    device as the measurement had on average (Little's law: IOPS x mean latency, below the
    nominal queue depth when the host takes time between a completion and the next
    submission); the model's latency at a fractional count is interpolated between its
    integer neighbours (queue depth / IOPS of the SimPy model, 20,000 commands)."""
    device = _device(fit)

    def model_latency(n: int) -> float:
        if n < 1:
            return fit.read_command_latency_us + 4096 / fit.read_bandwidth_mb_s
        return n * 4096 / steady_mb_s(device, 4096, n, n_commands=20_000)

    print("  4 KiB random reads: measured mean latency against the model's at the same "
          "commands in flight")
    for o, latency in rows:
        if o.write or o.io_bytes != 4096:
            continue
        in_flight = o.mb_s / 4096 * latency  # commands per us x us
        low = int(in_flight)
        share = in_flight - low
        model = (1 - share) * model_latency(low) + share * model_latency(low + 1)
        print(f"    QD {o.queue_depth:2d}: {in_flight:5.2f} in flight, measured {latency:7.1f} "
              f"us, model {model:7.1f} us ({100 * (model / latency - 1):+.1f}%)")

if __name__ == "__main__":
    main()
