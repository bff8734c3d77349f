"""Reliability at run time: workers never outlive a killed ``kvsim run``; concurrent runs into one
directory end with a lone run's results; the file system refusing a write (permissions, a full
disk, a file in the way, a name too long) and foreign result files are one line and exit 2,
never a traceback, with nothing half-written.

The kill and concurrency tests run the real CLI in subprocesses on the committed fixture trace.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.experiment.planning import plan
from sim.experiment.runner import execute
from sim.experiment.store import results_lock

from .conftest import FIXTURE_TRACE

psutil = pytest.importorskip("psutil")  # comes with the test extra's dask[distributed]

TINY = {
    "name": "tiny",
    "trace": {"path": str(FIXTURE_TRACE)},
    "device": "ufs40-flagship",
    "cache": {"capacity": 0.2},
    "policies": [
        {"type": "full"},
        {"type": "static_clusters", "budget": 64, "tokens_per_cluster": 16},
    ],
}
# 6 policy passes of about a second each: long enough to be killed mid-way on 2 workers
SWEEP = {
    **TINY,
    "name": "sweep",
    "model": "llama-3.2-1b",
    "policies": [
        {"type": "token_topk", "budget": 0.1},
        {"type": "static_clusters", "budget": 0.1, "tokens_per_cluster": 16},
    ],
    "sweep": {"grid": {"device.flash.read_bandwidth_mb_s": [1000, 4000],
                       "policy.budget": [0.05, 0.1, 0.2]}},
}
QUIET = {"progress": False, "log": lambda _message: None}


@pytest.fixture(autouse=True)
def _no_pass_cache(monkeypatch):
    monkeypatch.setenv("KVSIM_PASS_CACHE", "off")


def _config(tmp_path: Path, data: dict, name: str = "exp") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _kvsim(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sim", *args], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("kvsim: error: "), err
    return lines[-1]


def _cli_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    line = _one_line_error(code, err)
    assert err.count("\n") == 1, err
    return line


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name == ".progress"]


def _alive(process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_gone_soon(processes: list, within_s: float = 5.0) -> None:
    """Every process ends within ``within_s`` (a zombie has ended); those that do not are
    killed before the test fails, so a failure leaves no orphan behind."""
    deadline = time.time() + within_s
    while time.time() < deadline and any(_alive(p) for p in processes):
        time.sleep(0.05)
    survivors = [p for p in processes if _alive(p)]
    for process in survivors:
        process.kill()
    assert not survivors, f"{len(survivors)} process(es) outlived their parent"


# -- class 5: workers end with their coordinator ------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_coordinator_ends_its_workers(tmp_path, how):
    config, out = _config(tmp_path, SWEEP), tmp_path / "out"
    process = _kvsim("run", str(config), "--output", str(out), "--quiet", "--no-plot", "-j", "2")
    coordinator = psutil.Process(process.pid)
    deadline = time.time() + 60
    while time.time() < deadline and len(coordinator.children()) < 2:
        time.sleep(0.05)
    workers = coordinator.children()
    assert len(workers) == 2, "the pool never started"
    time.sleep(0.5)  # into the policy passes
    os.kill(process.pid, how)  # the coordinator alone, as `kill PID` or the OOM killer would
    _out, err = process.communicate(timeout=30)
    _assert_gone_soon(workers)
    if how == signal.SIGTERM:
        assert process.returncode == 143
        assert "Traceback" not in err and err.strip().splitlines()[-1] == (
            "kvsim: terminated; completed runs are saved, partial ones discarded"
        )
        assert not _temporaries(out), "a terminated run removes its workers' temporaries"
    # the next run completes what is missing, with nothing left behind
    summary, report = execute(plan(config, output=out), jobs=2, **QUIET)
    assert len(summary) == 12 and summary["run_id"].is_unique
    assert not _temporaries(out)


def test_sigterm_stops_an_in_process_run_like_ctrl_c(tmp_path):
    config, out = _config(tmp_path, SWEEP), tmp_path / "out"
    process = _kvsim("run", str(config), "--output", str(out), "--quiet", "--no-plot", "-j", "1")
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "experiment.yaml").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("kvsim: terminated")
    assert not _temporaries(out)


def test_terminating_a_dask_coordinator_leaves_the_cluster_no_work(tmp_path):
    """On a Dask cluster the workers are the cluster's, not the run's: a terminated coordinator
    must leave them nothing to do (a task already running finishes its run atomically). After
    a SIGKILL the scheduler drops a lost client's tasks itself (measured: none left 0.1 s
    later)."""
    distributed = pytest.importorskip("dask.distributed")
    config, out = _config(tmp_path, SWEEP), tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        process = _kvsim("run", str(config), "--output", str(out), "--quiet", "--no-plot",
                         "--scheduler", cluster.scheduler_address)
        deadline = time.time() + 60
        while time.time() < deadline and not any(client.processing().values()):
            time.sleep(0.05)
        assert any(client.processing().values()), "no task ever reached the cluster"
        os.kill(process.pid, signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
        deadline = time.time() + 5
        while time.time() < deadline and any(client.processing().values()):
            time.sleep(0.05)
        assert not any(client.processing().values()), "the cluster kept the run's tasks"
    assert process.returncode == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("kvsim: terminated")


def test_a_worker_without_prctl_notices_its_parent_is_gone():
    """The portable watchdog alone (no PR_SET_PDEATHSIG): a worker whose parent dies ends
    within a few of its check intervals."""
    code = (
        "import os, sys, time\n"
        "parent = os.getpid()\n"
        "ready, tell = os.pipe()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    sys.platform = 'darwin'  # no prctl: the watchdog thread alone\n"
        "    from sim.experiment import worker\n"
        "    worker.initialize(parent)\n"
        "    null = os.open(os.devnull, os.O_RDWR)\n"
        "    os.dup2(null, 1); os.dup2(null, 2)  # let the test read the parent's output to EOF\n"
        "    os.write(tell, b'1')\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "os.read(ready, 1)  # the child is initialised and watching\n"
        "print(child, flush=True)\n"
        "os._exit(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=True)
    _assert_gone_soon([psutil.Process(int(result.stdout.strip()))])


# -- class 6: one run at a time into a results directory ----------------------------------------


def test_a_run_into_a_held_directory_stops_in_one_line_and_spares_its_temporaries(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("sim.experiment.store.LOCK_WAIT_S", 0.3)
    config, out = _config(tmp_path, TINY), tmp_path / "out"
    with results_lock(out):
        # the holder is writing a run: its temporary is live, not stale
        live = out / "runs" / f".0123abcd.tmp-{os.getpid()}"
        live.mkdir(parents=True)
        (live / "steps.parquet").write_bytes(b"half")
        line = _cli_error(capsys, "run", str(config), "--output", str(out), "--quiet",
                          "--no-plot")
        assert (live / "steps.parquet").read_bytes() == b"half"
    assert f"another kvsim run (pid {os.getpid()}) is writing {out}" in line
    assert sorted(p.name for p in out.iterdir()) == [".kvsim-run.lock", "runs"]
    # once the holder has ended, what it left is stale: the next run removes it
    assert main(["run", str(config), "--output", str(out), "--quiet", "--no-plot"]) == 0
    assert not live.exists() and not _temporaries(out)


def test_concurrent_runs_into_one_directory_end_with_a_lone_runs_results(tmp_path):
    config, out = _config(tmp_path, SWEEP), tmp_path / "out"
    processes = [
        _kvsim("run", str(config), "--output", str(out), "--quiet", "--no-plot", "-j", "1")
        for _ in range(3)
    ]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    for code, err in outcomes:
        if code != 0:
            assert "another kvsim run" in _one_line_error(code, err)
    assert any(code == 0 for code, _err in outcomes)
    lone, _ = execute(plan(_config(tmp_path, SWEEP, "lone"), output=tmp_path / "lone"), jobs=1,
                      **QUIET)
    together = pd.read_csv(out / "summary.csv")
    pd.testing.assert_frame_equal(together, pd.read_csv(tmp_path / "lone" / "summary.csv"))
    assert len(together) == len(lone) == 12 and not _temporaries(out)
    # what the runs that stopped did not do is complete: a run now has nothing left to do
    _summary, report = execute(plan(config, output=out), jobs=1, **QUIET)
    assert report.skipped == 12 and report.completed == 0


# -- class 7: the file system refusing, and foreign files, in one line ---------------------------


def _deny_writes_under(monkeypatch, directory: Path) -> None:
    """``directory`` read-only for this process, root included (root ignores permission bits)."""
    directory.chmod(0o555)
    real_access = os.access

    def access(path, mode, **kwargs):
        inside = Path(os.path.abspath(path)).is_relative_to(directory)
        return False if inside and mode & os.W_OK else real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("read-only directory", "is not writable"),
        ("under a read-only directory", "is not writable"),
        ("an existing file", "is a file, not a directory"),
        ("under a file", "is a file, so no directory can be made under it"),
        ("a name too long", "is 300 bytes long"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch, case, expected
):
    config = _config(tmp_path, TINY)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (tmp_path / "file").write_text("keep")
    output = {
        "read-only directory": blocked,
        "under a read-only directory": blocked / "out",
        "an existing file": tmp_path / "file",
        "under a file": tmp_path / "file" / "out",
        "a name too long": tmp_path / ("x" * 300),
    }[case]
    _deny_writes_under(monkeypatch, blocked)
    line = _cli_error(capsys, "run", str(config), "--output", str(output), "--quiet")
    assert "--output: cannot write results there" in line and expected in line
    assert len(line) < 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "exp.yaml", "file"]
    assert list(blocked.iterdir()) == [] and (tmp_path / "file").read_text() == "keep"


def test_an_experiment_name_too_long_for_a_file_name_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sim.experiment.planning.REPO_ROOT", tmp_path)
    config = _config(tmp_path, {**TINY, "name": "n" * 300})
    line = _cli_error(capsys, "run", str(config), "--quiet")
    assert "name (results/NAME): cannot write results there" in line and "300 bytes" in line
    assert not (tmp_path / "results").exists()


def _disk_full(monkeypatch, spare: tuple[str, ...] = ()) -> None:
    """Every write of a result file, summary or plot (but those named in ``spare``) creates its
    (temporary) file, then fails as a full disk does."""
    import matplotlib.figure

    real = {"write_text": Path.write_text, "to_parquet": pd.DataFrame.to_parquet,
            "to_csv": pd.DataFrame.to_csv, "savefig": matplotlib.figure.Figure.savefig}

    def full(method: str, target, path, *args, **kwargs):
        """``target.method(path, ...)``, or ``path.method(...)`` when ``target`` is None."""
        if path is None or any(f".{name}.tmp-" in Path(path).name for name in spare):
            call = [x for x in (target, path) if x is not None]
            return real[method](*call, *args, **kwargs)
        Path(path).write_bytes(b"")  # the empty file a failed write leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Path, "write_text",
                        lambda self, *a, **k: full("write_text", None, self, *a, **k))
    monkeypatch.setattr(pd.DataFrame, "to_parquet",
                        lambda self, path, *a, **k: full("to_parquet", self, path, *a, **k))
    monkeypatch.setattr(pd.DataFrame, "to_csv",
                        lambda self, path=None, *a, **k: full("to_csv", self, path, *a, **k))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, path, *a, **k: full("savefig", self, path, *a, **k))


SUMMARIES = ("experiment.yaml", "summary.csv", "summary.md")


@pytest.mark.parametrize(
    ("spare", "force", "fails"),
    [
        ((), False, "experiment.yaml"),
        (("experiment.yaml",), False, "summary.csv"),
        (("experiment.yaml",), True, "summary.csv"),  # the runs' files fail first, then this
        (SUMMARIES, False, "accuracy_vs_latency.png"),
    ],
    ids=["experiment", "summary", "forced-runs", "plot"],
)
def test_a_full_disk_on_a_rerun_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch,
                                                               spare, force, fails):
    config, out = _config(tmp_path, TINY), tmp_path / "out"
    assert main(["run", str(config), "--output", str(out), "--quiet"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    _disk_full(monkeypatch, spare)
    argv = ["run", str(config), "--output", str(out), "--quiet", "-j", "1"]
    code = main(argv + (["--force"] if force else []))
    err = capsys.readouterr().err
    line = _one_line_error(code, err)
    assert f"cannot write {out / fails}: No space left on device" in line
    assert not _temporaries(out), "a failed write removes its temporary"
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    changed = [p.name for p in before if after[p] != before[p]]
    assert set(changed) <= set(spare), "no result was lost; only what was spared was rewritten"


def test_progress_reports_leave_no_temporary_on_a_full_disk(tmp_path, monkeypatch):
    from sim.experiment.group_progress import ProgressFile

    _disk_full(monkeypatch)
    ProgressFile(tmp_path / "group.json")({"run": "x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "entry",
    [[1, 2], None, b"\x80\x04 truncated", b"not a pickle"],
    ids=["list", "none", "truncated", "garbage"],
)
def test_a_pass_cache_entry_of_the_wrong_type_is_a_miss(tmp_path, monkeypatch, entry):
    cache = tmp_path / "passes"
    monkeypatch.setenv("KVSIM_PASS_CACHE", str(cache))
    first, _ = execute(plan(_config(tmp_path, TINY), output=tmp_path / "first"), jobs=1, **QUIET)
    entries = sorted(cache.glob("*.pkl"))
    assert len(entries) == 2
    for path in entries:
        path.write_bytes(entry if isinstance(entry, bytes) else pickle.dumps(entry))
    again, report = execute(plan(_config(tmp_path, TINY, "again"), output=tmp_path / "again"),
                            jobs=1, **QUIET)
    assert report.passes == 2 and report.cached_passes == 0 and not report.failed
    pd.testing.assert_frame_equal(first, again)
    _, report = execute(plan(_config(tmp_path, TINY, "third"), output=tmp_path / "third"),
                        jobs=1, **QUIET)
    assert report.cached_passes == 2  # the entries were replaced by good ones


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plotted")
    config = tmp / "exp.yaml"
    config.write_text(yaml.safe_dump({**TINY, "sweep": {"grid": {"policy.budget": [64, 96]}}}))
    execute(plan(config, output=tmp / "out"), jobs=1, **QUIET)
    return tmp / "out"


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        ("experiment.yaml", "name: [unclosed\n", "invalid YAML"),
        ("experiment.yaml", "- a\n- b\n", "expected a mapping of experiment settings, got list"),
        ("experiment.yaml", "42\n", "expected a mapping of experiment settings, got int"),
        ("experiment.yaml", b"\x00\x01\xff\xfe", "not UTF-8 text"),
        ("experiment.yaml", "name: x\nfigures: 3\n", "figures must be a list"),
        ("experiment.yaml", "name: x\nfigures: [no_such_figure]\n", "no_such_figure"),
        ("experiment.yaml", "name: x\nsweep: [a]\n", "sweep must be a mapping"),
        ("experiment.yaml", "name: x\nsweep: {grid: 3}\n", "sweep.grid must be a mapping"),
        ("experiment.yaml", "name: x\nplot: maybe\n", "plot must be bool"),
        ("experiment.yaml", "name: x\nrecord: [1]\n", "record must be a mapping"),
        ("summary.csv", "a,b\n1,2\n", "no column run_id, run"),
        ("summary.csv", b"\x89PNG\r\n\x1a\n\x00\x00", "summary.csv"),
        ("summary.csv", "", "unreadable"),
        ("summary.csv", "run_id,run,policy.budget,latency_ms_mean\n1,full,64,fast\n",
         "latency_ms_mean holds"),
    ],
)
def test_plot_refuses_foreign_or_invalid_results_in_one_line(tmp_path, capsys, results_dir, file,
                                                             content, expected):
    import shutil

    copy = tmp_path / "results"
    shutil.copytree(results_dir, copy)
    target = copy / file
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = sorted(p.name for p in copy.rglob("*"))
    line = _cli_error(capsys, "plot", str(copy))
    assert expected in line and file in line
    assert sorted(p.name for p in copy.rglob("*")) == before, "nothing drawn, nothing left"


def test_plot_summary_without_a_sweep_axis_column_is_refused(tmp_path, capsys, results_dir):
    import shutil

    copy = tmp_path / "results"
    shutil.copytree(results_dir, copy)
    summary = pd.read_csv(copy / "summary.csv").drop(columns="policy.budget")
    summary.to_csv(copy / "summary.csv", index=False)
    assert "no column policy.budget" in _cli_error(capsys, "plot", str(copy))


def test_plot_into_a_read_only_directory_is_one_line(tmp_path, capsys, results_dir, monkeypatch):
    import shutil

    import matplotlib.figure

    copy = tmp_path / "results"
    shutil.copytree(results_dir, copy)

    def refused(self, path, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refused)
    line = _cli_error(capsys, "plot", str(copy))
    assert f"cannot write {copy / 'accuracy_vs_latency.png'}: Permission denied" in line
    assert not _temporaries(copy)


@pytest.mark.parametrize("case", ["under a file", "in a read-only directory", "a name too long",
                                  "existing"])
def test_capture_checks_its_output_before_loading_the_model(tmp_path, capsys, monkeypatch, case):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("sim.trace.capture.load_model", never)
    monkeypatch.setattr("sim.trace.capture.import_capture_deps", never)
    (tmp_path / "file").write_text("keep")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (tmp_path / "existing").mkdir()
    _deny_writes_under(monkeypatch, blocked)
    out = {
        "under a file": tmp_path / "file" / "trace",
        "in a read-only directory": blocked / "trace",
        "a name too long": tmp_path / ("t" * 250),
        "existing": tmp_path / "existing",
    }[case]
    started = time.perf_counter()
    line = _cli_error(capsys, "capture", "--prompt-len", "64", "--decode-steps", "4",
                      "--out", str(out))
    assert time.perf_counter() - started < 5
    assert str(out)[:40] in line or "already exists" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "existing", "file"]
