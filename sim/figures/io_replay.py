"""Measured against simulated per-step I/O time (``kvsim replay``, :mod:`sim.io_replay`).

Left: one point per replayed decode step, simulated I/O time (x) against the time the same
commands took on real storage (y), log-log, one colour per run, the diagonal dashed (on it the
model predicts the device exactly). Right: both over the replayed steps (log time), simulated
dashed, measured solid. Steps without I/O are left out of both.

The figure ``io_replay`` of an experiment's ``figures:`` draws every run of the results
directory that ``kvsim replay`` has replayed (``runs/<id>/io_replay_steps.csv``), with a table
of each run's totals and per-step correlation (``figures/io_replay.{csv,md}``); before any run
has been replayed it draws nothing (``kvsim replay`` redraws it after each replay). Options:
none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.style import MARKERS, OKABE_ITO, PAGE_IN, apply_style, plt, save_figure
from sim.result_files import IO_REPLAY, IO_REPLAY_STEPS


def plot_steps(series: dict[str, pd.DataFrame], stem: Path) -> list[Path]:
    """The two panels for ``series`` (label -> a per-step table with ``step``,
    ``simulated_us`` and ``measured_us``); ``stem``.png and .pdf."""
    apply_style()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(PAGE_IN, 2.6),
                                 gridspec_kw={"width_ratios": [1, 1.3]})
    values: list[float] = []
    for i, (label, frame) in enumerate(series.items()):
        colour, marker = OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]
        simulated = frame["simulated_us"].to_numpy(dtype=float) / 1e3
        measured = frame["measured_us"].to_numpy(dtype=float) / 1e3
        both = (simulated > 0) & (measured > 0)  # log axes: steps without I/O are left out
        values += simulated[both].tolist() + measured[both].tolist()
        ax.scatter(simulated[both], measured[both], s=9, marker=marker, color=colour,
                   label=label, lw=0)
        steps = frame["step"].to_numpy()
        bx.plot(steps, np.where(simulated > 0, simulated, np.nan), ls="--", lw=0.8,
                color=colour)
        bx.plot(steps, np.where(measured > 0, measured, np.nan), ls="-", lw=0.8, color=colour,
                label=label)
    low, high = (min(values) / 1.5, max(values) * 1.5) if values else (0.01, 1.0)
    ax.plot([low, high], [low, high], ls="--", lw=0.6, color="#777777")
    ax.set_xscale("log")
    ax.set_yscale("log")
    bx.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel("simulated I/O time per step (ms)")
    ax.set_ylabel("measured I/O time per step (ms)")
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(frameon=False, loc="upper left")
    bx.set_xlabel("decode step")
    bx.set_ylabel("I/O time per step (ms; dashed: simulated)")
    bx.grid(alpha=0.3, lw=0.5)
    fig.tight_layout()
    return save_figure(fig, stem)


def _totals(frame: pd.DataFrame) -> dict[str, float]:
    from sim.io_replay.compare import correlation

    simulated = float(frame["simulated_us"].sum())
    measured = float(frame["measured_us"].sum())
    return {
        "steps": len(frame),
        "simulated_ms": simulated / 1e3,
        "measured_ms": measured / 1e3,
        "error": (simulated - measured) / measured if measured > 0 else float("nan"),
        "correlation": correlation(frame["simulated_us"].to_numpy(),
                                   frame["measured_us"].to_numpy()),
    }


@FIGURES.register("io_replay")
@dataclass
class IoReplay(Figure):
    """Measured against simulated per-step I/O time of the replayed runs (see the module
    docstring). Options: none."""

    def draw(self, results: Results) -> list[Path]:
        series: dict[str, pd.DataFrame] = {}
        rows = []
        for _, run in results.summary.iterrows():
            path = results.run_dir(str(run["run_id"])) / IO_REPLAY_STEPS
            if not path.is_file():
                continue
            frame = pd.read_csv(path)
            label = str(run["run"])
            if label in series:
                label = f"{label} ({run['run_id']})"
            series[label] = frame
            rows.append({"run": label, "run_id": run["run_id"], **_totals(frame)})
        if not series:
            return []  # nothing replayed yet
        stem = results.out_dir / IO_REPLAY
        return atomic_write_table(pd.DataFrame(rows), stem) + plot_steps(series, stem)


def draw_results_figure(results_dir: Path) -> list[Path]:
    """The ``io_replay`` figure of a results directory (what ``kvsim replay`` redraws after
    replaying one of its runs)."""
    return IoReplay().draw(Results.load(results_dir))
