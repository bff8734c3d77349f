"""Property: whatever YAML document a user writes, planning it ends in a valid plan or one
line of KvsimError (ConfigError, or TraceError/CaptureError for the trace it names), never
another exception, and writes nothing; and a valid plan holds no NaN, infinity or integer
beyond 64 bits anywhere in its runs (issue 11).

Three generators: arbitrary documents (random keys, types, nesting, numbers including NaN,
infinities and integers beyond 64 bits), a valid experiment with 1-3 of its keys (known and
made-up, at any depth, sweeps included) set to such values, and raw text or bytes. Planning
replays the committed sample trace, so no model is loaded; captures named by a document are
planned, not made (the trace cache is an empty directory).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import CacheSpec, CaptureSpec, ExperimentConfig, PipelineSpec, RecordSpec
from sim.errors import KvsimError
from sim.experiment.planning import Plan, plan
from sim.hardware import ComputeParams, DramParams, FlashParams
from sim.policies import POLICIES

from .conftest import FIXTURE_TRACE

BASE: dict[str, Any] = {
    "name": "fuzz",
    "trace": {"path": str(FIXTURE_TRACE)},
    "device": "ufs40-flagship",
    "cache": {"capacity": 0.2},
    "policies": [
        {"type": "full"},
        {"type": "static_clusters", "budget": 64, "tokens_per_cluster": 16},
        {"type": "token_topk", "budget": 0.1, "label": "topk"},
    ],
}

# every key name kvsim knows, so generated documents reach deep into validation
KNOWN_KEYS = sorted(
    {name for model in (ExperimentConfig, CaptureSpec, CacheSpec, PipelineSpec, RecordSpec,
                        FlashParams, DramParams, ComputeParams)
     for name in model.model_fields}
    | {param for name in POLICIES.names() for param in POLICIES.parameters(name)}
    | {"type", "label", "layout", "preset", "flash", "dram", "compute", "grid", "zip", "path",
       "capture"}
)
# dotted paths into BASE that changes target (list entries by index)
PATHS = sorted(
    {"name", "seed", "description", "trace", "trace.path", "trace.decode_from",
     "trace.capture", "device", "device.preset", "model", "kv_dtype", "cache", "pipeline",
     "policies", "policies.0", "policies.1", "policies.1.layout", "policies.1.cache",
     "policies.1.pipeline", "record", "accuracy_every", "figures", "sweep", "output", "plot"}
    | {f"trace.capture.{name}" for name in CaptureSpec.model_fields}
    | {f"cache.{name}" for name in CacheSpec.model_fields}
    | {f"pipeline.{name}" for name in PipelineSpec.model_fields}
    | {f"record.{name}" for name in RecordSpec.model_fields}
    | {f"device.{section}.{name}" for section, model in
       (("flash", FlashParams), ("dram", DramParams), ("compute", ComputeParams))
       for name in model.model_fields}
    | {f"policies.1.{name}" for name in POLICIES.parameters("static_clusters")}
    | {f"policies.2.{name}" for name in POLICIES.parameters("token_topk")}
)
SWEEP_KEYS = ["policy.budget", "seed", "cache.capacity", "device.flash.queue_depth",
              "trace.decode_from", "policies.topk.budget", "kv_dtype", "model", "nope.key"]
SPECIAL = [0, 1, -1, 0.5, 1.5, 2**31, 2**63 - 1, 2**63, 2**80, 1e308, -0.0, float("nan"),
           float("inf"), float("-inf"), "64MiB", "0B", "inf", "nan", "1e400", "", "full", "lru",
           "dual_head", "ufs31-phone", "llama-3.2-1b", "file:*.txt", "-1", "\n", "a\nb",
           "\x00", "€", [], {}]

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
)
scalars = st.one_of(
    numbers,
    st.none(),
    st.booleans(),
    st.sampled_from(SPECIAL),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=10))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=10,
)

# a whole policy entry: a registered type with some of its own parameters
policy_entries = st.sampled_from(POLICIES.names()).flatmap(
    lambda name: st.dictionaries(
        st.sampled_from([*POLICIES.parameters(name), "label", "layout", "cache"]),
        scalars, max_size=3,
    ).map(lambda params: {"type": name, **params})
)
# where a change goes: mostly a known path, sometimes a made-up key under a known section
change_paths = st.one_of(
    st.sampled_from(PATHS),
    st.sampled_from(PATHS),
    st.sampled_from(PATHS),
    st.tuples(st.sampled_from(["", "device.flash.", "cache.", "policies.1.", "record.",
                               "trace."]), keys).map("".join),
)
change_values = st.one_of(scalars, scalars, scalars, values, policy_entries)

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module", autouse=True)
def _empty_trace_cache():
    """Captures named by a document stay plans: the trace cache is an empty directory."""
    previous = os.environ.get("KVSIM_TRACE_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KVSIM_TRACE_CACHE"] = cache
        yield
    if previous is None:
        os.environ.pop("KVSIM_TRACE_CACHE", None)
    else:
        os.environ["KVSIM_TRACE_CACHE"] = previous


def _check_contract(document: str | bytes) -> Plan | None:
    """Plan ``document``: a valid plan, or one line of KvsimError; nothing written."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.yaml"
        (path.write_bytes if isinstance(document, bytes) else path.write_text)(document)
        out = Path(tmp) / "out"
        try:
            result = plan(path, output=out)
        except KvsimError as exc:
            message = str(exc)
            assert message.strip(), "an empty error message"
            assert len(message.splitlines()) == 1, message
            result = None
        else:
            assert isinstance(result, Plan) and result.runs
            for run in result.runs:  # what a run would use: no NaN, infinity or int overflow
                _assert_finite(asdict(run), run.label)
        assert not out.exists(), "planning wrote results"
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["exp.yaml"]
    return result


def _assert_finite(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _assert_finite(item, where)
    elif isinstance(value, float):
        assert math.isfinite(value), where
    elif isinstance(value, int):
        assert -(2**63) <= value < 2**63, where


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b]... = value`` along ``dotted`` (list indices as numbers), making mappings
    where the path leads through something else."""
    parts = dotted.split(".")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            return
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value


def test_the_base_document_plans():
    assert _check_contract(_dump(BASE)) is not None


@FUZZ
@given(document=st.one_of(st.dictionaries(keys, values, max_size=6), values))
def test_arbitrary_documents_plan_or_fail_in_one_line(document):
    _check_contract(_dump(document))


@FUZZ
@given(
    changes=st.lists(st.tuples(change_paths, change_values), min_size=1, max_size=3),
    sweep=st.none() | st.dictionaries(
        st.sampled_from(SWEEP_KEYS), st.lists(scalars, min_size=1, max_size=3), max_size=2
    ),
)
def test_a_valid_experiment_with_bad_values_plans_or_fails_in_one_line(changes, sweep):
    import copy

    data = copy.deepcopy(BASE)
    for dotted, value in changes:
        _set(data, dotted, value)
    if sweep is not None:
        data["sweep"] = {"grid": sweep}
    _check_contract(_dump(data))


@settings(max_examples=100, deadline=None)
@given(
    document=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        st.tuples(st.integers(0, 400), st.integers(0, 20), st.text(max_size=8)).map(
            lambda cut: (lambda text: text[: cut[0]] + cut[2] + text[cut[0] + cut[1]:])(
                _dump(BASE)
            )
        ),
    )
)
def test_raw_text_and_bytes_plan_or_fail_in_one_line(document):
    _check_contract(document)
