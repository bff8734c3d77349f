"""Running one pass group in a worker: the shared policy pass once, then each run's replay
and result files.

This is what a worker process imports (:func:`run_group`); it needs the engine, never the
figures or matplotlib (checked by ``tests/test_runner.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sim.atomic import atomic_write
from sim.config import PipelineSpec, RecordIoSpec, kv_size_bytes
from sim.errors import KvsimError
from sim.experiment.extra_records import extra_records
from sim.experiment.group_progress import GroupProgress, ProgressFile
from sim.experiment.runs import RunPlan, code_fingerprint, digest
from sim.experiment.store import summary_cell, write_run
from sim.hardware import DeviceParams
from sim.model import ModelGeometry
from sim.outputs import PolicyPass
from sim.paths import REPO_ROOT
from sim.policies import POLICIES
from sim.trace.format import open_trace
from sim.trace.split import split_trace
from sim.trace.verified import check_unchanged, verify_once


def cache_capacity_bytes(
    capacity: float | str | None,
    device: DeviceParams,
    target: ModelGeometry,
    n_positions: int,
    kv_dtype: str,
) -> int:
    """``cache.capacity`` in bytes: a size string, a fraction of the full KV cache (a number,
    validated in (0, 1] by :class:`sim.config.CacheSpec`), or the preset's."""
    if capacity is None:
        return int(device.dram.kv_budget_bytes)
    return kv_size_bytes(capacity, n_positions, target.kv_bytes_per_token(kv_dtype))


def pass_cache_dir() -> Path | None:
    """Where policy passes are kept for reuse across experiments: ``$KVSIM_PASS_CACHE``
    (``off`` disables it), else ``results/.pass-cache`` in the repository."""
    value = os.environ.get("KVSIM_PASS_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "none"):
        return None
    return Path(value).expanduser() if value else REPO_ROOT / "results" / ".pass-cache"


def _policy_pass(
    run: RunPlan,
    trace: Any,
    threads: int,
    cache_dir: str | None,
    code: str,
    on_layer: Callable[[], None] | None = None,
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
                    cached = pickle.load(handle)
            except Exception:  # noqa: BLE001 - any unreadable entry is a miss, whatever broke
                cached = None
            if isinstance(cached, PolicyPass) and cached.decode_steps == trace.decode_steps:
                return cached, True
            # unreadable, or not a policy pass of this trace: compute it again (and replace it)
    policy = POLICIES.create(run.policy, where=f"run {run.label}")
    pp = run_policy_pass(
        trace, policy, run.seed, progress=False, workers=threads,
        accuracy_every=run.accuracy_every, on_layer=on_layer,
    )
    if path is not None:
        try:
            with atomic_write(path) as tmp, tmp.open("wb") as handle:
                pickle.dump(pp, handle, protocol=pickle.HIGHEST_PROTOCOL)
        except KvsimError:  # a full disk, a read-only cache: the cache is an optimisation only
            pass
    return pp, False


def run_group(
    runs: list[RunPlan],
    trace_path: str,
    runs_dir: str,
    threads: int = 1,
    pass_cache: str | None = None,
    progress_file: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    verified: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Obtain the group's policy pass once (computed, or from ``pass_cache``), replay it for
    each run, write each run's files.

    The trace is replayed from ``trace.decode_from`` when the runs split it
    (:func:`sim.trace.split.split_trace`). Progress (the pass's layers, each replay's steps)
    goes to ``progress_file`` (a :class:`~sim.experiment.group_progress.ProgressFile`, for a
    worker process) or ``on_progress`` (in-process), see :mod:`sim.experiment.group_progress`.

    ``verified``: the trace's fingerprint when the coordinator verified it
    (:func:`sim.trace.verified.verify_once`); the trace must still have it. Without it the
    trace is verified here (once: the verdict is remembered).

    Returns ``{"pass_s", "pass_cached", "sim_s", "rows"}`` (``pass_s``: the pass's compute time,
    when it was computed). Runs complete one by one: a worker killed half-way keeps the runs it
    finished.
    """
    # imported here so a worker pays for the engine only when it has work
    from sim.footprint import resolve_cache_capacity
    from sim.metrics.records import summarize
    from sim.replay import SimSetup, simulate

    first = runs[0]
    trace = open_trace(trace_path)
    if verified is None:
        verify_once(trace)
    else:
        check_unchanged(trace, verified)
    if first.trace.decode_from is not None:
        trace = split_trace(trace, first.trace.decode_from)
    sink = on_progress or (ProgressFile(progress_file) if progress_file else None)
    tracker = GroupProgress(sink)
    code = code_fingerprint()
    tracker.start(first.label, "policy pass", trace.model.n_layers, "layer")
    pp, cached = _policy_pass(first, trace, threads, pass_cache, code, tracker.advance)
    # the record: block is not part of the pass (a sweep over it shares one), so each run's
    # extra records come from its own block, computed once per distinct block
    extras: dict[str, dict[str, Any]] = {}
    sim_s, rows = [], []
    for run in runs:
        target = ModelGeometry(**run.model) if run.model else trace.model
        if target.params_per_layer == 0:
            raise KvsimError(f"run {run.label}: model geometry {target.name!r} lacks "
                             "params_per_layer")
        device = DeviceParams.model_validate(run.device)
        layout = run.layout
        if layout is None:
            has_groups = any(sel.prefill_groups is not None for sel in pp.selections)
            layout = {"type": "cluster" if has_groups else "sequence"}
        setup = SimSetup(
            device=device,
            target=target,
            kv_dtype=run.kv_dtype,
            cache_capacity_bytes=0,
            replacement=dict(run.cache["replacement"]),
            layout=layout,
            pipeline=PipelineSpec(**run.pipeline),
        )
        dram_target = None
        if "dram_total" in run.cache:
            # equal total DRAM: the cache gets what the policy's index, window, buffers and
            # dense layers leave of the target (sim.footprint)
            dram_target = kv_size_bytes(run.cache["dram_total"], trace.n_positions,
                                        target.kv_bytes_per_token(run.kv_dtype))
            capacity = resolve_cache_capacity(pp, setup, dram_target, f"run {run.label}")
        else:
            capacity = cache_capacity_bytes(
                run.cache["capacity"], device, target, trace.n_positions, run.kv_dtype
            )
        setup = replace(setup, cache_capacity_bytes=capacity)
        tracker.start(run.label, "replay", pp.decode_steps, "step")
        record_io = RecordIoSpec(**run.record_io) if run.record_io else None
        sim = simulate(pp, setup, progress=False, on_step=tracker.advance, record_io=record_io)
        row = {
            "run_id": run.run_id,
            **summarize(run.label, pp, sim, dram_target),
            "trace": run.trace.name,
            "device": device.name,
            "model": target.name,
            **{key: summary_cell(value) for key, value in run.point.items()},
        }
        settings = {
            "experiment": run.experiment,
            "run": run.label,
            "run_id": run.run_id,
            "point": run.point,
            "trace": str(trace.path),
            "trace_key": run.trace.key,
            **({} if run.trace.decode_from is None
               else {"decode_from": run.trace.decode_from}),
            **({} if run.accuracy_every == 1 else {"accuracy_every": run.accuracy_every}),
            "seed": run.seed,
            "policy": run.policy,
            "layout": layout,
            "cache": {
                **run.cache, "capacity_bytes": capacity,
                **({} if dram_target is None else {"dram_total_bytes": dram_target}),
            },
            "pipeline": run.pipeline,
            "model": asdict(target),
            "kv_dtype": run.kv_dtype,
            "record": run.record,
            **({"record_io": run.record_io} if run.record_io else {}),
            "device": run.device,
            "timing_s": {"policy_pass": round(pp.wall_s, 3), "simulate": round(sim.wall_s, 3)},
            "code": code,
        }
        record_key = json.dumps(run.record, sort_keys=True)
        if record_key not in extras:
            extras[record_key] = extra_records(pp, run.record, trace)
        extra = extras[record_key]
        if sim.io_schedule is not None:
            sim.io_schedule.meta.update(run_id=run.run_id, code=code)
            extra = {**extra, **sim.io_schedule.files()}
        write_run(Path(runs_dir) / run.run_id, pp, sim, settings, row, extra)
        sim_s.append(sim.wall_s)
        rows.append(row)
    return {"pass_s": pp.wall_s, "pass_cached": cached, "sim_s": sim_s, "rows": rows}
