"""A calibrated device preset as YAML text, every number with a comment naming the measurement
it came from, and its atomic, validated writing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from sim.atomic import atomic_write
from sim.calibrate.cpu import CpuMeasurements, RooflineFit, is_attention
from sim.calibrate.fit import FlashFit
from sim.calibrate.patterns import Measurement
from sim.hardware.device import DeviceParams, load_device

#: bits per weight of the simulated model's weights: a property of the experiment, not of the
#: phone; the built-in presets' (Q4_0, with a Q6_K LM head; see sim/hardware/compute.py)
WEIGHT_BITS = 4.5
LM_HEAD_MIN_BITS = 6.5625
#: the DRAM the KV cache may use: a config knob, as in the built-in presets (256 MiB)
KV_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CalibrationContext:
    """Where and how the measurements were taken (for the preset's header)."""

    name: str
    description: str
    directory: Path
    file_bytes: int
    fill_mb_s: float
    fill_seconds: float
    measurer: str
    seconds: float
    model: str


def _sig(value: float) -> float | int:
    """``value`` to 4 significant digits (an int when it is one)."""
    rounded = float(f"{value:.4g}")
    return int(rounded) if rounded.is_integer() else rounded


def _comment(text: str, indent: int) -> list[str]:
    """``text`` as comment lines of at most ~100 characters."""
    pad = " " * indent + "# "
    lines, line = [], ""
    for word in text.split():
        if line and len(pad) + len(line) + 1 + len(word) > 100:
            lines.append(pad + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(pad + line)
    return lines


def preset_text(
    context: CalibrationContext,
    measurements: Sequence[Measurement],
    flash: FlashFit,
    cpu: CpuMeasurements,
    roofline: RooflineFit,
) -> str:
    """The preset's YAML (see the module docstring)."""
    used = [m for m in measurements if m.measurer == context.measurer]

    def measured(label: str) -> str:
        for m in used:
            if m.pattern.label == label:
                return f"{label}: {m.mb_s:,.1f} MB/s, {m.iops:,.0f} IOPS"
        return f"{label}: not measured"

    read_labels = [r.observation.label for r in flash.residuals if not r.observation.write]
    write_labels = [r.observation.label for r in flash.residuals if r.observation.write]
    fit_note = (
        f"fitted (sim/calibrate/fit.py, rms log error {flash.rms_log_error:.3f} over "
        f"{len(flash.residuals)} measurements)"
    )
    iops_cap = flash.parallel_units / flash.read_command_latency_us * 1e6
    largest = max(m.pattern.io_bytes for m in used)
    copy_mb_s = cpu.copy_mb_s
    stream_mb_s = roofline.bandwidth_mb_s
    peak = max(copy_mb_s, stream_mb_s)
    cold = next(k for k, _ in roofline.predictions if k.name.startswith("matvec") and k.dram_bytes)
    hot = max((k for k, _ in roofline.predictions
               if not k.dram_bytes and not k.name.endswith("(call)")), key=lambda k: k.gflops)
    call = next(k for k, _ in roofline.predictions if k.name.endswith("(call)"))

    out: list[str] = []
    out += _comment(
        f"Calibrated by `kvsim calibrate` ({context.seconds:g} s budget): storage measured "
        f"with {context.measurer} on a {context.file_bytes / 2**30:.2f} GiB file of random "
        f"data under {context.directory} opened with O_DIRECT (written sequentially at "
        f"{context.fill_mb_s:,.0f} MB/s in {context.fill_seconds:.1f} s, 512 KiB commands, "
        "QD 8); CPU and DRAM with float32 numpy, "
        f"{cpu.threads} BLAS thread(s), at the sizes of {context.model}. Units: MB = 1e6 "
        "bytes, time in microseconds. The measurements:",
        0,
    )
    for m in measurements:
        out.append(
            f"#   {m.measurer:>7} {m.pattern.label:<26} {m.iops:>10,.0f} IOPS "
            f"{m.mb_s:>9,.1f} MB/s  mean latency {m.mean_latency_us:>9,.1f} us"
        )
    for k, _ in roofline.predictions:
        out.append(
            f"#   {k.name:<34} {k.time_us:>10,.1f} us  {k.gflops:>7.2f} GFLOP/s"
            + (f"  {k.mb_s:>8,.0f} MB/s" if k.dram_bytes else "")
        )
    out.append(f"#   copy (numpy.copyto, read + write bytes)  {copy_mb_s:,.0f} MB/s")
    out.append(f"name: {yaml.safe_dump(context.name, default_style=None).splitlines()[0]}")
    out.append("description: " + yaml.safe_dump(
        context.description, default_flow_style=True, width=10**6).splitlines()[0])
    out.append("flash:")
    flash_fields: list[tuple[str, float | int | str, str]] = [
        ("read_bandwidth_mb_s", _sig(flash.read_bandwidth_mb_s),
         f"Link bandwidth {fit_note} to the read measurements ({', '.join(read_labels)}); "
         f"measured {measured(f'read {largest // 1024} KiB QD 8')}."),
        ("write_bandwidth_mb_s", _sig(flash.write_bandwidth_mb_s),
         f"Write link bandwidth {fit_note} to {', '.join(write_labels)} with the read fit's "
         f"units and queue; measured {measured(f'write {largest // 1024} KiB QD 8')}."),
        ("queue_depth", flash.queue_depth,
         "Command slots " + fit_note + ": among the measured queue depths, the deepest that "
         "fits as well as the best (throughput still growing at the deepest measured one "
         f"gives that one); {measured(f'randread 4 KiB QD {flash.queue_depth}')}."),
        ("parallel_units", flash.parallel_units,
         f"Units working at once {fit_note}: they cap small reads at parallel_units / "
         f"read_command_latency_us = {iops_cap:,.0f} IOPS"
         + (" (random units approach it only as the queue deepens)"
            if flash.unit_choice == "random" else "")
         + f"; {measured('randread 4 KiB QD 32')}."),
        ("read_command_latency_us", _sig(flash.read_command_latency_us),
         f"Per-command read time {fit_note}; {measured('randread 4 KiB QD 1')} (QD 1: "
         "latency + 4096 / read_bandwidth_mb_s per command)."),
        ("write_command_latency_us", _sig(flash.write_command_latency_us),
         f"Per-command write time {fit_note}; {measured('randwrite 4 KiB QD 1')}."),
        ("page_size_bytes", 4096,
         "The alignment and smallest size of every measured command (O_DIRECT; 4 KiB is "
         "UFS's logical block)."),
        ("max_io_bytes", largest, "The largest command size measured."),
        ("unit_choice", flash.unit_choice, _unit_choice_note(flash)),
        ("unit_seed", 0,
         "Not a measurement: the seed of the random units' draws (sim/hardware/flash.py); a "
         "run is deterministic for it" + ("." if flash.unit_choice == "random"
                                          else ", and unused with earliest_free units.")),
    ]
    for key, value, source in flash_fields:
        out += _comment(source, 2)
        out.append(f"  {key}: {value}")
    out.append("dram:")
    out += _comment(
        f"The best the memory streamed: max(copy bandwidth {copy_mb_s:,.0f} MB/s "
        f"(numpy.copyto of 256 MiB arrays, bytes read + written), the cold matvec block's "
        f"weight stream {stream_mb_s:,.0f} MB/s).", 2)
    out.append(f"  bandwidth_mb_s: {_sig(peak)}")
    out += _comment(
        f"The decode kernels' share of it: the cold matvec block ({cold.name}: "
        f"{cold.dram_bytes / 1e6:,.1f} MB of float32 weights in {cold.time_us:,.1f} us, less "
        f"kernel_overhead_us: {stream_mb_s:,.0f} MB/s) / bandwidth_mb_s.", 2)
    out.append(f"  sustained_fraction: {_sig(min(1.0, stream_mb_s / peak))}")
    out += _comment("Not a measurement: the DRAM the KV cache may use, a config knob that "
                    "experiments override (the built-in presets' 256 MiB).", 2)
    out.append(f"  kv_budget_bytes: {KV_BUDGET_BYTES}")
    out.append("compute:")
    out += _comment(
        f"The cache-resident matvec ({hot.name}: {hot.flops:,.0f} FLOP in "
        f"{hot.time_us:.2f} us, less kernel_overhead_us), float32 numpy: the compute side of "
        "the roofline.", 2)
    out.append(f"  cpu_gflops: {_sig(roofline.cpu_gflops)}")
    out += _comment(
        "Not a measurement: the simulated model's weight precision, a property of the "
        "experiment (the built-in presets' Q4_0, 18 bytes per 32 weights; "
        "sim/hardware/compute.py).", 2)
    out.append(f"  weight_bits: {WEIGHT_BITS}")
    out += _comment(
        "Not a measurement: llama.cpp keeps the LM head at Q6_K (210 bytes per 256 weights) "
        "for a Q4_0 model, as in the built-in presets.", 2)
    out.append(f"  lm_head_min_bits: {LM_HEAD_MIN_BITS}")
    out += _comment(
        f"The time of a call doing next to no work ({call.name}: {call.flops:.0f} FLOP in "
        f"{call.time_us:.2f} us): numpy's cost per kernel.", 2)
    out.append(f"  kernel_overhead_us: {_sig(roofline.kernel_overhead_us)}")
    attention = [k for k, _ in roofline.predictions if is_attention(k)]
    if roofline.attention_gflops is not None:
        out += _comment(
            "The attention kernels' rate (one KV head: N keys against its query heads, "
            "softmax, against N values, from DRAM: "
            + ", ".join(f"N={k.name.split('=')[-1]} {k.time_us:,.1f} us" for k in attention)
            + "): least squares on their relative error with the roofline's bandwidth and "
            "kernel_overhead_us (sim/calibrate/cpu.py). Scoring stays at cpu_gflops; the "
            "scoring kernels in the header are its check.", 2)
        out.append(f"  attention_gflops: {_sig(roofline.attention_gflops)}")
    return "\n".join(out) + "\n"


def _unit_choice_note(flash: FlashFit) -> str:
    """The source comment of ``unit_choice``: both choices' fits, and which was kept."""
    others = "; ".join(
        f"{other.unit_choice} ({other.parallel_units} units, queue depth "
        f"{other.queue_depth}): rms log error {other.rms_log_error:.3f}"
        for other in flash.others
    )
    return (
        "How a command gets its unit (sim/hardware/flash.py): each choice fitted to the "
        f"measurements (sim/calibrate/fit.py), the better kept: {flash.unit_choice}: rms log "
        f"error {flash.rms_log_error:.3f}" + (f"; against {others}." if others else ".")
    )


def write_preset(path: Path, text: str) -> DeviceParams:
    """Write ``text`` to ``path`` atomically, after checking that it loads as a device preset
    (a preset that ``kvsim run`` would refuse is never written)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
        return load_device(tmp)  # a ConfigError here leaves nothing written
