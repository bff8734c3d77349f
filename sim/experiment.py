"""From a validated experiment config to result files.

``resolve`` checks everything that can be checked before any work starts (device preset,
simulated model, cache, every policy/layout/replacement spec, the trace or its capture
settings, budgets against the context). ``execute`` then obtains the trace (capturing it once
and caching it), runs each policy, and writes each run's records into its own directory
atomically (a temporary directory renamed when complete), so an interrupted experiment never
leaves a half-written result behind.

Results layout (``<output>/``)::

    summary.csv, summary.md          one row per run (see sim.metrics.records)
    accuracy_vs_latency.png / .pdf   the plot
    runs/<run>/accuracy.parquet      (step, layer, q_head) accuracy records
    runs/<run>/clusters.parquet      (step, layer, kv_head) group count and intra-cluster
                                     variance (policies with groups only)
    runs/<run>/steps.parquet         per-step latency breakdown, I/O and DRAM records
    runs/<run>/io_sizes.csv          flash read command size distribution
    runs/<run>/run_lengths.csv       contiguous flash access lengths (entries)
    runs/<run>/run.yaml              the exact resolved settings of the run
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sim.config import ExperimentConfig, load_model_geometry, parse_size_bytes
from sim.engine import PolicyPass, SimSetup, run_policy_pass, simulate
from sim.errors import ConfigError
from sim.hardware import DeviceParams, load_device
from sim.kv.cache import REPLACEMENTS
from sim.kv.geometry import ModelGeometry
from sim.kv.layout import LAYOUTS
from sim.metrics.records import summarize, summary_table
from sim.paths import REPO_ROOT, TRACE_CACHE_DIR
from sim.policies import POLICIES
from sim.policies.base import RetrievalPolicy
from sim.trace.capture import CaptureSettings, get_or_capture
from sim.trace.format import Trace, open_trace

RUN_KEYS = ("label", "layout")  # keys of a policy entry that are not policy parameters


@dataclass
class Run:
    label: str
    policy: RetrievalPolicy
    policy_spec: dict[str, Any]
    layout_spec: dict[str, Any] | None  # None: chosen from the policy's output ("auto")


@dataclass
class ResolvedExperiment:
    config: ExperimentConfig
    source: Path
    device: DeviceParams
    target: ModelGeometry | None  # None: simulate the trace's own model
    runs: list[Run]
    output_dir: Path
    trace_path: Path | None
    capture: CaptureSettings | None


def _layout_spec(value: Any, where: str) -> dict[str, Any] | None:
    if value is None or value == "auto":
        return None
    spec = {"type": value} if isinstance(value, str) else dict(value)
    # Build once with a dummy size so unknown layout names and parameters fail before any run.
    LAYOUTS.create({**spec, "max_positions": 1}, where=where)
    return spec


def resolve(config: ExperimentConfig, source: Path) -> ResolvedExperiment:
    """Validate every part of ``config`` that needs no trace data; raises ConfigError."""
    where = str(source)
    device = load_device(config.device)
    target = load_model_geometry(config.model, f"{where}: model") if config.model else None
    REPLACEMENTS.create(config.cache.replacement, where=f"{where}: cache.replacement")
    runs: list[Run] = []
    for index, entry in enumerate(config.policies):
        at = f"{where}: policies[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a mapping with a 'type' key, got {entry!r}")
        policy_spec = {k: v for k, v in entry.items() if k not in RUN_KEYS}
        policy = POLICIES.create(policy_spec, where=at)
        label = str(entry.get("label", policy_spec["type"]))
        if any(run.label == label for run in runs):
            raise ConfigError(f"{at}: duplicate run label {label!r}; give each a distinct 'label'")
        runs.append(Run(label, policy, policy_spec, _layout_spec(entry.get("layout"), at)))
    trace_path: Path | None = None
    capture: CaptureSettings | None = None
    if config.trace.path is not None:
        trace_path = Path(config.trace.path)
        if not trace_path.is_absolute() and not trace_path.exists():
            trace_path = REPO_ROOT / trace_path
        if not (trace_path / "manifest.json").exists():
            raise ConfigError(f"{where}: trace.path: no trace at {config.trace.path}")
        prompt_len = open_trace(trace_path).prompt_len
    else:
        spec = config.trace.capture
        try:
            capture = CaptureSettings(**spec.model_dump())
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: trace.capture: {exc}") from None
        prompt_len = spec.prompt_len
    for index, run in enumerate(runs):
        if run.policy.min_context() > prompt_len:
            raise ConfigError(
                f"{where}: policies[{index}].budget: {run.policy.min_context()} tokens exceeds "
                f"the prompt ({prompt_len} tokens)"
            )
    output = Path(config.output) if config.output else REPO_ROOT / "results" / config.name
    return ResolvedExperiment(config, source, device, target, runs, output, trace_path, capture)


def obtain_trace(resolved: ResolvedExperiment, progress: bool) -> Trace:
    if resolved.trace_path is not None:
        return open_trace(resolved.trace_path)
    path = get_or_capture(resolved.capture, TRACE_CACHE_DIR, progress=progress)
    return open_trace(path)


def cache_capacity_bytes(
    config: ExperimentConfig, device: DeviceParams, target: ModelGeometry, n_positions: int
) -> int:
    capacity = config.cache.capacity
    if capacity is None:
        return int(device.dram.kv_budget_bytes)
    if isinstance(capacity, str):
        return parse_size_bytes(capacity)
    if isinstance(capacity, float) and capacity <= 1.0:
        return int(capacity * n_positions * target.kv_bytes_per_token(config.kv_dtype))
    return int(capacity)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_run(run_dir: Path, pp: PolicyPass, sim: Any, settings: dict[str, Any]) -> None:
    """All files of one run, or none: written to a temporary sibling, then renamed."""
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        pp.accuracy.to_parquet(tmp / "accuracy.parquet", index=False)
        if not pp.clusters.empty:
            pp.clusters.to_parquet(tmp / "clusters.parquet", index=False)
        sim.steps.to_parquet(tmp / "steps.parquet", index=False)
        sim.io_sizes.to_csv(tmp / "io_sizes.csv", index=False)
        sim.run_lengths.to_csv(tmp / "run_lengths.csv", index=False)
        (tmp / "run.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        shutil.rmtree(run_dir, ignore_errors=True)
        os.replace(tmp, run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def execute(
    resolved: ResolvedExperiment,
    progress: bool = True,
    log=lambda message: print(message, file=sys.stderr),
) -> pd.DataFrame:
    """Run every policy of the experiment; returns the summary table (also written)."""
    config = resolved.config
    trace = obtain_trace(resolved, progress)
    target = resolved.target or trace.model
    if target.params_per_layer == 0:
        raise ConfigError(
            f"{resolved.source}: model: geometry {target.name!r} lacks params_per_layer"
        )
    capacity = cache_capacity_bytes(config, resolved.device, target, trace.n_positions)
    full_kv = trace.n_positions * target.kv_bytes_per_token(config.kv_dtype)
    log(
        f"trace {trace.path.name}: {trace.model.name}, {trace.prompt_len} prompt + "
        f"{trace.decode_steps} decode tokens; simulating {target.name} ({config.kv_dtype}) on "
        f"{resolved.device.name}; KV cache {full_kv / 1e6:.1f} MB, DRAM budget "
        f"{capacity / 1e6:.1f} MB ({capacity / full_kv:.1%})"
    )
    windows = trace.manifest["model"].get("sliding_window") or []
    if any(w is not None for w in windows):
        # Not modelled yet: the accuracy reference and the policies see the whole context.
        log(
            f"warning: {trace.model.name} has sliding-window layers; kvsim treats every layer "
            "as global attention over the whole context"
        )
    runs_dir = resolved.output_dir / "runs"  # created by the first completed run
    rows = []
    for run in resolved.runs:
        pp = run_policy_pass(trace, run.policy, config.seed, progress=progress)
        layout = run.layout_spec
        if layout is None:
            has_groups = any(sel.prefill_groups is not None for sel in pp.selections)
            layout = {"type": "cluster" if has_groups else "sequence"}
        setup = SimSetup(
            device=resolved.device,
            target=target,
            kv_dtype=config.kv_dtype,
            cache_capacity_bytes=capacity,
            replacement=_as_spec(config.cache.replacement),
            layout=layout,
            pipeline=config.pipeline,
        )
        sim = simulate(pp, setup, progress=progress)
        settings = {
            "experiment": config.name,
            "run": run.label,
            "seed": config.seed,
            "trace": str(trace.path),
            "policy": run.policy_spec,
            "layout": layout,
            "cache": {"replacement": setup.replacement, "capacity_bytes": capacity},
            "pipeline": config.pipeline.model_dump(),
            "model": target.__dict__,
            "kv_dtype": config.kv_dtype,
            "device": resolved.device.model_dump(),
        }
        _write_run(runs_dir / run.label, pp, sim, settings)
        rows.append(summarize(run.label, pp, sim))
        log(
            f"  {run.label}: policy pass {pp.wall_s:.1f} s, simulation {sim.wall_s:.1f} s, "
            f"recall {rows[-1]['attention_recall_mean']:.3f}, "
            f"latency {rows[-1]['latency_ms_mean']:.2f} ms/token"
        )
    summary = summary_table(rows)
    tmp = resolved.output_dir / f".summary.csv.tmp-{os.getpid()}"
    summary.to_csv(tmp, index=False)
    os.replace(tmp, resolved.output_dir / "summary.csv")
    _atomic_write_text(
        resolved.output_dir / "summary.md", summary.to_markdown(index=False, floatfmt=".4g") + "\n"
    )
    return summary


def _as_spec(value: str | dict[str, Any]) -> dict[str, Any]:
    return {"type": value} if isinstance(value, str) else dict(value)
