"""From an experiment YAML to a plan of runs, and from one run's plan to its result files.

An experiment is a base config plus an optional ``sweep:`` (see :mod:`sim.sweep`). ``plan``
expands the sweep, validates every point as if it had been written by hand (device preset and
overrides, simulated model, cache, every policy/layout/replacement spec, the trace or its capture
settings, budgets against the context) and turns each (point, policy entry) into a
:class:`RunPlan` -- plain data, named by a hash of its resolved settings. Nothing runs and nothing
is written before the whole plan is valid.

Runs that share a trace, a policy spec and a seed share one policy pass (selections and accuracy
do not depend on the device, cache or layout), so :class:`PassGroup` is the unit of work:
:func:`run_group` computes the pass once and replays it for each of its runs. The scheduling
(local processes or Dask) lives in :mod:`sim.runner`.

Results layout (``<output>/``)::

    experiment.yaml                  the experiment as given (``kvsim plot`` reads its figures)
    summary.csv, summary.md          one row per run: label, sweep axes, summary metrics
    accuracy_vs_latency.png / .pdf   the default plot
    runs/<run_id>/run.yaml           the run's exact resolved settings (run_id hashes them)
    runs/<run_id>/summary.json       its summary row
    runs/<run_id>/accuracy.parquet   (step, layer, q_head) accuracy records
    runs/<run_id>/clusters.parquet   (step, layer, kv_head) group count and intra-cluster
                                     variance (policies with groups only)
    runs/<run_id>/steps.parquet      per-step latency breakdown, I/O and DRAM records
    runs/<run_id>/io_sizes.csv       flash read command size distribution
    runs/<run_id>/run_lengths.csv    contiguous flash access lengths (entries)

A run directory appears complete or not at all (written to a temporary sibling, then renamed),
so an interrupted sweep resumes by skipping the runs whose directory exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import ValidationError

from sim.config import (
    CacheSpec,
    ExperimentConfig,
    PipelineSpec,
    load_model_geometry,
    parse_size_bytes,
)
from sim.errors import ConfigError, KvsimError
from sim.figures.base import validate_figure_specs
from sim.hardware import DeviceParams, load_device
from sim.kv.cache import REPLACEMENTS
from sim.kv.layout import LAYOUTS
from sim.model import ModelGeometry
from sim.paths import REPO_ROOT
from sim.policies import POLICIES
from sim.sweep import RUN_KEYS, apply_point, describe_point, expand
from sim.trace.capture import CaptureSettings
from sim.trace.format import open_trace
from sim.validation import pydantic_error_line, read_yaml

RUNS_DIR = "runs"
RUN_SETTINGS = "run.yaml"
RUN_SUMMARY = "summary.json"


@dataclass(frozen=True)
class TraceSource:
    """Where a run's trace comes from: an existing directory or capture settings."""

    key: str  # identity: the capture's cache key, or "path:<absolute path>"
    name: str  # short name for tables and legends
    path: str | None = None
    capture: dict[str, Any] | None = None
    prompt_len: int = 0


@dataclass
class RunPlan:
    """One run: one policy on one trace, device, cache and pipeline. Plain, picklable data."""

    run_id: str
    pass_id: str
    label: str
    point: dict[str, Any]
    trace: TraceSource
    policy: dict[str, Any]
    layout: dict[str, Any] | None  # None: chosen from the policy's output ("auto")
    device: dict[str, Any]
    model: dict[str, Any] | None  # simulated model geometry; None: the trace's own
    kv_dtype: str
    cache: dict[str, Any]  # replacement (spec), capacity (as written)
    pipeline: dict[str, Any]
    seed: int
    experiment: str
    record: dict[str, Any] = field(default_factory=dict)  # extra records (RecordSpec)

    def identity(self) -> dict[str, Any]:
        """Everything that determines the run's results (what ``run_id`` hashes)."""
        return {
            "trace": self.trace.key,
            "policy": self.policy,
            "layout": self.layout,
            "device": self.device,
            "model": self.model,
            "kv_dtype": self.kv_dtype,
            "cache": self.cache,
            "pipeline": self.pipeline,
            "seed": self.seed,
            **({"record": self.record} if self.record else {}),
        }


@dataclass
class PassGroup:
    """Runs sharing one policy pass (same trace, policy spec and seed)."""

    pass_id: str
    runs: list[RunPlan]


@dataclass
class Plan:
    """A validated experiment: its runs, traces and where results go."""

    config: ExperimentConfig  # the base config (its sweep block included)
    source: Path
    output_dir: Path
    runs: list[RunPlan]
    traces: dict[str, TraceSource] = field(default_factory=dict)
    axes: list[str] = field(default_factory=list)  # the sweep's dotted keys, in order

    @property
    def runs_dir(self) -> Path:
        return self.output_dir / RUNS_DIR

    def run_dir(self, run: RunPlan) -> Path:
        return self.runs_dir / run.run_id

    def is_complete(self, run: RunPlan) -> bool:
        return (self.run_dir(run) / RUN_SUMMARY).exists()

    def made_by_other_code(self, runs: list[RunPlan], code: str) -> int:
        """How many of these complete runs were made by a different kvsim source."""
        count = 0
        for run in runs:
            try:
                settings = yaml.safe_load((self.run_dir(run) / RUN_SETTINGS).read_text())
            except (OSError, yaml.YAMLError):
                continue
            count += isinstance(settings, dict) and settings.get("code") != code
        return count

    def unique_runs(self) -> list[RunPlan]:
        """Each distinct run once (a run an axis leaves unchanged is listed per point)."""
        unique: dict[str, RunPlan] = {}
        for run in self.runs:
            unique.setdefault(run.run_id, run)
        return list(unique.values())

    def groups(self, runs: list[RunPlan]) -> list[PassGroup]:
        """``runs`` grouped by policy pass, in plan order."""
        groups: dict[str, PassGroup] = {}
        planned: set[str] = set()
        for run in runs:
            if run.run_id not in planned:  # a run listed under several points runs once
                planned.add(run.run_id)
                groups.setdefault(run.pass_id, PassGroup(run.pass_id, [])).runs.append(run)
        return list(groups.values())


def code_fingerprint() -> str:
    """Hash of the kvsim source that decides a run's records (``sim/**/*.py`` except figures,
    plots, CLI and scheduling), stored with each run and keying the pass cache, so reusing
    results made by different code is flagged or avoided."""
    root = Path(__file__).resolve().parent
    sha = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(_PRESENTATION):
            continue  # drawing and scheduling never change a run's records
        sha.update(relative.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()[:12]


_PRESENTATION = ("figures/", "plots.py", "cli.py", "runner.py", "__main__.py")


def digest(payload: Any, length: int = 12) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# -- planning ---------------------------------------------------------------------------------


def load_raw(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of experiment settings at the top level")
    return data


def validate_config(data: dict[str, Any], where: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_error_line(exc, '', ExperimentConfig)}") from None


def plan(path: str | Path, output: str | Path | None = None) -> Plan:
    """Validate the experiment at ``path`` and every point of its sweep; raises ConfigError."""
    source = Path(path)
    raw = load_raw(source)
    base = validate_config(raw, str(source))
    validate_figure_specs(base.figures, str(source))
    points = expand(base.sweep, f"{source}: sweep")
    traces: dict[str, TraceSource] = {}
    runs: list[RunPlan] = []
    seen: set[tuple[str, str]] = set()
    for point in points:
        where = f"{source}" if not point else f"{source} [{describe_point(point)}]"
        config = validate_config(apply_point(raw, point, str(source)), where)
        in_point: dict[str, str] = {}
        for run in _plan_point(config, point, where, traces):
            if run.run_id in in_point:
                raise ConfigError(
                    f"{where}: runs {in_point[run.run_id]!r} and {run.label!r} have identical "
                    "settings"
                )
            in_point[run.run_id] = run.label
            # A run that an axis leaves unchanged (``full`` under ``policy.budget``) is planned
            # once and listed once per distinct remaining point.
            key = (run.run_id, json.dumps(run.point, sort_keys=True, default=str))
            if key not in seen:
                seen.add(key)
                runs.append(run)
    output_dir = Path(output or base.output or REPO_ROOT / "results" / base.name)
    axes = list(base.sweep.grid) + list(base.sweep.zip) if base.sweep else []
    return Plan(base, source, output_dir, runs, traces, axes)


def _layout_spec(value: Any, where: str) -> dict[str, Any] | None:
    if value is None or value == "auto":
        return None
    spec = {"type": value} if isinstance(value, str) else dict(value)
    # Build once with a dummy size so unknown layout names and parameters fail before any run.
    LAYOUTS.create({**spec, "max_positions": 1}, where=f"{where}.layout")
    return spec


def _as_spec(value: str | dict[str, Any]) -> dict[str, Any]:
    return {"type": value} if isinstance(value, str) else dict(value)


def _trace_source(config: ExperimentConfig, where: str) -> TraceSource:
    if config.trace.path is not None:
        path = Path(config.trace.path)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        if not (path / "manifest.json").exists():
            raise ConfigError(f"{where}: trace.path: no trace at {config.trace.path}")
        trace = open_trace(path)
        return TraceSource(
            key=f"path:{path.resolve()}", name=path.name, path=str(path.resolve()),
            prompt_len=trace.prompt_len,
        )
    spec = config.trace.capture.model_dump()
    try:
        settings = CaptureSettings(**spec)
        settings.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: trace.capture: {exc}") from None
    if settings.text.startswith("file:") and not Path(settings.text[5:]).expanduser().is_file():
        raise ConfigError(f"{where}: trace.capture.text: no file at {settings.text[5:]}")
    name = f"{settings.model}/{settings.text}/{settings.prompt_len}+{settings.decode_steps}"
    return TraceSource(
        key=settings.key(), name=name, capture=asdict(settings), prompt_len=settings.prompt_len
    )


def _plan_point(
    config: ExperimentConfig, point: dict[str, Any], where: str, traces: dict[str, TraceSource]
) -> list[RunPlan]:
    device = load_device(config.device)
    target = load_model_geometry(config.model, f"{where}: model") if config.model else None
    REPLACEMENTS.create(config.cache.replacement, where=f"{where}: cache.replacement")
    trace = _trace_source(config, where)
    traces.setdefault(trace.key, trace)
    runs: list[RunPlan] = []
    labels: set[str] = set()
    for index, entry in enumerate(config.policies):
        at = f"{where}: policies[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a mapping with a 'type' key, got {entry!r}")
        given = {k: v for k, v in entry.items() if k not in RUN_KEYS}
        cache = _override(CacheSpec, config.cache, entry.get("cache"), f"{at}.cache")
        pipeline = _override(PipelineSpec, config.pipeline, entry.get("pipeline"),
                             f"{at}.pipeline")
        REPLACEMENTS.create(cache.replacement, where=f"{at}.cache.replacement")
        policy = POLICIES.create(given, where=at)
        # every parameter, defaults filled in: {dynakv} and {dynakv, buffer_max: <default>} are
        # the same run and share one policy pass
        policy_spec = {"type": given["type"], **_parameters(policy)}
        label = str(entry.get("label", given["type"]))
        if label in labels:
            raise ConfigError(f"{at}: duplicate run label {label!r}; give each a distinct 'label'")
        labels.add(label)
        if policy.min_context() > trace.prompt_len:
            raise ConfigError(
                f"{at}.budget: {policy.min_context()} tokens exceeds the prompt "
                f"({trace.prompt_len} tokens)"
            )
        pass_key = {"trace": trace.key, "policy": policy_spec, "seed": config.seed}
        if getattr(policy, "device_aware", False):
            pass_key["device"] = device.model_dump()
        run = RunPlan(
            run_id="",
            pass_id=digest(pass_key),
            label=label,
            point=_applicable(point, policy_spec),
            trace=trace,
            policy=policy_spec,
            layout=_layout_spec(entry.get("layout"), at),
            device=device.model_dump(mode="json"),
            model=None if target is None else asdict(target),
            kv_dtype=config.kv_dtype,
            cache={
                "replacement": _as_spec(cache.replacement),
                "capacity": cache.capacity,
            },
            pipeline=pipeline.model_dump(),
            seed=config.seed,
            experiment=config.name,
            record=config.record.model_dump(exclude_defaults=True),
        )
        run.run_id = digest(run.identity())
        runs.append(run)
    return runs


def _parameters(policy: Any) -> dict[str, Any]:
    """A policy's constructor parameters and their values, as plain YAML/JSON data."""
    import dataclasses

    values = {}
    for item in dataclasses.fields(policy):
        if item.init:
            value = getattr(policy, item.name)
            values[item.name] = list(value) if isinstance(value, tuple) else value
    return values


def _override(model: type, base: Any, entry: Any, where: str) -> Any:
    """A policy entry's own ``cache`` / ``pipeline`` settings merged over the experiment's."""
    if entry is None:
        return base
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {entry!r}")
    try:
        return model.model_validate({**base.model_dump(), **entry})
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_error_line(exc, '', model)}") from None


def _applicable(point: dict[str, Any], policy_spec: dict[str, Any]) -> dict[str, Any]:
    """The point without ``policy.<param>`` axes that the policy does not have (``layout`` and
    ``label`` axes apply to every entry)."""
    return {
        key: value
        for key, value in point.items()
        if not key.startswith("policy.") or key.split(".")[1] in (*policy_spec, *RUN_KEYS)
    }


# -- one pass group (runs in a worker process) --------------------------------------------------


def cache_capacity_bytes(
    capacity: float | int | str | None,
    device: DeviceParams,
    target: ModelGeometry,
    n_positions: int,
    kv_dtype: str,
) -> int:
    """``cache.capacity`` in bytes: a size, a fraction of the full KV cache, or the preset's."""
    if capacity is None:
        return int(device.dram.kv_budget_bytes)
    if isinstance(capacity, str):
        return parse_size_bytes(capacity)
    if isinstance(capacity, float) and capacity <= 1.0:
        return int(capacity * n_positions * target.kv_bytes_per_token(kv_dtype))
    return int(capacity)


def pass_cache_dir() -> Path | None:
    """Where policy passes are kept for reuse across experiments: ``$KVSIM_PASS_CACHE``
    (``off`` disables it), else ``results/.pass-cache`` in the repository."""
    value = os.environ.get("KVSIM_PASS_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "none"):
        return None
    return Path(value).expanduser() if value else REPO_ROOT / "results" / ".pass-cache"


def _policy_pass(
    run: RunPlan, trace: Any, threads: int, cache_dir: str | None, code: str
) -> tuple[Any, bool]:
    """The run's policy pass, from the pass cache when an identical one is there (same pass
    settings, same trace files, same kvsim source); computed and stored otherwise."""
    from sim.policy_pass import run_policy_pass

    path = None
    if cache_dir:
        manifest = hashlib.sha256((Path(trace.path) / "manifest.json").read_bytes()).hexdigest()
        key = digest({"pass": run.pass_id, "trace": manifest, "code": code}, 20)
        path = Path(cache_dir) / f"{key}.pkl"
        if path.exists():
            try:
                with path.open("rb") as handle:
                    return pickle.load(handle), True
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
                pass  # unreadable entry: compute it again (and replace it)
    policy = POLICIES.create(run.policy, where=f"run {run.label}")
    pp = run_policy_pass(trace, policy, run.seed, progress=False, workers=threads)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as handle:
            pickle.dump(pp, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    return pp, False


def run_group(
    runs: list[RunPlan],
    trace_path: str,
    runs_dir: str,
    threads: int = 1,
    pass_cache: str | None = None,
) -> dict[str, Any]:
    """Obtain the group's policy pass once (computed, or from ``pass_cache``), replay it for
    each run, write each run's files.

    Returns ``{"pass_s", "pass_cached", "sim_s", "rows"}`` (``pass_s``: the pass's compute time,
    when it was computed). Runs complete one by one: a worker killed half-way keeps the runs it
    finished.
    """
    # imported here so a worker pays for the engine only when it has work
    from sim.metrics.records import summarize
    from sim.replay import SimSetup, simulate

    first = runs[0]
    trace = open_trace(trace_path)
    code = code_fingerprint()
    pp, cached = _policy_pass(first, trace, threads, pass_cache, code)
    extra = extra_records(pp, first.record, trace.model.n_layers)
    sim_s, rows = [], []
    for run in runs:
        target = ModelGeometry(**run.model) if run.model else trace.model
        if target.params_per_layer == 0:
            raise KvsimError(f"run {run.label}: model geometry {target.name!r} lacks "
                             "params_per_layer")
        device = DeviceParams.model_validate(run.device)
        capacity = cache_capacity_bytes(
            run.cache["capacity"], device, target, trace.n_positions, run.kv_dtype
        )
        layout = run.layout
        if layout is None:
            has_groups = any(sel.prefill_groups is not None for sel in pp.selections)
            layout = {"type": "cluster" if has_groups else "sequence"}
        setup = SimSetup(
            device=device,
            target=target,
            kv_dtype=run.kv_dtype,
            cache_capacity_bytes=capacity,
            replacement=dict(run.cache["replacement"]),
            layout=layout,
            pipeline=PipelineSpec(**run.pipeline),
        )
        sim = simulate(pp, setup, progress=False)
        row = {
            "run_id": run.run_id,
            **summarize(run.label, pp, sim),
            "trace": run.trace.name,
            "device": device.name,
            "model": target.name,
            **{key: _cell(value) for key, value in run.point.items()},
        }
        settings = {
            "experiment": run.experiment,
            "run": run.label,
            "run_id": run.run_id,
            "point": run.point,
            "trace": str(trace.path),
            "trace_key": run.trace.key,
            "seed": run.seed,
            "policy": run.policy,
            "layout": layout,
            "cache": {**run.cache, "capacity_bytes": capacity},
            "pipeline": run.pipeline,
            "model": asdict(target),
            "kv_dtype": run.kv_dtype,
            "record": run.record,
            "device": run.device,
            "timing_s": {"policy_pass": round(pp.wall_s, 3), "simulate": round(sim.wall_s, 3)},
            "code": code,
        }
        write_run(Path(runs_dir) / run.run_id, pp, sim, settings, row, extra)
        sim_s.append(sim.wall_s)
        rows.append(row)
    return {"pass_s": pp.wall_s, "pass_cached": cached, "sim_s": sim_s, "rows": rows}


def _cell(value: Any) -> Any:
    """A sweep value as a table cell (mappings and lists as compact JSON)."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()
    }


def extra_records(pp: Any, record: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """The optional records of :class:`sim.config.RecordSpec` (file name -> frame or array)."""
    import numpy as np

    from sim.config import RecordSpec
    from sim.metrics.clusters import labels_after, update_retrieval

    spec = RecordSpec(**record)
    out: dict[str, Any] = {}
    layer = spec.cluster_layer
    if layer is not None:
        if layer >= n_layers:
            raise KvsimError(f"record.cluster_layer: {layer} >= the trace's {n_layers} layers")
        selection = pp.selections[layer]
        head = spec.cluster_kv_head
        if selection.prefill_groups is not None and spec.cluster_steps:
            if head >= len(selection.prefill_groups):
                raise KvsimError(f"record.cluster_kv_head: {head} >= the trace's KV heads")
            frames = []
            for step in spec.cluster_steps:
                step = min(step, pp.decode_steps - 1)
                labels = labels_after(pp.prompt_len, selection, head, step)
                frames.append(pd.DataFrame({
                    "step": np.full(len(labels), step, dtype=np.int32),
                    "position": np.arange(len(labels), dtype=np.int32),
                    "group": labels.astype(np.int32),
                }))
            out["cluster_labels.parquet"] = pd.concat(frames, ignore_index=True)
        if selection.coretrieval is not None and head < len(selection.coretrieval):
            out["coretrieval.npy"] = np.asarray(selection.coretrieval[head])
    if spec.update_horizon:
        def tail(step: int) -> int:
            return pp.policy.kept_tail_start(pp.prompt_len, step)

        total = None
        for selection in pp.selections:
            counts = update_retrieval(pp.prompt_len, selection, spec.update_horizon, tail)
            if counts is not None:
                total = counts if total is None else total + counts
        if total is not None:
            out["update_retrieval.csv"] = pd.DataFrame({
                "within_steps": np.arange(1, spec.update_horizon + 1),
                "probability": total[1:] / max(int(total[0]), 1),
                "updates": int(total[0]),
            })
    return out


def write_run(
    run_dir: Path,
    pp: Any,
    sim: Any,
    settings: dict[str, Any],
    row: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """All files of one run, or none: written to a temporary sibling, then renamed."""
    import numpy as np

    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, data in (extra or {}).items():
            if name.endswith(".parquet"):
                data.to_parquet(tmp / name, index=False)
            elif name.endswith(".csv"):
                data.to_csv(tmp / name, index=False)
            else:
                np.save(tmp / name, data)
        pp.accuracy.to_parquet(tmp / "accuracy.parquet", index=False)
        if not pp.clusters.empty:
            pp.clusters.to_parquet(tmp / "clusters.parquet", index=False)
        sim.steps.to_parquet(tmp / "steps.parquet", index=False)
        sim.io_sizes.to_csv(tmp / "io_sizes.csv", index=False)
        sim.run_lengths.to_csv(tmp / "run_lengths.csv", index=False)
        (tmp / RUN_SETTINGS).write_text(yaml.safe_dump(settings, sort_keys=False))
        (tmp / RUN_SUMMARY).write_text(json.dumps(_json_safe(row), indent=1))
        shutil.rmtree(run_dir, ignore_errors=True)
        os.replace(tmp, run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(runs_dir: Path, max_age_s: float = 0.0) -> int:
    """Delete half-written run directories left by a killed worker; returns how many."""
    if not runs_dir.exists():
        return 0
    removed = 0
    now = time.time()
    for tmp in runs_dir.glob(".*.tmp-*"):
        if now - tmp.stat().st_mtime >= max_age_s:
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


# -- the summary table --------------------------------------------------------------------------


def read_summary(plan_: Plan) -> pd.DataFrame:
    """One row per completed run of the plan, in plan order (columns: run_id, run, the sweep
    axes, trace, device, model, then the metrics of :data:`sim.metrics.records.SUMMARY_COLUMNS`)."""
    from sim.metrics.records import SUMMARY_COLUMNS

    rows = []
    for run in plan_.runs:
        path = plan_.run_dir(run) / RUN_SUMMARY
        if path.exists():
            row = {k: v for k, v in json.loads(path.read_text()).items() if k not in plan_.axes}
            rows.append({**row, **{key: _cell(value) for key, value in run.point.items()}})
    leading = list(dict.fromkeys(["run_id", "run", *plan_.axes, "trace", "device", "model"]))
    columns = leading + [c for c in SUMMARY_COLUMNS if c not in leading]
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = pd.Series(dtype=float)
    extra = [c for c in frame.columns if c not in columns]
    return frame[columns + extra]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(plan_: Plan, summary: pd.DataFrame) -> None:
    atomic_write_text(plan_.output_dir / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(
        plan_.output_dir / "summary.md", summary.to_markdown(index=False, floatfmt=".4g") + "\n"
    )
