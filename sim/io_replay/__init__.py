"""``kvsim replay RUN_DIR --path DIR``: a finished run's recorded flash schedule executed on
real storage, and the measured I/O time set against the simulated one.

Not to be confused with :mod:`sim.replay`, the *SimPy* replay that simulates a policy pass on a
modelled phone in simulated time. This package takes what that simulation submitted to its
flash model on sampled decode steps (recorded with ``record_io:``, :mod:`sim.replay.io_record`),
issues the same commands (sizes, byte addresses, queue depth, order, the reads of a layer in
flight together) on an O_DIRECT file, times them with the wall clock, and reports measured
against simulated I/O time per step, per layer and in total with the per-step correlation.

Modules: :mod:`~sim.io_replay.schedule` (the recorded files, read and checked),
:mod:`~sim.io_replay.execute` (the file, the fill, the phases on
:class:`sim.calibrate.storage.Issuer`), :mod:`~sim.io_replay.compare` (the tables). The figure
of measured against simulated per-step time is :mod:`sim.figures.io_replay`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sim.atomic import atomic_write_text, unwritable
from sim.errors import OutputError
from sim.io_replay.compare import Comparison, compare
from sim.io_replay.execute import Execution, execute
from sim.io_replay.schedule import Schedule, ScheduleError, load_schedule
from sim.result_files import IO_REPLAY, IO_REPLAY_STEPS, RUNS_DIR, SUMMARY_CSV

__all__ = ["Replayed", "ScheduleError", "load_schedule", "replay_run"]


@dataclass(frozen=True)
class Replayed:
    """What :func:`replay_run` measured and wrote."""

    schedule: Schedule
    execution: Execution
    comparison: Comparison
    written: list[Path]
    report: str


def replay_run(
    run_dir: Path, directory: Path, out: Path | None = None,
    on_step: Callable[[], None] | None = None, schedule: Schedule | None = None,
    issuer: str = "auto",
) -> Replayed:
    """Replay ``run_dir``'s schedule (``schedule``, if the caller has loaded it) on a file
    under ``directory``; write the tables, the summary and the figure into ``out`` (default:
    the run directory). ``issuer``: ``threads``, ``io_uring`` or ``auto`` (io_uring where it
    works). Nothing is written before the measurement has succeeded; the measurement file is
    always removed."""
    if schedule is None:
        schedule = load_schedule(run_dir)
    out_dir = run_dir if out is None else out
    problem = unwritable(out_dir, margin=len(f"..tmp-0000000{IO_REPLAY_STEPS}"))
    if problem:
        raise OutputError(f"replay --out: {problem}")
    execution = execute(schedule, directory, on_step=on_step, issuer=issuer)
    comparison = compare(execution.batches, schedule.steps)
    text = summary_markdown(schedule, execution, comparison, directory)
    written = _write(out_dir, comparison, text, schedule.label)
    results_dir = run_dir.parent.parent
    if out is None and run_dir.parent.name == RUNS_DIR and (results_dir / SUMMARY_CSV).is_file():
        from sim.figures.io_replay import draw_results_figure

        written += draw_results_figure(results_dir)
    return Replayed(schedule, execution, comparison, written,
                    report_text(schedule, execution, comparison, written))


def _write(out_dir: Path, comparison: Comparison, summary: str, label: str) -> list[Path]:
    from sim.figures.io_replay import plot_steps

    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"{IO_REPLAY}.csv"
    steps = out_dir / IO_REPLAY_STEPS
    markdown = out_dir / f"{IO_REPLAY}.md"
    atomic_write_text(table, comparison.by_layer_step.to_csv(index=False))
    atomic_write_text(steps, comparison.by_step.to_csv(index=False))
    atomic_write_text(markdown, summary)
    return [table, steps, markdown, *plot_steps({label: comparison.by_step}, out_dir / IO_REPLAY)]


def _ms(us: float) -> str:
    return f"{us / 1e3:,.3f} ms"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:+.1f}%"


#: how the description of a preset ``kvsim calibrate`` wrote begins (sim.calibrate)
CALIBRATED = "Calibrated by kvsim calibrate"


def device_note(schedule: Schedule) -> str:
    """The simulated device's description, and a warning when it is not a calibrated preset
    (the simulated times then model some other device than the one replayed on)."""
    device = schedule.settings.get("device")
    description = str(device.get("description", "")) if isinstance(device, dict) else ""
    name = schedule.meta.get("device", "?")
    if description.startswith(CALIBRATED):
        return f"simulated device {name}: {description}"
    return (f"simulated device {name} is not a kvsim calibrate preset: its times model another "
            "device than the one replayed on (run the experiment with `device: PRESET.yaml` "
            "from kvsim calibrate on this storage)")


def _alignment_note(execution: Execution, schedule: Schedule) -> str:
    aligned = execution.aligned
    if not aligned.rounded:
        return (f"every command was 4 KiB-aligned as recorded (page {schedule.meta['page_bytes']}"
                " bytes): nothing rounded")
    return (f"{aligned.rounded} of {len(schedule.commands)} commands were rounded out to 4 KiB "
            f"blocks for O_DIRECT (page {schedule.meta['page_bytes']} bytes), "
            f"{aligned.added_bytes:,} bytes added")


def summary_markdown(
    schedule: Schedule, execution: Execution, comparison: Comparison, directory: Path
) -> str:
    """``io_replay.md``: what was replayed where, the totals, the per-layer table, the limits."""
    meta, totals = schedule.meta, comparison.totals
    lines = [
        f"# I/O replay of run {schedule.label} ({schedule.run_dir.name})",
        "",
        f"- schedule: {totals['steps']} decode steps of {meta['decode_steps']} (every "
        f"{meta['every']}), {len(schedule.batches)} batches, {len(schedule.commands)} commands; "
        f"simulated device {meta['device']} (queue depth {meta['queue_depth']}, page "
        f"{meta['page_bytes']} B, largest command {meta['max_io_bytes']} B); kvsim "
        f"{meta['kvsim_version']}, code {meta.get('code', '?')}",
        f"- storage: a {execution.file_bytes / 2**20:,.1f} MiB O_DIRECT file under "
        f"{directory.resolve()}, written once first at {execution.fill_mb_s:,.0f} MB/s "
        f"({execution.fill_seconds:.1f} s); replay took {execution.seconds:.1f} s, commands "
        f"issued by {execution.issuer}",
        f"- alignment: {_alignment_note(execution, schedule)}",
        f"- {device_note(schedule)}",
        f"- total I/O time: simulated {_ms(totals['simulated_us'])}, measured "
        f"{_ms(totals['measured_us'])} (simulated - measured: {_pct(totals['error'])} of the "
        "measured)",
        f"- per-step correlation (Pearson r over {totals['steps']} steps): "
        + ("n/a" if math.isnan(totals["correlation"]) else f"{totals['correlation']:.3f}"),
        f"- moved: reads {totals['read_bytes'] / 1e6:,.2f} MB in {totals['read_commands']:,} "
        f"commands, writes {totals['write_bytes'] / 1e6:,.2f} MB in "
        f"{totals['write_commands']:,} commands",
        "",
        "Per layer, summed over the replayed steps (us):",
        "",
        comparison.by_layer.to_markdown(index=False, floatfmt=".4g"),
        "",
        "A step's (or layer's) I/O time is the union of its batches' intervals: simulated from "
        "a batch's submission to its last completion in the flash model, measured from its "
        "first command's issue to its last completion on the file. Commands were issued "
        + ("through io_uring from one thread, completions reaped by polling"
           if execution.issuer == "io_uring" else "by threads blocking in preadv/pwritev")
        + " (at most the queue depth in flight), not by the "
        "device's command queue; compute between phases is not replayed; the page cache is "
        "bypassed (O_DIRECT) but the device's own caches (DRAM, SLC write cache) are not. "
        f"Per step and layer: {IO_REPLAY}.csv; per step: {IO_REPLAY_STEPS}.",
        "",
    ]
    return "\n".join(lines)


def report_text(
    schedule: Schedule, execution: Execution, comparison: Comparison, written: list[Path]
) -> str:
    """What ``kvsim replay`` prints: the totals and where the files are."""
    totals = comparison.totals
    corr = totals["correlation"]
    return "\n".join([
        f"run {schedule.label}: {totals['steps']} steps, {len(schedule.commands):,} commands "
        f"(queue depth {schedule.queue_depth}) on a {execution.file_bytes / 2**20:,.1f} MiB "
        f"O_DIRECT file, issued by {execution.issuer}",
        f"I/O time: simulated {_ms(totals['simulated_us'])}, measured "
        f"{_ms(totals['measured_us'])} ({_pct(totals['error'])}); per-step r = "
        + ("n/a" if math.isnan(corr) else f"{corr:.3f}"),
        f"alignment: {_alignment_note(execution, schedule)}",
        device_note(schedule),
        "wrote: " + ", ".join(str(p) for p in written),
    ])
