"""Measured against simulated I/O time: per step and layer, per step, per layer, in total.

Both sides are measured alike, from each batch's interval (simulated: submission to last
completion in the SimPy flash model; measured: first issue to last completion on the real
file, see :mod:`sim.io_replay.execute`): a (step, layer)'s I/O time is the length of the union
of its batches' intervals (the time the device was busy with that layer's commands; a layer's
reads and writes that overlap count once), a step's the union of all its batches'; the
``*_read_us`` columns the same over the read batches alone (what a step waits for). Totals are
sums over the recorded steps; ``correlation`` is Pearson's r of the per-step times (NaN with
fewer than two steps or no variation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def union_us(starts: np.ndarray, ends: np.ndarray) -> float:
    """Length of the union of the intervals ``[starts[i], ends[i]]``."""
    if not len(starts):
        return 0.0
    order = np.argsort(starts, kind="stable")
    total, lo, hi = 0.0, float(starts[order[0]]), float(ends[order[0]])
    for i in order[1:].tolist():
        s, e = float(starts[i]), float(ends[i])
        if s > hi:
            total += hi - lo
            lo, hi = s, e
        else:
            hi = max(hi, e)
    return total + hi - lo


@dataclass(frozen=True)
class Comparison:
    """``by_layer_step``: one row per recorded (step, layer) with batches; ``by_step``: one row
    per recorded step; ``by_layer``: per layer, summed over the steps; ``totals``."""

    by_layer_step: pd.DataFrame
    by_step: pd.DataFrame
    by_layer: pd.DataFrame
    totals: dict[str, float]


def _sums(group: pd.DataFrame) -> dict[str, float]:
    reads = ~group["write"].to_numpy(dtype=bool)
    size = group["bytes"].to_numpy(dtype=np.int64)
    commands = group["commands"].to_numpy(dtype=np.int64)
    issue, done = group["issue_us"].to_numpy(), group["done_us"].to_numpy()
    start, end = group["start_us"].to_numpy(), group["end_us"].to_numpy()
    return {
        "simulated_us": union_us(issue, done),
        "measured_us": union_us(start, end),
        "simulated_read_us": union_us(issue[reads], done[reads]),
        "measured_read_us": union_us(start[reads], end[reads]),
        "read_bytes": int(size[reads].sum()),
        "read_commands": int(commands[reads].sum()),
        "write_bytes": int(size[~reads].sum()),
        "write_commands": int(commands[~reads].sum()),
    }


def compare(batches: pd.DataFrame, steps: list[int]) -> Comparison:
    """The tables of a replay's ``batches`` (the schedule's, with measured ``start_us`` and
    ``end_us``) over the recorded ``steps``."""
    rows = [{"step": step, "layer": layer, **_sums(group)}
            for (step, layer), group in batches.groupby(["step", "layer"], sort=True)]
    columns = ["step", "layer", "simulated_us", "measured_us", "simulated_read_us",
               "measured_read_us", "read_bytes", "read_commands", "write_bytes",
               "write_commands"]
    by_layer_step = pd.DataFrame(rows, columns=columns)
    by_step_rows = []
    grouped = dict(tuple(batches.groupby("step")))
    for step in steps:
        group = grouped.get(step)
        if group is None:
            by_step_rows.append({"step": step, **_sums(batches.iloc[:0])})
        else:
            by_step_rows.append({"step": step, **_sums(group)})
    by_step = pd.DataFrame(by_step_rows, columns=[c for c in columns if c != "layer"])
    by_layer = (
        by_layer_step.drop(columns="step").groupby("layer", as_index=False).sum()
        if len(by_layer_step) else by_layer_step.drop(columns="step")
    )
    for frame in (by_layer_step, by_step, by_layer):
        frame["error"] = _relative(frame["measured_us"], frame["simulated_us"])
    simulated = float(by_step["simulated_us"].sum())
    measured = float(by_step["measured_us"].sum())
    totals = {
        "steps": len(steps),
        "simulated_us": simulated,
        "measured_us": measured,
        "error": (simulated - measured) / measured if measured > 0 else float("nan"),
        "correlation": correlation(by_step["simulated_us"].to_numpy(),
                                   by_step["measured_us"].to_numpy()),
        "read_bytes": int(by_step["read_bytes"].sum()),
        "read_commands": int(by_step["read_commands"].sum()),
        "write_bytes": int(by_step["write_bytes"].sum()),
        "write_commands": int(by_step["write_commands"].sum()),
    }
    return Comparison(by_layer_step, by_step, by_layer, totals)


def _relative(measured: pd.Series, simulated: pd.Series) -> pd.Series:
    """(simulated - measured) / measured: how far the simulation is off the measurement."""
    base = measured.where(measured > 0)
    return (simulated - measured) / base


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r, NaN with fewer than two points or either side constant."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
