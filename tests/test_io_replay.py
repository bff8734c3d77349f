"""The flash schedule a run records (``record_io:``) and ``kvsim replay``, which executes it on
real storage: addresses and times against hand-worked timelines, recording changes no simulated
number, the replayer issues exactly the recorded commands, the tables' arithmetic, bad input,
and (slow) a replay of a recorded run measured on this machine's disk."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import __version__
from sim.calibrate.storage import ALIGN, DirectFile
from sim.cli import main
from sim.config import PipelineSpec, RecordIoSpec
from sim.io_replay import load_schedule, replay_run
from sim.io_replay.compare import compare, correlation, union_us
from sim.io_replay.execute import FILE_PREFIX, FILL_IO_BYTES, file_bytes, phases
from sim.kv.io_plan import plan_write_commands, plan_writes
from sim.model import ModelGeometry
from sim.replay import SimSetup, simulate
from sim.replay.io_record import SCHEMA, SCHEMA_VERSION, sampled_steps
from sim.result_files import IO_BATCHES, IO_COMMANDS, IO_REPLAY_STEPS, IO_SCHEDULE
from tests.direct_io import direct_io_problem, o_direct_refused

from .test_engine import (
    DENSE_PRE_US,
    READ_PAGE_US,
    SCORING_US,
    _pass,
    _setup,
    attention_us,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TRACE = REPO / "traces" / "sample" / "smollm2-135m_pydoc_p160_d24"
WRITE_PAGE_US = 100 + 4096 / 2048  # HAND_DEVICE: unit time + one page over the link




# --- recording ---------------------------------------------------------------------------


def test_sampled_steps() -> None:
    assert sampled_steps(10, 1, None) == list(range(10))
    assert sampled_steps(10, 3, None) == [0, 3, 6, 9]
    assert sampled_steps(10, 3, 2) == [0, 3]
    assert sampled_steps(2, 5, 4) == [0]


def test_a_hand_worked_schedule_has_the_layouts_addresses_and_the_models_times() -> None:
    # test_engine's first timeline: one layer, one KV head, 16-byte entries, 8-token prompt,
    # no cache, sequence layout (slot = position). Step 0 reads positions 0-3 (page 0) after
    # the QKV projection and scoring, then appends position 8 (bytes 128-143: page 0); step 1
    # reads 0 and 8 (page 0) and appends 9 (page 0).
    result = simulate(_pass([[0, 1, 2, 3], [0, 8]]), _setup(capacity_bytes=0),
                      record_io=RecordIoSpec())
    schedule = result.io_schedule
    batches, commands, meta = schedule.batches, schedule.commands, schedule.meta
    assert batches[["step", "layer", "purpose", "write", "commands", "bytes"]].values.tolist() == [
        [0, 0, "kv_read", False, 1, 4096], [0, 0, "kv_write", True, 1, 4096],
        [1, 0, "kv_read", False, 1, 4096], [1, 0, "kv_write", True, 1, 4096],
    ]
    assert commands[["batch", "offset", "size"]].values.tolist() == [
        [0, 0, 4096], [1, 0, 4096], [2, 0, 4096], [3, 0, 4096]]
    read_at = DENSE_PRE_US + SCORING_US
    write_at = read_at + READ_PAGE_US + attention_us(5)
    latency0 = result.steps["latency_us"][0]
    assert batches["issue_us"].tolist() == pytest.approx(
        [read_at, write_at, latency0 + read_at, latency0 + read_at + READ_PAGE_US
         + attention_us(3)], rel=1e-12)
    assert (batches["done_us"] - batches["issue_us"]).tolist() == pytest.approx(
        [READ_PAGE_US, WRITE_PAGE_US, READ_PAGE_US, WRITE_PAGE_US], rel=1e-12)
    # one KV region of 10 slots x 16 bytes, in one 4 KiB area
    assert meta["areas"] == [{"kind": "kv", "layer": 0, "head": 0, "base": 0, "bytes": 4096}]
    assert meta["extent_bytes"] == 4096 and meta["recorded_steps"] == [0, 1]
    assert meta["schema"] == SCHEMA and meta["schema_version"] == SCHEMA_VERSION
    assert meta["kvsim_version"] == __version__ and meta["queue_depth"] == 4


def test_each_layer_and_head_has_its_own_area() -> None:
    # 2 layers x 3 KV heads replaying the trace's one: each (layer, head) region is 9 slots of
    # 16 bytes, one 4 KiB area each, laid out layer by layer, head by head.
    target = ModelGeometry("big", n_layers=2, n_q_heads=6, n_kv_heads=3, head_dim=4,
                           params_per_layer=1_000_000)
    result = simulate(_pass([[0, 1]]), _setup(capacity_bytes=0, model=target),
                      record_io=RecordIoSpec())
    schedule = result.io_schedule
    assert [(a["layer"], a["head"], a["base"]) for a in schedule.meta["areas"]] == [
        (layer, head, 4096 * (3 * layer + head)) for layer in range(2) for head in range(3)]
    reads = schedule.commands[~schedule.commands["write"]]
    writes = schedule.commands[schedule.commands["write"]]
    # position 0-1 and the appended 8 are on each region's first page
    assert reads["offset"].tolist() == [4096 * i for i in range(6)]
    assert writes["offset"].tolist() == [4096 * i for i in range(6)]
    assert set(reads["size"]) == {4096} and set(writes["size"]) == {4096}


def test_plan_write_commands_are_plan_writes_with_offsets() -> None:
    # slots 1, 2, 5 on page 0, 600 and 601 (bytes 9600-9631) on page 2
    offsets, sizes = plan_write_commands(np.array([5, 1, 600, 601, 2]), 16, 4096, 8192)
    assert sizes.tolist() == plan_writes(np.array([5, 1, 600, 601, 2]), 16, 4096, 8192).tolist()
    assert offsets.tolist() == [0, 8192] and sizes.tolist() == [4096, 4096]
    # 3 KiB entries straddle pages; a run longer than 8 KiB is split
    offsets, sizes = plan_write_commands(np.arange(4, 9), 3072, 4096, 8192)
    assert offsets.tolist() == [12288, 20480] and sizes.tolist() == [8192, 8192]


def _sample_pass(policy: dict):
    from sim.policies import POLICIES
    from sim.policy_pass import run_policy_pass
    from sim.trace.format import open_trace

    trace = open_trace(SAMPLE_TRACE)
    return run_policy_pass(trace, POLICIES.create(policy), 0, progress=False)


def _sample_setup(layout: str, replacement: str, pipeline: dict) -> SimSetup:
    from sim.config import load_model_geometry
    from sim.hardware import load_device

    return SimSetup(device=load_device("ufs31-phone"), target=load_model_geometry("llama-3.2-1b"),
                    kv_dtype="fp16", cache_capacity_bytes=400_000,
                    replacement={"type": replacement}, layout={"type": layout},
                    pipeline=PipelineSpec(**pipeline))


SAMPLE_RUNS = [
    ({"type": "token_topk", "budget": 0.1}, "sequence", "lru", {}),
    ({"type": "static_clusters", "budget": 0.3}, "cluster", "lru", {"swap_layers": True}),
    ({"type": "dynakv", "budget": 0.3}, "dual_head", "cluster_aligned",
     {"stream_index": True, "overlap_transfer": True, "swap_layers": True}),
    ({"type": "quest", "budget": 0.3}, "sequence", "lru", {"stream_index": True}),
]


@pytest.mark.parametrize(("policy", "layout", "replacement", "pipeline"), SAMPLE_RUNS)
def test_recording_changes_nothing_and_accounts_for_every_byte(
    policy: dict, layout: str, replacement: str, pipeline: dict
) -> None:
    _check_recording(_sample_pass(policy), _sample_setup(layout, replacement, pipeline),
                     RecordIoSpec(every=3, steps=5), [0, 3, 6, 9, 12])


@pytest.mark.parametrize("pipeline", [{"stream_index": True}, {"swap_layers": True},
                                      {"stream_index": True, "swap_layers": True}])
def test_recording_a_lead_policy_changes_nothing(pipeline: dict) -> None:
    from . import test_engine_lead as lead

    setup = lead._setup(capacity_entries=6, pipeline=PipelineSpec(**pipeline))
    _check_recording(lead._pass(lead.SELECTIONS, lead=True), setup, RecordIoSpec(), [0, 1, 2])


def _check_recording(pp, setup: SimSetup, spec: RecordIoSpec, steps_recorded: list[int]) -> None:
    """The replay's records alike with and without recording; the schedule's commands add up
    to the step records, each within its area, page-aligned, none overlapping in a batch."""
    pipeline = setup.pipeline.model_dump()
    plain = simulate(pp, setup)
    recorded = simulate(pp, setup, record_io=spec)
    pd.testing.assert_frame_equal(plain.steps, recorded.steps)
    pd.testing.assert_frame_equal(plain.io_sizes, recorded.io_sizes)
    pd.testing.assert_frame_equal(plain.run_lengths, recorded.run_lengths)
    assert plain.totals == recorded.totals and plain.io_schedule is None
    schedule = recorded.io_schedule
    assert schedule.meta["recorded_steps"] == steps_recorded
    commands, batches = schedule.commands, schedule.batches
    steps = recorded.steps.set_index("step").loc[schedule.meta["recorded_steps"]]
    by_step = commands.groupby(["step", "write"])["size"].agg(["sum", "count"])

    def moved(write: bool, what: str) -> list[int]:
        return [int(by_step[what].get((s, write), 0)) for s in steps.index]

    assert moved(False, "sum") == (steps["read_bytes"] + steps["index_read_bytes"]
                                   + steps["swap_read_bytes"]).astype(int).tolist()
    assert moved(True, "sum") == (steps["write_bytes"] + steps["swap_write_bytes"]).astype(
        int).tolist()
    kv_reads = commands[batches["purpose"].to_numpy()[commands["batch"]] == "kv_read"]
    assert [int((kv_reads["step"] == s).sum()) for s in steps.index] == steps[
        "read_commands"].astype(int).tolist()
    # every command within its area, page-aligned; commands of one batch never overlap
    page = schedule.meta["page_bytes"]
    assert (commands["offset"] % page == 0).all() and (commands["size"] % page == 0).all()
    bounds = sorted((a["base"], a["base"] + a["bytes"]) for a in schedule.meta["areas"])
    starts = [b[0] for b in bounds]
    area = np.searchsorted(starts, commands["offset"], side="right") - 1
    assert (commands["offset"] + commands["size"]
            <= np.array([b[1] for b in bounds])[area]).all()
    for _, group in commands.groupby("batch"):
        ordered = group.sort_values("offset")
        assert (ordered["offset"].to_numpy()[1:]
                >= (ordered["offset"] + ordered["size"]).to_numpy()[:-1]).all()
    assert (batches["done_us"] >= batches["issue_us"]).all()
    # the purposes the pipeline implies
    purposes = set(batches["purpose"])
    assert ("swap_read" in purposes) == pipeline["swap_layers"]
    assert ("index_read" in purposes) == pipeline["stream_index"]


# --- the replayer on a hand-built schedule ------------------------------------------------


def _write_schedule(run_dir: Path, batches: list[dict], commands: list[tuple], *,
                    queue_depth: int, page: int = 4096, extent: int | None = None,
                    steps: list[int] | None = None) -> None:
    """A run directory holding a hand-built schedule (``commands``: (batch, offset, size))."""
    run_dir.mkdir(parents=True)
    frame = pd.DataFrame(batches)
    frame.insert(0, "batch", np.arange(len(frame)))
    frame["write"] = frame["purpose"].str.endswith("_write")
    cmd = pd.DataFrame(commands, columns=["batch", "offset", "size"])
    frame["commands"] = np.bincount(cmd["batch"], minlength=len(frame))
    frame["bytes"] = np.bincount(cmd["batch"], weights=cmd["size"], minlength=len(frame)).astype(
        np.int64)
    for column in ("step", "layer", "write"):
        cmd.insert(len(cmd.columns) - 2, column, frame[column].to_numpy()[cmd["batch"]])
    meta = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kvsim_version": __version__,
        "every": 1, "steps_requested": None, "decode_steps": 10,
        "recorded_steps": steps if steps is not None else sorted(set(frame["step"])),
        "device": "hand", "queue_depth": queue_depth, "page_bytes": page,
        "max_io_bytes": 65536, "entry_bytes": 16, "flash": {}, "time_unit": "us", "areas": [],
        "extent_bytes": extent if extent is not None else int((cmd["offset"] + cmd["size"]).max()),
        "batches": len(frame), "commands": len(cmd),
    }
    (run_dir / IO_SCHEDULE).write_text(json.dumps(meta))
    frame.to_parquet(run_dir / IO_BATCHES, index=False)
    cmd.to_parquet(run_dir / IO_COMMANDS, index=False)
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"run": "hand", "run_id": run_dir.name}))


HAND_BATCHES = [
    # step 0: layer 0 reads two commands; its write overlaps layer 1's reads (one phase)
    {"step": 0, "layer": 0, "purpose": "kv_read", "issue_us": 10.0, "done_us": 60.0},
    {"step": 0, "layer": 0, "purpose": "kv_write", "issue_us": 100.0, "done_us": 250.0},
    {"step": 0, "layer": 1, "purpose": "kv_read", "issue_us": 200.0, "done_us": 300.0},
    # step 3: a streamed index, then the KV reads after a gap (two phases)
    {"step": 3, "layer": 0, "purpose": "index_read", "issue_us": 1000.0, "done_us": 1040.0},
    {"step": 3, "layer": 0, "purpose": "kv_read", "issue_us": 1100.0, "done_us": 1200.0},
]
# (batch, offset, size); page 512: the last three are not 4 KiB-aligned
HAND_COMMANDS = [
    (0, 0, 8192), (0, 40960, 4096), (1, 4096, 4096), (2, 65536, 16384),
    (3, 81920 + 512, 1024), (4, 12288 + 3584, 1024), (4, 90112, 512),
]
# as issued: rounded out to the 4 KiB blocks they touch
HAND_ISSUED = [
    (False, 0, 8192), (False, 40960, 4096), (True, 4096, 4096), (False, 65536, 16384),
    (False, 81920, 4096), (False, 12288, 8192), (False, 90112, 4096),
]


def _spy_io(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, int, int]]:
    """Every preadv / pwritev from now on, as (write, offset, size), in call order."""
    calls: list[tuple[bool, int, int]] = []
    lock = threading.Lock()
    real_read, real_write = os.preadv, os.pwritev

    def preadv(fd: int, buffers: list, offset: int) -> int:
        with lock:
            calls.append((False, offset, sum(len(b) for b in buffers)))
        return real_read(fd, buffers, offset)

    def pwritev(fd: int, buffers: list, offset: int) -> int:
        with lock:
            calls.append((True, offset, sum(len(b) for b in buffers)))
        return real_write(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwritev", pwritev)
    return calls


def _after_fill(calls: list[tuple[bool, int, int]], size: int) -> list[tuple[bool, int, int]]:
    """The calls after the one-page probe and the fill, which are checked to be exactly those."""
    fill = [(True, offset, min(FILL_IO_BYTES, size - offset))
            for offset in range(0, size, FILL_IO_BYTES)]
    assert calls[:2] == [(True, 0, ALIGN), (False, 0, ALIGN)]  # DirectFile's probe
    assert sorted(calls[2:2 + len(fill)]) == fill
    return calls[2 + len(fill):]


def test_the_replayer_issues_exactly_the_recorded_commands(
    direct_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "runs" / "hand1"
    _write_schedule(run_dir, HAND_BATCHES, HAND_COMMANDS, queue_depth=1, page=512)
    schedule = load_schedule(run_dir)
    size = file_bytes(schedule)
    assert size == 94208  # 90112 + 512 bytes in whole 4 KiB blocks
    calls = _spy_io(monkeypatch)
    result = replay_run(run_dir, direct_dir, issuer="threads")  # its system calls are watched
    # queue depth 1: one thread, the commands in submission order
    assert _after_fill(calls, size) == HAND_ISSUED
    aligned = result.execution.aligned
    assert aligned.rounded == 3 and aligned.added_bytes == 3072 + 7168 + 3584
    assert not [p for p in direct_dir.iterdir() if p.name.startswith(FILE_PREFIX)]
    steps = pd.read_csv(run_dir / IO_REPLAY_STEPS)
    assert steps["step"].tolist() == [0, 3]
    # the recorded bytes and commands, not the rounded ones
    assert steps["read_bytes"].tolist() == [8192 + 4096 + 16384, 1024 + 1024 + 512]
    assert steps["write_bytes"].tolist() == [4096, 0]
    assert steps["read_commands"].tolist() == [3, 3]
    # simulated: step 0 is [10, 60] + [100, 300], step 3 [1000, 1040] + [1100, 1200]
    assert steps["simulated_us"].tolist() == pytest.approx([250.0, 140.0])
    assert (steps["measured_us"] > 0).all()
    summary = (run_dir / "io_replay.md").read_text()
    assert "3 of 7 commands were rounded out to 4 KiB" in summary


def test_a_deeper_queue_issues_the_same_commands(
    direct_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "runs" / "hand4"
    _write_schedule(run_dir, HAND_BATCHES, HAND_COMMANDS, queue_depth=4, page=512)
    calls = _spy_io(monkeypatch)
    out = tmp_path / "elsewhere"
    result = replay_run(run_dir, direct_dir, out=out, issuer="threads")
    issued = _after_fill(calls, file_bytes(result.schedule))
    assert sorted(issued) == sorted(HAND_ISSUED)
    # phases in order: {0}, {1, 2}, {3}, {4}: a phase's commands start after the previous
    # phase's (within a phase, threads may reach their system calls in either order)
    assert set(issued[:2]) == set(HAND_ISSUED[:2])
    assert set(issued[2:4]) == set(HAND_ISSUED[2:4]) and issued[4] == HAND_ISSUED[4]
    assert set(issued[5:]) == set(HAND_ISSUED[5:])
    assert (out / IO_REPLAY_STEPS).is_file() and not (run_dir / IO_REPLAY_STEPS).exists()


def test_phases_join_overlapping_batches() -> None:
    issue = np.array([0.0, 5.0, 20.0, 30.0, 10.0])
    done = np.array([10.0, 8.0, 25.0, 40.0, 12.0])
    # [0, 10] touches [10, 12]; [5, 8] inside; [20, 25] and [30, 40] alone
    assert [g.tolist() for g in phases(issue, done)] == [[0, 1, 4], [2], [3]]
    assert phases(np.zeros(0), np.zeros(0)) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), max_size=12))
def test_union_is_the_cells_covered(intervals: list[tuple[int, int]]) -> None:
    starts = np.array([s for s, _ in intervals], dtype=float)
    ends = np.array([s + n for s, n in intervals], dtype=float)
    covered = set()
    for s, n in intervals:
        covered |= set(range(s, s + n))
    assert union_us(starts, ends) == len(covered)


def test_compare_by_hand() -> None:
    batches = pd.DataFrame({
        "step": [0, 0, 0, 2], "layer": [0, 0, 1, 0], "write": [False, True, False, False],
        "issue_us": [0.0, 5.0, 20.0, 0.0], "done_us": [10.0, 15.0, 30.0, 4.0],
        "start_us": [0.0, 12.0, 13.0, 1.0], "end_us": [11.0, 20.0, 33.0, 7.0],
        "commands": [2, 1, 3, 1], "bytes": [8192, 4096, 12288, 4096],
    })
    result = compare(batches, [0, 1, 2])
    layer_step = result.by_layer_step
    assert layer_step[["step", "layer"]].values.tolist() == [[0, 0], [0, 1], [2, 0]]
    assert layer_step["simulated_us"].tolist() == [15.0, 10.0, 4.0]
    assert layer_step["measured_us"].tolist() == [19.0, 20.0, 6.0]
    assert layer_step["simulated_read_us"].tolist() == [10.0, 10.0, 4.0]
    assert layer_step["measured_read_us"].tolist() == [11.0, 20.0, 6.0]
    step = result.by_step
    assert step["step"].tolist() == [0, 1, 2]
    assert step["simulated_us"].tolist() == [25.0, 0.0, 4.0]
    assert step["measured_us"].tolist() == [32.0, 0.0, 6.0]  # [0, 11] + [12, 33]
    assert step["read_commands"].tolist() == [5, 0, 1]
    assert step["write_bytes"].tolist() == [4096, 0, 0]
    assert result.by_layer["simulated_us"].tolist() == [19.0, 10.0]
    assert result.totals["simulated_us"] == 29.0 and result.totals["measured_us"] == 38.0
    assert result.totals["error"] == pytest.approx(-9 / 38)
    assert result.totals["correlation"] == pytest.approx(
        np.corrcoef([25.0, 0.0, 4.0], [32.0, 0.0, 6.0])[0, 1])
    assert np.isnan(correlation(np.array([1.0]), np.array([2.0])))
    assert np.isnan(correlation(np.array([1.0, 1.0]), np.array([2.0, 3.0])))


# --- bad input ---------------------------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kvsim: error: "), err
    assert re.search(pattern, err), err


def _nothing_left(run_dir: Path, direct: Path) -> None:
    assert not [p for p in run_dir.iterdir() if p.name.startswith("io_replay")]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    assert not [p for p in direct.iterdir() if p.name.startswith(FILE_PREFIX)]


def test_bad_run_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    base = ["replay", "--quiet", "--path", str(disk)]
    _one_line_error(capsys, [*base[:1], str(tmp_path / "missing"), *base[1:]], "does not exist")
    (tmp_path / "afile").write_text("x")
    _one_line_error(capsys, [base[0], str(tmp_path / "afile"), *base[1:]], "not a directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, [base[0], str(tmp_path / "empty"), *base[1:]],
                    "not a kvsim run directory")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "run.yaml").write_text("run: x\n")
    _one_line_error(capsys, [base[0], str(plain), *base[1:]],
                    r"no recorded flash schedule; add `record_io: \{every")
    old = tmp_path / "runs" / "old"
    _write_schedule(old, HAND_BATCHES, HAND_COMMANDS, queue_depth=2)
    meta = json.loads((old / IO_SCHEDULE).read_text())
    (old / IO_SCHEDULE).write_text(json.dumps({**meta, "kvsim_version": "0.0.1"}))
    _one_line_error(capsys, [base[0], str(old), *base[1:]], "recorded by kvsim 0.0.1")
    (old / IO_SCHEDULE).write_text(json.dumps({**meta, "schema_version": 99}))
    _one_line_error(capsys, [base[0], str(old), *base[1:]], "schedule version 99")
    (old / IO_SCHEDULE).write_text(json.dumps({**meta, "commands": 3}))
    _one_line_error(capsys, [base[0], str(old), *base[1:]], "inconsistent")
    (old / IO_SCHEDULE).write_text(json.dumps(meta))
    (old / IO_COMMANDS).write_bytes(b"not parquet")
    _one_line_error(capsys, [base[0], str(old), *base[1:]], "unreadable")
    (old / IO_COMMANDS).unlink()
    _one_line_error(capsys, [base[0], str(old), *base[1:]], "is missing")
    assert list(disk.iterdir()) == []


def test_bad_storage_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "r"
    _write_schedule(run_dir, HAND_BATCHES, HAND_COMMANDS, queue_depth=2)
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "afile").write_text("x")
    for path, pattern in ((tmp_path / "missing", "replay --path: .* does not exist"),
                          (tmp_path / "afile", "is not a directory")):
        _one_line_error(capsys, ["replay", str(run_dir), "--path", str(path)], pattern)
    _one_line_error(capsys, ["replay", str(run_dir), "--path", str(disk), "--out",
                             str(tmp_path / "afile" / "out")], "replay --out: .* is a file")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == disk
                        else real_access(p, mode))
    _one_line_error(capsys, ["replay", str(run_dir), "--path", str(disk)], "not writable")
    monkeypatch.setattr(os, "access", real_access)
    deep = tmp_path / "runs" / "deep"
    _write_schedule(deep, HAND_BATCHES, HAND_COMMANDS, queue_depth=4096)
    _one_line_error(capsys, ["replay", str(deep), "--path", str(disk)],
                    "queue depth is 4096; .* at most 256")
    huge = tmp_path / "runs" / "huge"
    _write_schedule(huge, HAND_BATCHES, HAND_COMMANDS, queue_depth=2, extent=2**50)
    _one_line_error(capsys, ["replay", str(huge), "--path", str(disk)], "GiB free")
    _nothing_left(run_dir, disk)
    _nothing_left(huge, disk)


def test_a_memory_file_system_is_refused(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from sim.calibrate.storage import mount_of

    if not Path("/dev/shm").is_dir() or mount_of(Path("/dev/shm"))[1] != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    run_dir = tmp_path / "runs" / "r"
    _write_schedule(run_dir, HAND_BATCHES, HAND_COMMANDS, queue_depth=2)
    before = set(os.listdir("/dev/shm"))
    _one_line_error(capsys, ["replay", str(run_dir), "--path", "/dev/shm"], "tmpfs")
    assert set(os.listdir("/dev/shm")) == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith("io_replay")]


def test_refused_o_direct_and_a_failing_command_leave_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    run_dir = tmp_path / "runs" / "r"
    _write_schedule(run_dir, HAND_BATCHES, HAND_COMMANDS, queue_depth=2)
    disk = tmp_path / "disk"
    disk.mkdir()
    with o_direct_refused():
        _one_line_error(capsys, ["replay", str(run_dir), "--path", str(disk)],
                        "replay --path: .* refuses O_DIRECT")
    _nothing_left(run_dir, disk)
    if direct_io_problem(disk):
        return
    real_read = os.preadv
    reads = [0]

    def failing_read(fd: int, buffers: list, offset: int) -> int:
        reads[0] += 1
        if reads[0] > 1:  # the probe's read passes, the replay's first read fails
            raise OSError(errno.EIO, "Input/output error")
        return real_read(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing_read)
    _one_line_error(capsys, ["replay", str(run_dir), "--path", str(disk), "--issuer", "threads"],
                    "Input/output error")
    _nothing_left(run_dir, disk)


def test_record_io_is_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for value, pattern in (({"every": 0}, "record_io.every"), ({"steps": 0}, "record_io.steps"),
                           ({"evry": 2}, "record_io.evry"), ("yes", "record_io")):
        path = tmp_path / "e.yaml"
        path.write_text(yaml.safe_dump({
            "name": "bad", "trace": {"path": str(SAMPLE_TRACE)}, "record_io": value,
            "policies": [{"type": "token_topk", "budget": 0.2}]}))
        _one_line_error(capsys, ["run", str(path), "--output", str(tmp_path / "out")], pattern)
        assert not (tmp_path / "out").exists()


# --- end to end ----------------------------------------------------------------------------


def _recorded_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVSIM_PASS_CACHE", "off")
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({
        "name": "recorded", "trace": {"path": str(SAMPLE_TRACE)}, "device": "ufs31-phone",
        "model": "llama-3.2-1b", "cache": {"capacity": 0.05}, "plot": False,
        "record_io": {"every": 4, "steps": 4}, "figures": ["io_replay"],
        "policies": [{"type": "token_topk", "budget": 0.1},
                     {"type": "static_clusters", "budget": 0.1}],
    }))
    out = tmp_path / "results"
    assert main(["run", str(path), "--output", str(out), "--quiet", "-j", "1", "--no-plot"]) == 0
    return out


def test_a_recorded_run_replays_and_the_figure_gathers_the_runs(
    direct_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _recorded_results(tmp_path, monkeypatch)
    summary = pd.read_csv(out / "summary.csv")
    run_ids = summary["run_id"].tolist()
    settings_ = yaml.safe_load((out / "runs" / run_ids[0] / "run.yaml").read_text())
    assert settings_["record_io"] == {"every": 4, "steps": 4}
    from sim.figures.plots import plot_results

    assert not [p for p in plot_results(out) if "io_replay" in p.name]  # nothing replayed yet
    capsys.readouterr()
    assert main(["replay", str(out / "runs" / run_ids[0]), "--path", str(direct_dir),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "I/O time: simulated" in printed and "per-step r" in printed
    assert "ufs31-phone is not a kvsim calibrate preset" in printed
    steps = pd.read_csv(out / "runs" / run_ids[0] / IO_REPLAY_STEPS)
    assert steps["step"].tolist() == [0, 4, 8, 12]
    table = pd.read_csv(out / "figures" / "io_replay.csv")
    assert table["run"].tolist() == [summary["run"][0]] and table["steps"].tolist() == [4]
    assert (out / "figures" / "io_replay.png").is_file()
    assert not [p for p in direct_dir.iterdir() if p.name.startswith(FILE_PREFIX)]


@pytest.mark.slow
def test_replayed_times_are_in_range(direct_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # measured on this machine's disk: structure and ranges, never absolute times
    out = _recorded_results(tmp_path, monkeypatch)
    for run_id in pd.read_csv(out / "summary.csv")["run_id"]:
        result = replay_run(out / "runs" / run_id, direct_dir)
        by_step, totals = result.comparison.by_step, result.comparison.totals
        busy = (by_step["read_commands"] + by_step["write_commands"]) > 0
        assert (by_step.loc[busy, "measured_us"] > 0).all()
        assert (by_step.loc[~busy, "measured_us"] == 0).all()
        # a step's union is at most the sum of its layers' and at least their largest
        layers = result.comparison.by_layer_step.groupby("step")["measured_us"]
        assert (by_step.set_index("step").loc[layers.sum().index, "measured_us"]
                <= layers.sum() + 1e-6).all()
        assert np.isnan(totals["correlation"]) or -1 <= totals["correlation"] <= 1
        # no step took more than a second for a few MB on any disk
        assert by_step["measured_us"].max() < 1e6
        batches = result.execution.batches
        assert (batches["end_us"] >= batches["start_us"]).all()


def test_the_report_says_whether_the_device_was_calibrated(tmp_path: Path) -> None:
    from sim.io_replay import device_note

    run_dir = tmp_path / "runs" / "r"
    _write_schedule(run_dir, HAND_BATCHES, HAND_COMMANDS, queue_depth=2)
    settings_path = run_dir / "run.yaml"
    described = "Calibrated by kvsim calibrate on box (x86_64, 2 CPUs): storage under /var/tmp"
    settings_path.write_text(yaml.safe_dump({"run": "r", "device": {
        "name": "box", "description": described}}))
    assert device_note(load_schedule(run_dir)) == f"simulated device hand: {described}"
    settings_path.write_text(yaml.safe_dump({"run": "r", "device": {
        "name": "ufs40-flagship", "description": "OnePlus 12 class"}}))
    assert "is not a kvsim calibrate preset" in device_note(load_schedule(run_dir))


def test_the_issuers_timeline_follows_the_source(direct_dir: Path) -> None:
    from sim.calibrate.storage import Issuer

    commands = [(i % 3 == 0, 4096 * i, 4096) for i in range(12)]
    with DirectFile(direct_dir, 1 << 20) as file, Issuer(file.fd, 4, 8192) as issuer:
        one = issuer.run(iter(commands), queue_depth=1, timeline=True)
        four = issuer.run(iter(commands), timeline=True)
        plain = issuer.run(iter(commands))
    assert plain.timeline_us is None
    for result in (one, four):
        timeline = result.timeline_us
        assert timeline.shape == (12, 2) and (timeline[:, 1] >= timeline[:, 0]).all()
        assert timeline.min() >= 0 and timeline.max() <= result.seconds * 1e6
    # one in flight at a time, in the source's order: each starts after the previous ended
    # (with four threads, a thread may reach its system call before one that took an earlier
    # command)
    assert (one.timeline_us[1:, 0] >= one.timeline_us[:-1, 1]).all()
