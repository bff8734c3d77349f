"""Helpers the record-based figures share: which runs of a results directory to draw, the
per-run ``record:`` settings and one-line errors for missing files.

Private to :mod:`sim.figures` (the leading underscore: registers no figure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from sim.errors import KvsimError
from sim.figures.base import Results
from sim.result_files import SUMMARY_CSV


def unique_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per run_id (a run an axis leaves unchanged is listed once per point)."""
    if "run_id" not in summary:
        raise KvsimError(f"{SUMMARY_CSV} has no run_id column (rerun the experiment)")
    return summary.drop_duplicates("run_id", keep="first").reset_index(drop=True)


def traces_of(summary: pd.DataFrame) -> list[str]:
    """The trace names of the summary, in first-appearance order."""
    return list(dict.fromkeys(summary["trace"].astype(str))) if "trace" in summary else []


def pick_trace(
    results: Results, trace: str | None, figure: str, needs: str | None = None
) -> tuple[str, pd.DataFrame]:
    """The trace a one-trace figure shows and its runs: the ``trace`` option, else the first
    trace one of whose runs has the record file ``needs`` (else the first trace).

    ``trace`` may be the full name or a unique substring of it (``stdlib-docstrings``).
    """
    runs = unique_runs(results.summary)
    names = traces_of(runs)
    if not names:
        raise KvsimError(f"{figure}: {results.dir}/{SUMMARY_CSV} lists no runs")
    if trace is None:
        having = [
            n for n in names
            if needs is None or any(
                (results.run_dir(r) / needs).exists()
                for r in runs.loc[runs["trace"].astype(str) == n, "run_id"]
            )
        ]
        name = (having or names)[0]
    else:
        matches = [n for n in names if n == trace] or [n for n in names if trace in n]
        if len(matches) != 1:
            raise KvsimError(
                f"{figure}: option trace={trace!r} matches {len(matches)} of the traces "
                f"({', '.join(names)}); give one of them"
            )
        name = matches[0]
    return name, runs[runs["trace"].astype(str) == name].reset_index(drop=True)


def record_settings(results: Results, run_id: str) -> dict[str, Any]:
    """The run's ``record:`` block: run.yaml's if it has one, else the experiment's with the
    run's sweep point applied (``record.<key>`` axes)."""
    settings = results.settings(run_id)
    if isinstance(settings.get("record"), dict):
        return dict(settings["record"])
    record = dict(results.experiment.get("record") or {})
    for key, value in (settings.get("point") or {}).items():
        if key.startswith("record."):
            record[key.split(".", 1)[1]] = value
    return record


def require(results: Results, run_id: str, name: str, figure: str, hint: str) -> Path:
    """The path of a run's record file ``name``; a one-line KvsimError naming ``hint`` (what
    to set in the experiment) if it is missing."""
    path = results.run_dir(run_id) / name
    if not path.exists():
        label = _label(results, run_id)
        raise KvsimError(f"{figure}: run {label!r} has no {name}; {hint}")
    return path


def _label(results: Results, run_id: str) -> str:
    rows = results.summary[results.summary["run_id"] == run_id]
    return str(rows["run"].iloc[0]) if len(rows) else run_id


def short_trace(name: str) -> str:
    """``smollm2-135m/pydoc/4096+128`` -> ``pydoc``; other names unchanged."""
    parts = str(name).split("/")
    return parts[1] if len(parts) == 3 else str(name)
