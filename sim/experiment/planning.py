"""From an experiment YAML to a validated plan of runs (nothing runs, nothing is written).

An experiment is a base config plus an optional ``sweep:`` (see :mod:`sim.sweep`). :func:`plan`
expands the sweep, validates every point as if it had been written by hand (device preset and
overrides, simulated model, cache, every policy/layout/replacement spec, the trace or its capture
settings, budgets against the context) and the experiment's ``figures:`` (and the records they
are drawn from), and turns each (point, policy entry) into a
:class:`~sim.experiment.runs.RunPlan` named by a hash of its resolved settings. Then, against
every trace that exists (its manifest, no arrays), :func:`check_against_trace` checks what
each run needs from it: the policy's data (prompt or speculative queries) and geometry, the
``record:`` block's layer and head, a simulated model with a known dense compute; a trace
still to be captured is checked the same way as soon as it is (:meth:`Plan.check_traces`).
Nothing runs and nothing is written before the whole plan is valid.

Runs that share a trace, a policy spec and a seed share one policy pass (selections and accuracy
do not depend on the device, cache or layout): :meth:`Plan.groups` gathers them into
:class:`~sim.experiment.runs.PassGroup` s, the unit of work of :mod:`sim.experiment.pass_group`.

A total DRAM target (``cache.dram_total``) is checked against a lower bound of what each policy
holds without a cache (:func:`check_dram_totals`) as soon as the trace's shape is known: here
for trace directories and captures already cached, by the runner for the others once they
are captured, in either case before any run starts.

Planning runs in the coordinating process only: it validates figure specs, so it imports the
figures (and matplotlib), which workers never need.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sim.atomic import unwritable
from sim.config import (
    CacheSpec,
    ClosedLoopSpec,
    ExperimentConfig,
    PipelineSpec,
    RecordSpec,
    kv_size_bytes,
    load_model_geometry,
)
from sim.errors import CaptureError, ConfigError
from sim.experiment.runs import PassGroup, RunPlan, TraceSource, digest
from sim.figures.base import validate_figure_specs
from sim.hardware import load_device
from sim.hardware.device import DeviceParams, is_device_file
from sim.kv.layouts import LAYOUTS
from sim.kv.replacement import REPLACEMENTS
from sim.model import ModelGeometry
from sim.paths import REPO_ROOT, trace_cache_dir
from sim.policies import POLICIES
from sim.policies.base import RetrievalPolicy
from sim.result_files import RUN_SETTINGS, RUN_SUMMARY, RUNS_DIR
from sim.sweep import RUN_KEYS, apply_point, describe_point, expand
from sim.trace.capture import CaptureSettings
from sim.trace.format import Trace, open_trace
from sim.trace.sources import load_text, source_name
from sim.trace.split import check_decode_from, split_trace
from sim.validation import pydantic_error_line
from sim.yaml_input import read_yaml


@dataclass
class Plan:
    """A validated experiment: its runs, traces and where results go."""

    config: ExperimentConfig  # the base config (its sweep block included)
    source: Path
    output_dir: Path
    runs: list[RunPlan]
    traces: dict[str, TraceSource] = field(default_factory=dict)
    axes: list[str] = field(default_factory=list)  # the sweep's dotted keys, in order
    #: keys of the traces whose runs passed :func:`check_against_trace` (planning checks the
    #: traces that exist; :meth:`check_traces` the ones captured afterwards)
    checked: set[str] = field(default_factory=set)

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

    def check_traces(self, paths: dict[str, str]) -> None:
        """:func:`check_against_trace` for every trace not checked yet (those captured after
        planning), given trace key -> directory; before any run starts or anything is written."""
        for key, path in paths.items():
            if key not in self.checked:
                check_against_trace(self, key, _opened(path, self.traces[key].decode_from))

    def groups(self, runs: list[RunPlan]) -> list[PassGroup]:
        """``runs`` grouped by policy pass, in plan order."""
        groups: dict[str, PassGroup] = {}
        planned: set[str] = set()
        for run in runs:
            if run.run_id not in planned:  # a run listed under several points runs once
                planned.add(run.run_id)
                groups.setdefault(run.pass_id, PassGroup(run.pass_id, [])).runs.append(run)
        return list(groups.values())


# -- planning ---------------------------------------------------------------------------------


def load_raw(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of experiment settings at the top level")
    return data


def validate_config(data: dict[str, Any], where: str) -> ExperimentConfig:
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_error_line(exc, '', ExperimentConfig)}") from None
    problem = config.layout_problem()
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    return config


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
        validate_figure_specs(config.figures, where, config.record,
                              config.closed_loop.task if config.closed_loop else None)
        in_point: dict[str, str] = {}
        planned = (_plan_closed_loop(config, point, where) if config.closed_loop is not None
                   else _plan_point(config, point, where, traces, source.parent))
        for run in planned:
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
    # the results directory must be one kvsim can make and write into: found now, not after
    # minutes of capture and runs
    problem = unwritable(output_dir)
    if problem is not None:
        given = "--output" if output else "output" if base.output else "name (results/NAME)"
        raise ConfigError(f"{source}: {given}: cannot write results there: {problem}")
    axes = list(base.sweep.grid) + list(base.sweep.zip) if base.sweep else []
    result = Plan(base, source, output_dir, runs, traces, axes)
    known = _known_trace_paths(traces)
    result.check_traces(known)
    if any("dram_total" in run.cache for run in runs):
        check_dram_totals(result, known)
    return result


def _known_trace_paths(traces: dict[str, TraceSource]) -> dict[str, str]:
    """The directories of the traces that exist already: given paths and cached captures."""
    paths = {}
    for key, source in traces.items():
        if source.path is not None:
            paths[key] = source.path
        else:
            assert source.capture is not None  # a TraceSource has a path or capture settings
            cached = trace_cache_dir() / CaptureSettings(**source.capture).key()
            if (cached / "manifest.json").exists():
                paths[key] = str(cached)
    return paths


def check_dram_totals(plan: Plan, trace_paths: dict[str, str]) -> None:
    """Raise ConfigError (one line naming the run, its policy and the minimum) for the first
    run whose ``cache.dram_total`` is below a lower bound of what its policy holds in DRAM
    without a cache (:func:`sim.footprint.floor_lower_bound`); runs whose trace is not in
    ``trace_paths`` (not captured yet) are skipped. The exact minimum is checked after the
    policy pass (:func:`sim.footprint.resolve_cache_capacity`)."""
    from sim.footprint import below_floor, floor_lower_bound
    from sim.policy_pass import sliding_windows

    opened: dict[str, Any] = {}
    for run in plan.unique_runs():
        path = trace_paths.get(run.trace.key)
        if "dram_total" not in run.cache or path is None:
            continue
        if path not in opened:
            opened[path] = open_trace(path)
        trace = opened[path]
        target = ModelGeometry(**run.model) if run.model else trace.model
        per_token = target.kv_bytes_per_token(run.kv_dtype)
        wanted = kv_size_bytes(run.cache["dram_total"], trace.n_positions, per_token)
        policy = POLICIES.create(run.policy, where=f"run {run.label}")
        floor = floor_lower_bound(
            policy, trace.model, sliding_windows(trace), run.trace.prompt_len,
            trace.n_positions - run.trace.prompt_len, target, run.kv_dtype,
            bool(run.pipeline["stream_index"]),
        )
        if wanted < floor:
            where = f"{plan.source} [{describe_point(run.point)}]: {run.label}"
            raise below_floor(where, policy.name, wanted, floor,
                              trace.n_positions * per_token, exact=False)


def _opened(path: str | Path, decode_from: int | None) -> Trace:
    trace = open_trace(path)
    return trace if decode_from is None else split_trace(trace, decode_from)


def check_against_trace(plan: Plan, key: str, trace: Trace) -> None:
    """The checks of the plan's runs on trace ``key`` that need the trace's own facts (its
    geometry, stored queries and decode steps; nothing of its arrays is read): each policy's
    :meth:`~sim.policies.base.RetrievalPolicy.trace_problem`, the ``record:`` block against the
    trace's layers and KV heads, and a simulated model whose dense compute is known. Raises
    one-line ConfigError naming the run."""
    checked: set[str] = set()  # (policy pass, record) pairs: each is checked once
    for run in plan.unique_runs():
        if run.trace.key != key:
            continue
        point = f" [{describe_point(run.point)}]" if run.point else ""
        where = f"{plan.source}{point}: run {run.label!r}"
        pair = json.dumps([run.pass_id, run.record], sort_keys=True, default=str)
        if pair not in checked:
            checked.add(pair)
            problem = POLICIES.create(run.policy, where=where).trace_problem(trace)
            problem = problem or _record_problem(RecordSpec(**run.record), trace)
            if problem:
                raise ConfigError(f"{where}: {problem}")
        target = ModelGeometry(**run.model) if run.model else trace.model
        if target.params_per_layer == 0:
            raise ConfigError(
                f"{where}: model {target.name!r} has no params_per_layer, which the dense "
                "compute needs (set model: to a geometry of configs/models)"
            )
    plan.checked.add(key)


def _record_problem(record: RecordSpec, trace: Trace) -> str | None:
    """Why the ``record:`` block cannot be recorded on ``trace``, or ``None``."""
    if record.cluster_layer is None:
        return None
    model = trace.model
    if record.cluster_layer >= model.n_layers:
        return (
            f"record.cluster_layer: {record.cluster_layer} >= the trace's {model.n_layers} "
            "layers"
        )
    if record.cluster_kv_head >= model.n_kv_heads:
        return (
            f"record.cluster_kv_head: {record.cluster_kv_head} >= the trace's "
            f"{model.n_kv_heads} KV heads"
        )
    return None


def _layout_spec(value: Any, where: str) -> dict[str, Any] | None:
    if value is None or value == "auto":
        return None
    if not isinstance(value, (str, dict)):
        raise ConfigError(f"{where}.layout: expected a layout name or a mapping with a 'type' "
                          f"key, got {value!r}")
    spec = {"type": value} if isinstance(value, str) else dict(value)
    # Build once with a dummy size so unknown layout names and parameters fail before any run.
    LAYOUTS.create({**spec, "n_positions": 1}, where=f"{where}.layout")
    return spec


def _as_spec(value: str | dict[str, Any]) -> dict[str, Any]:
    return {"type": value} if isinstance(value, str) else dict(value)


def _trace_source(config: ExperimentConfig, where: str) -> TraceSource:
    """The trace a point replays, its split (``trace.decode_from``) checked against the
    trace's positions and stored queries (from its manifest, or its capture settings)."""
    assert config.trace is not None  # a closed-loop config is planned by _plan_closed_loop
    decode_from = config.trace.decode_from
    if config.trace.path is not None:
        path = Path(config.trace.path)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        if not (path / "manifest.json").exists():
            raise ConfigError(f"{where}: trace.path: no trace at {config.trace.path}")
        trace = open_trace(path)
        source = TraceSource(
            key=f"path:{path.resolve()}", name=path.name, path=str(path.resolve()),
            prompt_len=trace.prompt_len,
        )
        n_positions, query_start = trace.n_positions, trace.query_start
    else:
        # TraceSpec holds exactly one of path and capture (validated when the config was loaded)
        assert config.trace.capture is not None
        spec = config.trace.capture.model_dump()
        try:
            settings = CaptureSettings(**spec)
            settings.validate()
        except (TypeError, ValueError, CaptureError) as exc:
            raise ConfigError(f"{where}: trace.capture: {exc}") from None
        if settings.text.startswith("file:"):
            try:  # what a capture would read: a file, a glob or a comma-separated list of them
                load_text(settings.text)
            except CaptureError as exc:
                raise ConfigError(f"{where}: trace.capture.text: {exc}") from None
        name = f"{settings.model}/{settings.text}/{settings.prompt_len}+{settings.decode_steps}"
        if settings.mode != "generate" or settings.sampling != "greedy":
            name += f" ({settings.mode}, {settings.sampling})"
        source = TraceSource(
            key=settings.key(), name=name, capture=asdict(settings),
            prompt_len=settings.prompt_len,
        )
        n_positions = settings.prompt_len + settings.decode_steps
        query_start = settings.query_start
    if decode_from is None:
        return source
    problem = check_decode_from(decode_from, n_positions, query_start, "trace.decode_from")
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    return replace(
        source, name=split_name(source.name, decode_from), prompt_len=decode_from,
        decode_from=decode_from,
    )


def split_name(name: str, decode_from: int) -> str:
    """A split trace's name in tables and legends: ``<trace>@<decode_from>``."""
    return f"{name}@{decode_from}"


def _check_speculative(policy: Any, trace: TraceSource, at: str) -> None:
    """A policy that reads speculative queries (InfiniGen) cannot run on a split before the
    captured prompt's end: the trace stores them for its captured decode steps only."""
    if not getattr(policy, "needs_speculative_queries", False) or trace.decode_from is None:
        return
    if trace.capture:
        captured = trace.capture["prompt_len"]
    else:
        assert trace.path is not None  # a TraceSource has a path or capture settings
        captured = open_trace(trace.path).prompt_len
    if trace.decode_from < captured:
        raise ConfigError(
            f"{at}: {policy.name} needs speculative queries, which the trace stores from "
            f"position {captured} on; trace.decode_from {trace.decode_from} is earlier"
        )


def _device_file(text: str, where: str, experiment_dir: Path) -> str:
    """A device file named by a relative path: found from the current directory, else beside
    the experiment, else in the repository (as ``trace.path``); refused in one line if none."""
    path = Path(text)
    if path.is_absolute() or path.exists():
        return text
    for base in (experiment_dir, REPO_ROOT):
        if (base / path).exists():
            return str(base / path)
    raise ConfigError(
        f"{where}: device: no such file {text!r} (a relative path is looked up from the current "
        "directory, the experiment's directory and the kvsim repository)"
    )


def _device_spec(spec: Any, where: str, experiment_dir: Path) -> Any:
    """``device:`` with a relative device file (``device: phone.yaml`` or ``{preset:
    phone.yaml, ...}``, as written by ``kvsim calibrate``) resolved (see :func:`_device_file`);
    preset names and mappings without a file are returned as given."""
    if isinstance(spec, str) and is_device_file(spec):
        return _device_file(spec, where, experiment_dir)
    if isinstance(spec, dict) and isinstance(spec.get("preset"), str) and is_device_file(
        spec["preset"]
    ):
        return {**spec, "preset": _device_file(spec["preset"], where, experiment_dir)}
    return spec


def _plan_point(
    config: ExperimentConfig, point: dict[str, Any], where: str, traces: dict[str, TraceSource],
    experiment_dir: Path,
) -> list[RunPlan]:
    device = load_device(_device_spec(config.device, where, experiment_dir))
    target = load_model_geometry(config.model, f"{where}: model") if config.model else None
    REPLACEMENTS.create(config.cache.replacement, where=f"{where}: cache.replacement")
    trace = _trace_source(config, where)
    traces.setdefault(trace.key, trace)
    runs: list[RunPlan] = []
    labels: set[str] = set()
    for index, entry in enumerate(config.policies):  # mappings: ExperimentConfig checks
        at = f"{where}: policies[{index}]"
        given = {k: v for k, v in entry.items() if k not in RUN_KEYS}
        cache = _override(CacheSpec, config.cache, entry.get("cache"), f"{at}.cache")
        pipeline = _override(PipelineSpec, config.pipeline, entry.get("pipeline"),
                             f"{at}.pipeline")
        REPLACEMENTS.create(cache.replacement, where=f"{at}.cache.replacement")
        policy, policy_spec, label = _entry_policy(entry, given, at, labels)
        _check_speculative(policy, trace, at)
        _check_budget(policy, trace.prompt_len, at)
        pass_key = {**trace.identity(), "policy": policy_spec, "seed": config.seed}
        if config.accuracy_every != 1:
            pass_key["accuracy_every"] = config.accuracy_every
        run = RunPlan(
            run_id="",
            pass_id=digest(pass_key),
            label=label,
            point=_applicable(point, policy_spec),
            trace=trace,
            policy=policy_spec,
            layout=_layout_spec(entry.get("layout"), at),
            device=_device_settings(device),
            model=None if target is None else asdict(target),
            kv_dtype=config.kv_dtype,
            cache=_cache_settings(cache),
            pipeline=pipeline.model_dump(),
            seed=config.seed,
            experiment=config.name,
            record=config.record.model_dump(exclude_defaults=True),
            accuracy_every=config.accuracy_every,
            record_io={} if config.record_io is None else config.record_io.model_dump(),
        )
        run.run_id = digest(run.identity())
        runs.append(run)
    return runs


def _plan_closed_loop(
    config: ExperimentConfig, point: dict[str, Any], where: str
) -> list[RunPlan]:
    """The runs of one point of a closed-loop experiment: one per policy entry, each checked
    against the model's context and its own length (the text's length is checked once its
    tokenizer is loaded, :func:`sim.experiment.closed_loop.check_texts`)."""
    from sim.trace.models import MODELS

    spec = config.closed_loop
    assert spec is not None  # called for closed-loop configs only
    known = MODELS.get(spec.model)
    if known is None:
        raise ConfigError(f"{where}: closed_loop.model: unknown model {spec.model!r}; valid: "
                          f"{', '.join(MODELS)}")
    if spec.task == "needle":
        task = _needle_task(spec, known.max_positions, where)
        prompt_len = task["context_len"]
        name = f"{spec.model}/{spec.text}/{prompt_len} ({len(task['depths'])} needles)"
    else:
        total = spec.prompt_len + spec.tokens
        if total > known.max_positions:
            raise ConfigError(
                f"{where}: closed_loop.tokens: prompt_len + tokens = {total} exceeds "
                f"{spec.model}'s {known.max_positions} positions"
            )
        # the needle task's keys are left out: runs keep the ids they had before it existed
        task = spec.model_dump(exclude={"context_len", "depths"})
        if spec.task in ("perplexity", "generation") and task["bucket"] is None:
            task["bucket"] = DEFAULT_BUCKET
        if spec.task == "generation":
            task["recall_every"] = task["recall_every"] or DEFAULT_RECALL_EVERY
        else:  # not a setting of the other tasks: their run ids stay as they were
            del task["recall_every"]
        prompt_len = spec.prompt_len
        name = f"{spec.model}/{spec.text}/{spec.prompt_len}+{spec.tokens} ({spec.task})"
    try:
        source_name(spec.text)
        if spec.text.startswith("file:"):
            load_text(spec.text)
    except CaptureError as exc:
        raise ConfigError(f"{where}: closed_loop.text: {exc}") from None
    task = _save_trace_setting(task, where)
    # the prompt the runs share (a needle context: the task and the seed its facts are drawn
    # from); the runner sends runs sharing one to the workers one after another
    prompt = ({k: task[k] for k in ("model", "text", "prompt_len")} if spec.task != "needle"
              else {**task, "seed": config.seed})
    trace = TraceSource(key="closed_loop:" + digest(prompt), name=name, prompt_len=prompt_len)
    runs: list[RunPlan] = []
    labels: set[str] = set()
    for index, entry in enumerate(config.policies):  # mappings: ExperimentConfig checks
        at = f"{where}: policies[{index}]"
        open_loop = [key for key in ("layout", "cache", "pipeline") if key in entry]
        if open_loop:
            raise ConfigError(f"{at}.{open_loop[0]}: applies to trace replays, not to "
                              "closed_loop")
        given = {k: v for k, v in entry.items() if k not in RUN_KEYS}
        policy, policy_spec, label = _entry_policy(entry, given, at, labels)
        _check_budget(policy, prompt_len, at)
        run = RunPlan(
            run_id="", pass_id="", label=label, point=_applicable(point, policy_spec),
            trace=trace, policy=policy_spec, layout=None, device={}, model=None,
            kv_dtype=config.kv_dtype, cache={}, pipeline={}, seed=config.seed,
            experiment=config.name, closed_loop=task,
        )
        # each run is its own unit of work (spread over workers); a worker reuses the model,
        # the prompt's prefill and full attention's reference across the runs it is given
        run.run_id = digest(run.identity())
        run.pass_id = run.run_id
        runs.append(run)
    return runs


#: the closed-loop tasks whose runs can save their own trace (``closed_loop.save_trace``)
SAVES_TRACE = ("perplexity", "agreement")


def _save_trace_setting(task: dict[str, Any], where: str) -> dict[str, Any]:
    """``task`` with ``closed_loop.save_trace`` checked: left out when off (runs keep the ids
    they had before the option), ``True``, or a directory (made absolute, as ``output:`` is
    relative to the working directory) that can be made and written into."""
    task = dict(task)
    save = task.pop("save_trace", False)
    if save is False:
        return task
    if task["task"] not in SAVES_TRACE:
        raise ConfigError(f"{where}: closed_loop.save_trace: applies to task "
                          f"{' or '.join(SAVES_TRACE)}, not {task['task']}")
    if task["tokens"] < 2:
        raise ConfigError(f"{where}: closed_loop.save_trace: a trace needs a decode step; give "
                          "tokens >= 2")
    if isinstance(save, str):
        if not save.strip():
            raise ConfigError(f"{where}: closed_loop.save_trace: give true or a directory")
        path = Path(save).expanduser().absolute()
        problem = unwritable(path, margin=len(".partial-") + 10)
        if problem is not None:
            raise ConfigError(f"{where}: closed_loop.save_trace: cannot write {path}: {problem}")
        save = str(path)
    return {**task, "save_trace": save}


def _needle_task(spec: ClosedLoopSpec, max_positions: int, where: str) -> dict[str, Any]:
    """A needle task's settings, defaults filled in: its context must fit the model (with a
    question after it: :func:`sim.experiment.closed_loop.needle_suite`) and hold one fact per
    name of :data:`sim.closed_loop.needle.NAMES` at most."""
    from sim.closed_loop.needle import DEFAULT_CONTEXT_LEN, DEFAULT_DEPTHS, NAMES

    task = spec.model_dump(exclude={"prompt_len", "tokens", "bucket", "recall_every"})
    task["context_len"] = spec.context_len or DEFAULT_CONTEXT_LEN
    task["depths"] = list(spec.depths or DEFAULT_DEPTHS)
    if task["context_len"] > max_positions:
        raise ConfigError(f"{where}: closed_loop.context_len: {task['context_len']} exceeds "
                          f"{spec.model}'s {max_positions} positions")
    if len(task["depths"]) > len(NAMES):
        raise ConfigError(f"{where}: closed_loop.depths: {len(task['depths'])} needles; at "
                          f"most {len(NAMES)} (one fact per name)")
    return task


def _entry_policy(
    entry: dict[str, Any], given: dict[str, Any], at: str, labels: set[str]
) -> tuple[RetrievalPolicy, dict[str, Any], str]:
    """One ``policies:`` entry's policy (``given``: its policy keys), its spec with every
    parameter, defaults filled in ({dynakv} and {dynakv, buffer_max: <default>} are the same
    run and share one policy pass), and its run label, unique among ``labels`` (added)."""
    policy = POLICIES.create(given, where=at)
    policy_spec = {"type": given["type"], **_parameters(policy)}
    label = str(entry.get("label", given["type"]))
    if label in labels:
        raise ConfigError(f"{at}: duplicate run label {label!r}; give each a distinct 'label'")
    labels.add(label)
    return policy, policy_spec, label


def _check_budget(policy: RetrievalPolicy, prompt_len: int, at: str) -> None:
    """The policy's smallest context (its budget, sinks and window) must fit in the prompt."""
    if policy.min_context() > prompt_len:
        raise ConfigError(
            f"{at}.budget: {policy.min_context()} tokens exceeds the prompt "
            f"({prompt_len} tokens)"
        )


#: positions per perplexity or generation bucket when closed_loop.bucket is not given
DEFAULT_BUCKET = 64
#: closed_loop.recall_every of a generation run when not given (the long-decoding
#: experiments' accuracy_every)
DEFAULT_RECALL_EVERY = 8


def _device_settings(device: DeviceParams) -> dict[str, Any]:
    """A run's device: every parameter, but the flash's ``unit_choice`` and ``unit_seed`` only
    with ``random`` units (the seed does nothing otherwise), so runs with the default
    ``earliest_free`` units keep the ids they had before the choice existed."""
    settings = device.model_dump(mode="json")
    if device.flash.unit_choice == "earliest_free":
        del settings["flash"]["unit_choice"], settings["flash"]["unit_seed"]
    return settings


def _cache_settings(cache: CacheSpec) -> dict[str, Any]:
    """A run's cache settings: the replacement and the capacity, or the total DRAM target
    (``dram_total`` only when set, so runs sized by capacity keep their ids)."""
    if cache.dram_total is not None:
        return {"replacement": _as_spec(cache.replacement), "dram_total": cache.dram_total}
    return {"replacement": _as_spec(cache.replacement), "capacity": cache.capacity}


def _parameters(policy: Any) -> dict[str, Any]:
    """A policy's constructor parameters and their values, as plain YAML/JSON data."""
    import dataclasses

    values = {}
    for item in dataclasses.fields(policy):
        if item.init:
            value = getattr(policy, item.name)
            values[item.name] = list(value) if isinstance(value, tuple) else value
    return values


def _override(model: type[BaseModel], base: Any, entry: Any, where: str) -> Any:
    """A policy entry's own ``cache`` / ``pipeline`` settings merged over the experiment's."""
    if entry is None:
        return base
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {entry!r}")
    merged = {**base.model_dump(), **entry}
    if model is CacheSpec:
        # an entry that sizes its cache one way replaces the experiment's other way
        for given, other in (("capacity", "dram_total"), ("dram_total", "capacity")):
            if entry.get(given) is not None and other not in entry:
                merged[other] = None
    try:
        return model.model_validate(merged)
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
