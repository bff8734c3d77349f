"""No run consumes an unverified trace: corrupt bytes and non-finite values stop a run in one line
before anything is written, and a trace is verified once (the verdict kept beside it, stale on
any change to its files)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cli import main
from sim.errors import TraceError
from sim.trace import verified
from sim.trace.format import Trace, layer_file, open_trace

from .conftest import FIXTURE_TRACE
from .test_trace_format import _write

CONFIG = """\
name: verified
trace:
  path: {trace}
device: ufs40-flagship
cache: {{capacity: 0.2}}
policies:
  - {{type: static_clusters, budget: 64, tokens_per_cluster: 16}}
"""


@pytest.fixture
def trace_copy(tmp_path: Path) -> Path:
    path = tmp_path / "trace"
    shutil.copytree(FIXTURE_TRACE, path)
    (path / verified.VERDICT_NAME).unlink(missing_ok=True)
    return path


def _rewrite_with_manifest(trace: Path, name: str, array: np.ndarray) -> None:
    """Store ``array`` as ``name`` and make the manifest's checksum agree (a NaN or an infinity
    the checksums cannot catch: a capture bug, or an edited trace)."""
    np.save(trace / name, array)
    manifest = json.loads((trace / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = hashlib.sha256((trace / name).read_bytes()).hexdigest()
    (trace / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _run(tmp_path: Path, trace: Path, capsys) -> tuple[int, str]:
    config = tmp_path / "exp.yaml"
    config.write_text(CONFIG.format(trace=trace))
    code = main(["run", str(config), "--output", str(tmp_path / "out"), "--quiet", "--no-plot"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["keys", "values", "queries"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_trace_values_stop_a_run_in_one_line(tmp_path, trace_copy, capsys, kind, bad):
    name = layer_file(7, kind)
    array = np.load(trace_copy / name)
    array[1, 5, 3] = bad
    _rewrite_with_manifest(trace_copy, name, array)
    open_trace(trace_copy)  # the cheap checks (headers, sizes) cannot see it
    code, err = _run(tmp_path, trace_copy, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert name in err and "1 non-finite value" in err and str(trace_copy) in err
    assert not (tmp_path / "out").exists(), "nothing is written for a corrupt trace"
    assert not (trace_copy / verified.VERDICT_NAME).exists()


def test_flipped_bytes_stop_a_run_in_one_line(tmp_path, trace_copy, capsys):
    victim = trace_copy / layer_file(12, "values")
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0x01  # the lowest mantissa bit of one value: still finite, still plausible
    victim.write_bytes(bytes(data))
    code, err = _run(tmp_path, trace_copy, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert victim.name in err and "checksum mismatch" in err
    assert not (tmp_path / "out").exists()


def test_a_trace_is_verified_once_and_again_after_any_change(trace_copy, monkeypatch):
    calls = []
    original = Trace.verify
    monkeypatch.setattr(Trace, "verify", lambda self: calls.append(1) or original(self))
    trace = open_trace(trace_copy)
    first, ran = verified.verify_once(trace)
    assert ran and len(calls) == 1 and verified.is_verified(trace)
    again, ran = verified.verify_once(open_trace(trace_copy))
    assert not ran and len(calls) == 1 and again == first
    # rewriting a file with its very own bytes changes its mtime and ctime: verified again
    victim = trace_copy / layer_file(3, "keys")
    victim.write_bytes(victim.read_bytes())
    assert not verified.is_verified(open_trace(trace_copy))
    _, ran = verified.verify_once(open_trace(trace_copy))
    assert ran and len(calls) == 2


@pytest.mark.parametrize(
    "verdict",
    ["", "not json", "[1, 2]", "null", '{"version": 1}', '{"files": 3}', "\x00\xff"],
)
def test_a_wrong_typed_or_foreign_verdict_is_a_miss(trace_copy, verdict):
    good, _ = verified.verify_once(open_trace(trace_copy))
    path = trace_copy / verified.VERDICT_NAME
    path.write_text(verdict, encoding="latin-1")
    assert not verified.is_verified(open_trace(trace_copy))
    assert verified.verify_once(open_trace(trace_copy)) == (good, True)
    stale = {**good, "version": verified.VERDICT_VERSION + 1}
    path.write_text(json.dumps(stale))
    assert verified.verify_once(open_trace(trace_copy)) == (good, True)


def test_a_worker_refuses_a_trace_changed_after_it_was_verified(tmp_path, trace_copy):
    from sim.experiment.pass_group import run_group
    from sim.experiment.planning import plan

    config = tmp_path / "exp.yaml"
    config.write_text(CONFIG.format(trace=trace_copy))
    planned = plan(config, output=tmp_path / "out")
    fingerprint, _ = verified.verify_once(open_trace(trace_copy))
    victim = trace_copy / layer_file(0, "queries")
    victim.write_bytes(victim.read_bytes())
    with pytest.raises(TraceError, match=r"layer_000.queries.npy changed after the trace was"):
        run_group(planned.runs, str(trace_copy), str(planned.runs_dir), verified=fingerprint)
    assert not planned.runs_dir.exists()


def test_the_writer_records_the_verdict_of_the_trace_it_wrote(tmp_path, monkeypatch):
    _write(tmp_path / "toy")
    monkeypatch.setattr(Trace, "verify", lambda self: pytest.fail("verified again"))
    trace = open_trace(tmp_path / "toy")
    assert verified.is_verified(trace)
    assert verified.verify_once(trace)[1] is False


def test_trace_verify_command_checks_values_and_records(trace_copy, capsys):
    assert main(["trace", "verify", str(trace_copy)]) == 0
    assert "checksums OK, values finite" in capsys.readouterr().out
    assert verified.is_verified(open_trace(trace_copy))
    name = layer_file(2, "keys")
    array = np.load(trace_copy / name)
    array[0, 0, 0] = np.inf
    _rewrite_with_manifest(trace_copy, name, array)
    assert main(["trace", "verify", str(trace_copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and "non-finite" in err


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_bit_is_caught(tmp_path_factory, data):
    """Flip one bit anywhere in any data file of a small trace: verification names that file
    (a checksum mismatch, or a non-finite value when the bit made one)."""
    path = tmp_path_factory.mktemp("fuzz") / "toy"
    _write(path)
    (path / verified.VERDICT_NAME).unlink()
    names = sorted(n for n in os.listdir(path) if n.endswith(".npy"))
    name = data.draw(st.sampled_from(names))
    raw = bytearray((path / name).read_bytes())
    offset = data.draw(st.integers(0, len(raw) - 1))
    raw[offset] ^= 1 << data.draw(st.integers(0, 7))
    (path / name).write_bytes(bytes(raw))
    try:
        trace = open_trace(path)  # a flip in a header may already fail the cheap checks
    except TraceError as exc:
        assert name in str(exc)
        return
    with pytest.raises(TraceError, match=name.replace(".", r"\.")):
        verified.verify_once(trace)
