"""A run's recorded flash schedule, read back and checked before anything touches storage.

The files are those :mod:`sim.replay.io_record` wrote into the run's directory
(``record_io:``). Every problem is one line (:class:`ScheduleError`): not a run directory, no
schedule recorded (the line says how to record one), a schedule of another kvsim version or
schema, missing or unreadable files, or files that contradict each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from sim import __version__
from sim.errors import KvsimError
from sim.replay.io_record import PURPOSES, SCHEMA, SCHEMA_VERSION
from sim.result_files import IO_BATCHES, IO_COMMANDS, IO_SCHEDULE, RUN_SETTINGS

BATCH_COLUMNS = ("batch", "step", "layer", "purpose", "write", "issue_us", "done_us",
                 "commands", "bytes")
COMMAND_COLUMNS = ("batch", "step", "layer", "write", "offset", "size")

HOW_TO_RECORD = (
    "add `record_io: {every: 8, steps: 64}` to the experiment file and run it again "
    "(kvsim run EXPERIMENT.yaml); its runs then record their flash schedule"
)


class ScheduleError(KvsimError):
    """A run directory ``kvsim replay`` cannot replay."""


@dataclass(frozen=True)
class Schedule:
    """A checked schedule: ``meta`` (``io_schedule.json``), ``batches`` and ``commands`` (the
    two tables, columns :data:`BATCH_COLUMNS` and :data:`COMMAND_COLUMNS`, commands in
    submission order), ``run`` (the run's label and settings from ``run.yaml``)."""

    run_dir: Path
    meta: dict[str, Any]
    batches: pd.DataFrame
    commands: pd.DataFrame
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.settings.get("run", self.run_dir.name))

    @property
    def queue_depth(self) -> int:
        return int(self.meta["queue_depth"])

    @property
    def extent_bytes(self) -> int:
        return int(self.meta["extent_bytes"])

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in self.meta["recorded_steps"]]


def load_schedule(run_dir: Path) -> Schedule:
    """The schedule recorded in ``run_dir`` (a ``runs/<run_id>/`` directory), checked."""
    if not run_dir.exists():
        raise ScheduleError(f"replay: {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ScheduleError(f"replay: {run_dir} is not a directory (give a runs/<run_id>/ one)")
    settings_path = run_dir / RUN_SETTINGS
    if not settings_path.is_file():
        raise ScheduleError(
            f"replay: {run_dir} is not a kvsim run directory (no {RUN_SETTINGS}); give a "
            "results/<experiment>/runs/<run_id>/ directory"
        )
    meta_path = run_dir / IO_SCHEDULE
    if not meta_path.is_file():
        raise ScheduleError(f"replay: run {run_dir.name} has no recorded flash schedule; "
                            + HOW_TO_RECORD)
    try:
        settings = yaml.safe_load(settings_path.read_text()) or {}
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ScheduleError(f"replay: {meta_path}: unreadable ({_first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise ScheduleError(f"replay: {meta_path} is not a kvsim flash schedule")
    if not isinstance(settings, dict):
        raise ScheduleError(f"replay: {settings_path} is not a run's settings")
    version, recorded_by = meta.get("schema_version"), meta.get("kvsim_version")
    if version != SCHEMA_VERSION or recorded_by != __version__:
        raise ScheduleError(
            f"replay: run {run_dir.name} was recorded by kvsim {recorded_by} (schedule version "
            f"{version}); this is kvsim {__version__} (version {SCHEMA_VERSION}): run the "
            "experiment again with this kvsim"
        )
    batches = _table(run_dir / IO_BATCHES, BATCH_COLUMNS)
    commands = _table(run_dir / IO_COMMANDS, COMMAND_COLUMNS)
    schedule = Schedule(run_dir, meta, batches, commands, settings)
    problem = _inconsistency(schedule)
    if problem:
        raise ScheduleError(f"replay: run {run_dir.name}'s flash schedule is inconsistent: "
                            f"{problem}")
    return schedule


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise ScheduleError(f"replay: {path} is missing (a partial run directory? run it again)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise ScheduleError(f"replay: {path}: unreadable ({_first_line(exc)})") from None
    missing = [c for c in columns if c not in frame]
    if missing:
        raise ScheduleError(f"replay: {path} lacks the columns {', '.join(missing)}")
    return frame


def _inconsistency(schedule: Schedule) -> str | None:
    """What in the schedule contradicts itself or cannot be issued, or ``None``."""
    meta, batches, commands = schedule.meta, schedule.batches, schedule.commands
    for key in ("queue_depth", "page_bytes", "max_io_bytes", "extent_bytes"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (
            key != "extent_bytes" and value == 0
        ):
            return f"{key} is {value!r}"
    steps = meta.get("recorded_steps")
    if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
        return "recorded_steps is not a list of steps"
    if len(batches) != meta.get("batches") or len(commands) != meta.get("commands"):
        return "the tables' lengths differ from io_schedule.json's counts"
    if not np.array_equal(batches["batch"].to_numpy(), np.arange(len(batches))):
        return "batches are not numbered 0, 1, 2, ..."
    if not set(batches["purpose"].unique()) <= set(PURPOSES):
        return "a batch has an unknown purpose"
    if not set(batches["step"].unique().tolist()) <= set(steps):
        return "a batch's step was not recorded"
    sizes = commands["size"].to_numpy(dtype=np.int64)
    offsets = commands["offset"].to_numpy(dtype=np.int64)
    if len(commands) and (sizes.min() <= 0 or offsets.min() < 0):
        return "a command has a size <= 0 or a negative offset"
    if len(commands) and (offsets + sizes).max() > meta["extent_bytes"]:
        return "a command ends beyond extent_bytes"
    if len(commands) and sizes.max() > meta["max_io_bytes"]:
        return "a command is larger than max_io_bytes"
    batch_of = commands["batch"].to_numpy(dtype=np.int64)
    if len(commands) and (batch_of.min() < 0 or batch_of.max() >= len(batches)):
        return "a command names a batch that does not exist"
    if not np.array_equal(np.bincount(batch_of, minlength=len(batches)),
                          batches["commands"].to_numpy()):
        return "the batches' command counts differ from the commands"
    issue = batches["issue_us"].to_numpy(dtype=np.float64)
    done = batches["done_us"].to_numpy(dtype=np.float64)
    if len(batches) and not (np.isfinite(issue).all() and np.isfinite(done).all()
                             and (done >= issue).all()):
        return "a batch's simulated times are missing or end before they start"
    return None
