"""The figure interface and the results a figure reads.

A figure reads an experiment's result files (:class:`Results`; names in
:mod:`sim.result_files`) and writes into ``<results>/figures/``: PNG + PDF in the shared style
(:mod:`sim.figures.style`), tables beside them as CSV and markdown (:func:`atomic_write_table`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import yaml

from sim.atomic import atomic_write_text, os_error_text
from sim.errors import ConfigError, KvsimError, OutputError
from sim.registry import Registry
from sim.result_files import EXPERIMENT, FIGURES_DIR, RUN_SETTINGS, RUNS_DIR, SUMMARY_CSV
from sim.yaml_input import read_yaml

FIGURES: Registry[Figure] = Registry("figure", package="sim.figures")

@dataclass
class Results:
    """An experiment's results directory, as figures read it."""

    dir: Path
    summary: pd.DataFrame
    experiment: dict[str, Any]

    @classmethod
    def load(cls, directory: Path | str) -> Results:
        """Read a results directory, checked as a figure will use it: ``summary.csv`` must be
        kvsim's (its ``run_id`` and ``run`` columns, numeric metrics, a column per sweep axis)
        and ``experiment.yaml`` an experiment's settings. Raises one-line KvsimError."""
        directory = Path(directory)
        summary_path = directory / SUMMARY_CSV
        if not summary_path.is_file():
            raise KvsimError(f"{directory}: no {SUMMARY_CSV} (run the experiment first)")
        try:
            summary = pd.read_csv(summary_path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
                OSError) as exc:
            raise KvsimError(f"{summary_path}: unreadable ({_first_line(exc)})") from None
        experiment_path = directory / EXPERIMENT
        experiment: dict[str, Any] = {}
        if experiment_path.exists():
            data = read_yaml(experiment_path)  # a binary file, too, is one line (ConfigError)
            experiment = _plot_settings(data, experiment_path)
        results = cls(directory, summary, experiment)
        _check_summary(summary, results.axes, summary_path)
        return results

    @property
    def name(self) -> str:
        return str(self.experiment.get("name", self.dir.name))

    @property
    def axes(self) -> list[str]:
        sweep = self.experiment.get("sweep") or {}
        return list(sweep.get("grid") or {}) + list(sweep.get("zip") or {})

    @cached_property
    def out_dir(self) -> Path:
        path = self.dir / FIGURES_DIR
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {os_error_text(exc)}") from None
        return path

    def run_id(self, run: str, **axes: Any) -> str:
        """The id of the run labelled ``run`` at the sweep point given by ``axes`` (dotted keys
        with ``.`` written as ``__``: ``policy__budget=0.05``); raises if not exactly one."""
        rows = self.summary[self.summary["run"] == run]
        for key, value in axes.items():
            column = key.replace("__", ".")
            if column not in rows:
                raise KvsimError(f"{self.dir}: no sweep axis {column!r} in {SUMMARY_CSV}")
            rows = rows[rows[column] == value]
        if len(rows) != 1:
            raise KvsimError(f"{self.dir}: {len(rows)} runs match run={run!r} {axes or ''}")
        return str(rows["run_id"].iloc[0])

    def run_dir(self, run_id: str) -> Path:
        return self.dir / RUNS_DIR / str(run_id)

    def records(self, run_id: str, name: str) -> pd.DataFrame:
        """A run's record file: ``steps``, ``accuracy``, ``clusters`` (parquet) or
        ``io_sizes``, ``run_lengths`` (CSV); an empty frame if the run has none."""
        base = self.run_dir(run_id)
        for path, reader in ((base / f"{name}.parquet", pd.read_parquet),
                             (base / f"{name}.csv", pd.read_csv)):
            if path.exists():
                return reader(path)
        if not base.exists():
            raise KvsimError(f"{base}: no such run ({SUMMARY_CSV} and {RUNS_DIR}/ disagree)")
        return pd.DataFrame()

    def settings(self, run_id: str) -> dict[str, Any]:
        return yaml.safe_load((self.run_dir(run_id) / RUN_SETTINGS).read_text())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _plot_settings(data: Any, path: Path) -> dict[str, Any]:
    """The keys of an experiment file that drawing reads (``name``, ``plot``, ``sweep``,
    ``figures``, ``record``), checked for their types; the figures' names and options too."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of experiment settings, got {type(data).__name__}"
        )
    expected: dict[str, tuple[type, ...]] = {
        "name": (str, int, float), "plot": (bool,), "sweep": (dict,), "figures": (list,),
        "record": (dict,),
    }
    for key, types in expected.items():
        value = data.get(key)
        if value is not None and not isinstance(value, types):
            kinds = " or ".join("a mapping" if t is dict else "a list" if t is list else t.__name__
                                for t in types)
            raise ConfigError(f"{path}: {key} must be {kinds}, got {value!r:.60}")
    for part in ("grid", "zip"):
        axes = (data.get("sweep") or {}).get(part)
        if axes is not None and not isinstance(axes, dict):
            raise ConfigError(f"{path}: sweep.{part} must be a mapping of axes, got {axes!r:.60}")
    validate_figure_specs(data.get("figures") or [], str(path))
    return data


def _check_summary(summary: pd.DataFrame, axes: list[str], path: Path) -> None:
    """A summary a figure can draw: kvsim's identifying columns, every sweep axis, numeric
    metrics. Metrics an older kvsim did not write are added empty, as the runner does."""
    from sim.metrics.records import SUMMARY_COLUMNS

    missing = [column for column in ("run_id", "run", *axes) if column not in summary]
    if missing:
        raise KvsimError(
            f"{path}: no column {', '.join(missing)} (not a kvsim summary, or not of this "
            "experiment)"
        )
    for column in SUMMARY_COLUMNS:
        if column in ("run", "policy"):
            continue
        if column not in summary:
            summary[column] = pd.Series(float("nan"), index=summary.index, dtype=float)
        elif not pd.api.types.is_numeric_dtype(summary[column]):
            raise KvsimError(f"{path}: column {column} holds non-numbers (not a kvsim summary?)")


class Figure(ABC):
    """A figure (or table) drawn from :class:`Results`. Subclasses are dataclasses whose fields
    are the figure's options (given in the experiment's ``figures:`` entry)."""

    name: ClassVar[str]
    #: the ``record:`` settings (fields of :class:`sim.config.RecordSpec`) the figure's files
    #: come from; planning refuses an experiment that lists the figure without them, before
    #: any run (the runs would otherwise complete and the figure fail afterwards)
    needs_record: ClassVar[tuple[str, ...]] = ()
    #: the closed-loop tasks whose results the figure is drawn from (empty: a trace replay's)
    closed_loop_tasks: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def draw(self, results: Results) -> list[Path]:
        """Write the figure's files under ``results.out_dir``; return their paths."""


def draw_figures(results: Results, specs: list[str | dict[str, Any]]) -> list[Path]:
    """Every figure of ``specs`` (entries of an experiment's ``figures:``)."""
    figures = [FIGURES.create(spec, where=f"figures[{i}]") for i, spec in enumerate(specs)]
    written: list[Path] = []
    for figure in figures:
        written += figure.draw(results)
    return written


def validate_figure_specs(
    specs: list[str | dict[str, Any]], where: str, record: Any = None,
    closed_loop_task: str | None = None,
) -> None:
    """Fail before any run if a figure name or option is unknown, or (given the experiment's
    ``record``, a :class:`sim.config.RecordSpec`) a figure's :attr:`Figure.needs_record`
    settings are left at their defaults, which record nothing, or does not draw from the
    experiment's kind of results: a closed loop's (``closed_loop_task``, its task) or a trace
    replay's (ConfigError)."""
    for i, spec in enumerate(specs):
        figure = FIGURES.create(spec, where=f"{where}: figures[{i}]")
        if record is None:
            continue
        tasks = figure.closed_loop_tasks
        if closed_loop_task is None and tasks:
            raise ConfigError(f"{where}: figures[{i}] ({figure.name}) is drawn from closed_loop "
                              f"results (task {' or '.join(tasks)}), not from a trace replay")
        if closed_loop_task is not None and closed_loop_task not in tasks:
            raise ConfigError(
                f"{where}: figures[{i}] ({figure.name}) is not drawn from closed_loop task "
                f"{closed_loop_task}" + (f" (only {' or '.join(tasks)})" if tasks else
                                         " results (it draws a trace replay's)"))
        fields = type(record).model_fields
        for name in figure.needs_record:
            if getattr(record, name) == fields[name].get_default(call_default_factory=True):
                raise ConfigError(
                    f"{where}: figures[{i}] ({figure.name}) is drawn from the records that "
                    f"record.{name} asks for; set it in the experiment's record: block"
                )


def atomic_write_table(frame: pd.DataFrame, stem: Path, floatfmt: str = ".4g") -> list[Path]:
    """``stem``.csv and ``stem``.md, each written to a temporary file and renamed."""
    written = []
    for ext, text in (
        ("csv", frame.to_csv(index=False)),
        ("md", frame.to_markdown(index=False, floatfmt=floatfmt) + "\n"),
    ):
        path = stem.with_suffix(f".{ext}")
        atomic_write_text(path, text)
        written.append(path)
    return written
