"""An experiment's results directory: its lock, one run's files, the summary table, stale
temporaries.

File names and the directory layout are in :mod:`sim.result_files`. A run directory appears
complete or not at all (written to a temporary sibling, then renamed: :mod:`sim.atomic`), so an
interrupted sweep resumes by skipping the runs whose directory exists.

One ``kvsim run`` at a time writes into a results directory: it holds an exclusive
``flock(2)`` on the directory's lock file (:func:`results_lock`) from before its first write to
after its summary; another run into the same directory stops at once with one line. The kernel
releases the lock when its holder ends, however it ends, so a killed run never leaves a stale
lock. Forked local workers share the lock (an inherited descriptor), so it is held until the
last of them is gone; that makes the start of a run, under the lock, the one safe moment to
remove the temporaries a killed run left (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from sim.atomic import TEMPORARY_GLOB, atomic_write, atomic_write_text
from sim.errors import KvsimError
from sim.result_files import (
    ACCURACY,
    CLOSED_LOOP_COLUMNS,
    CLUSTERS,
    EXPERIMENT,
    IO_SIZES,
    PROGRESS_DIR,
    RUN_LENGTHS,
    RUN_LOCK,
    RUN_SETTINGS,
    RUN_SUMMARY,
    RUNS_DIR,
    STEPS,
    SUMMARY_CSV,
    SUMMARY_MD,
)

#: seconds a run waits for the results directory's lock before it gives up
LOCK_WAIT_S = 5.0

if TYPE_CHECKING:  # planning imports the figures; the worker writing runs must not
    from sim.experiment.planning import Plan


def summary_cell(value: Any) -> Any:
    """A sweep value as a table cell (mappings and lists as compact JSON)."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()
    }


def _write_record(path: Path, data: Any) -> None:
    """One extra record file, in the format its name says (``.parquet``, ``.csv``, ``.json``,
    else ``.npy``)."""
    if path.suffix == ".parquet":
        data.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        data.to_csv(path, index=False)
    elif path.suffix == ".json":
        path.write_text(json.dumps(data, indent=1))
    else:
        np.save(path, data)


def write_run(
    run_dir: Path,
    pp: Any,
    sim: Any,
    settings: dict[str, Any],
    row: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """All files of one run, or none: written to a temporary sibling, then renamed.

    ``pp``: the policy pass, ``sim``: the replay's result, ``settings``: run.yaml's content,
    ``row``: the summary row, ``extra``: file name -> the ``record:`` block's extra records.
    """
    with atomic_write(run_dir) as tmp:
        tmp.mkdir()
        for name, data in (extra or {}).items():
            _write_record(tmp / name, data)
        pp.accuracy.to_parquet(tmp / ACCURACY, index=False)
        if not pp.clusters.empty:
            pp.clusters.to_parquet(tmp / CLUSTERS, index=False)
        sim.steps.to_parquet(tmp / STEPS, index=False)
        sim.io_sizes.to_csv(tmp / IO_SIZES, index=False)
        sim.run_lengths.to_csv(tmp / RUN_LENGTHS, index=False)
        (tmp / RUN_SETTINGS).write_text(yaml.safe_dump(settings, sort_keys=False))
        (tmp / RUN_SUMMARY).write_text(json.dumps(_json_safe(row), indent=1))


def write_closed_loop_run(
    run_dir: Path, settings: dict[str, Any], row: dict[str, Any], records: dict[str, Any],
    moved: dict[str, Path] | None = None,
) -> None:
    """All files of one closed-loop run, or none (as :func:`write_run`): ``records``: file
    name -> table (:mod:`sim.experiment.closed_loop`); ``moved``: name -> a directory written
    beforehand on the same file system (the run's own trace), renamed into the run's."""
    with atomic_write(run_dir) as tmp:
        tmp.mkdir()
        for name, data in records.items():
            _write_record(tmp / name, data)
        for name, path in (moved or {}).items():
            os.rename(path, tmp / name)
        (tmp / RUN_SETTINGS).write_text(yaml.safe_dump(settings, sort_keys=False))
        (tmp / RUN_SUMMARY).write_text(json.dumps(_json_safe(row), indent=1))


@contextmanager
def results_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir`` for one ``kvsim run`` (created if missing); raises one-line
    :class:`KvsimError` if another run still holds it after ``LOCK_WAIT_S`` (the grace lets the
    workers of a run killed a moment ago finish dying). A file system without ``flock``
    support (some network mounts) leaves the directory unlocked rather than failing the run."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            busy = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:  # ENOLCK, EINVAL: this file system has no locks; go on
                busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            if not busy or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if busy:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise KvsimError(
                f"another kvsim run{f' (pid {holder})' if holder.isdigit() else ''} is writing "
                f"{output_dir}; wait for it to end or give this one another --output"
            )
        yield
    finally:
        os.close(fd)


def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete what a killed run left in ``output_dir``: half-written run directories and summary
    files under temporary names, its workers' progress reports. Returns how many were removed.

    Call it holding :func:`results_lock`: no other run is writing there then, and the workers of
    a killed one are gone (:mod:`sim.experiment.worker`), so every temporary is stale. Plots are
    left alone: ``kvsim plot`` may be drawing them without the lock.
    """
    stale = [*(output_dir / RUNS_DIR).glob(TEMPORARY_GLOB), output_dir / PROGRESS_DIR]
    for name in (EXPERIMENT, SUMMARY_CSV, SUMMARY_MD):
        stale += output_dir.glob(f".{name}.tmp-*")
    removed = 0
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue
        removed += 1
    return removed


def write_experiment(plan: Plan) -> None:
    """The experiment file as given, beside its results (``kvsim plot`` reads its figures)."""
    atomic_write_text(plan.output_dir / EXPERIMENT, plan.source.read_text())


def read_summary(plan: Plan) -> pd.DataFrame:
    """One row per completed run of the plan, in plan order (columns: run_id, run, the sweep
    axes, trace, device, model, then the metrics of :data:`sim.metrics.records.SUMMARY_COLUMNS`)."""
    from sim.metrics.records import SUMMARY_COLUMNS

    rows = []
    for run in plan.runs:
        path = plan.run_dir(run) / RUN_SUMMARY
        if path.exists():
            row = {k: v for k, v in json.loads(path.read_text()).items() if k not in plan.axes}
            rows.append({**row, **{key: summary_cell(value) for key, value in run.point.items()}})
    closed_loop = plan.config.closed_loop
    if closed_loop is not None:  # no device; the task's metrics
        leading = list(dict.fromkeys(["run_id", "run", *plan.axes, "trace", "model"]))
        metrics = CLOSED_LOOP_COLUMNS[closed_loop.task]
    else:
        leading = list(dict.fromkeys(["run_id", "run", *plan.axes, "trace", "device", "model"]))
        metrics = list(SUMMARY_COLUMNS)
    columns = leading + [c for c in metrics if c not in leading]
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = pd.Series(dtype=float)
    extra = [c for c in frame.columns if c not in columns]
    return frame[columns + extra]


def write_summary(plan: Plan, summary: pd.DataFrame) -> None:
    """``summary.csv`` and ``summary.md`` of the plan's completed runs."""
    atomic_write_text(plan.output_dir / SUMMARY_CSV, summary.to_csv(index=False))
    atomic_write_text(
        plan.output_dir / SUMMARY_MD, summary.to_markdown(index=False, floatfmt=".4g") + "\n"
    )
