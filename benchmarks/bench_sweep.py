"""Sweep throughput and worker memory: one sweep on 1 and 2 local workers and a 2-worker Dask
LocalCluster.

Prints, for one sweep on a real trace (default: SmolLM2-135M, pydoc, 2048 prompt + 128 decode
steps, captured and cached on first use) of 3 policies x 2 budgets x 3 flash bandwidths = 18 runs
in 6 policy passes (each pass is replayed on the 3 bandwidths, so both computed and reused passes
occur):

* wall time and runs per minute of a fresh sweep (new temporary output directory, ``force``);
* policy passes computed, their time and the pass time reuse saved (from
  ``sim.experiment.runner.Report``);
* peak RSS of each worker process: local pool children sampled with psutil while the sweep runs
  (and the exact largest child peak from ``getrusage(RUSAGE_CHILDREN)`` once they exit); one
  local worker is the process itself (its ``VmHWM``); Dask workers report their ``VmHWM``
  (else ``ru_maxrss``) through ``client.run`` at the end.

Each configuration runs in its own child process, so one's memory never counts toward another's.
With ``--figures`` it then times ``kvsim run`` on every ``experiments/fig*.yaml`` and
``experiments/table*.yaml`` (into temporary output directories; traces assumed cached).
Timings depend on the machine's load, which is printed beside them.

    python benchmarks/bench_sweep.py [--prompt-len 2048] [--decode-steps 128] [--figures]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name -> (backend, workers)
    "local-1": ("local", 1),
    "local-2": ("local", 2),
    "dask-2": ("dask", 2),
}
POLICIES = [
    {"type": "token_topk", "budget": 0.05},
    {"type": "static_clusters", "budget": 0.05},
    {"type": "dynakv", "budget": 0.05},
]
BUDGETS = [0.05, 0.1]
BANDWIDTHS_MB_S = [1000, 2100, 4200]  # UFS 3.1-class .. UFS 4.0 sequential read


def experiment(settings: dict, output: str) -> dict:
    return {
        "name": "bench_sweep",
        "seed": 0,
        "trace": {"capture": settings},
        "device": "ufs40-flagship",
        "model": "llama-3.2-1b",
        "cache": {"replacement": "lru", "capacity": 0.05},
        "policies": POLICIES,
        "sweep": {"grid": {"policy.budget": BUDGETS,
                           "device.flash.read_bandwidth_mb_s": BANDWIDTHS_MB_S}},
        "output": output,
        "plot": False,
    }


class RssSampler:
    """Peak RSS per process of this process's descendants (and optionally itself), by polling."""

    def __init__(self, include_self: bool, period_s: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._include_self = include_self
        self._period_s = period_s
        self.peak_mib: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        processes = self._me.children(recursive=True)
        if self._include_self:
            processes.append(self._me)
        for process in processes:
            try:
                rss = process.memory_info().rss / 2**20
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            self.peak_mib[process.pid] = max(self.peak_mib.get(process.pid, 0.0), rss)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._period_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which exec resets (``ru_maxrss`` keeps, across exec, the
    peak of the process that forked it -- e.g. a parent holding a capture model)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(config: str, settings: dict) -> dict:
    """One fresh sweep in this process; returns the figures as a dict (run in a child)."""
    import yaml

    from sim.experiment.planning import plan
    from sim.experiment.runner import execute

    backend, workers = CONFIGS[config]
    quiet = {"progress": False, "log": lambda _message: None}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"bench_sweep_{config}_") as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump(experiment(settings, str(Path(tmp) / "out"))))
        planned = plan(path)
        result: dict = {"config": config}
        if backend == "local":
            try:
                sampler = RssSampler(include_self=workers == 1)
            except ImportError:  # psutil comes with distributed; without it, getrusage only
                sampler = None
            if sampler is not None:
                with sampler:
                    _summary, report = execute(planned, jobs=workers, force=True, **quiet)
                # the pool's workers (a helper such as multiprocessing's resource tracker, if
                # any, is far smaller)
                result["rss_mib"] = sorted(sampler.peak_mib.values(), reverse=True)[:workers]
            else:
                _summary, report = execute(planned, jobs=workers, force=True, **quiet)
                result["rss_mib"] = []
            children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            result["rss_exact_mib"] = _peak_rss_mib() if workers == 1 else children
        else:
            from dask.distributed import Client, LocalCluster

            started = time.perf_counter()
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                result["cluster_start_s"] = time.perf_counter() - started
                _summary, report = execute(
                    planned, scheduler=cluster.scheduler_address, force=True, **quiet
                )
                peaks = client.run(_peak_rss_mib)
            result["rss_mib"] = sorted(peaks.values(), reverse=True)
            result["rss_exact_mib"] = max(peaks.values())
    result.update(
        planned=report.planned, completed=report.completed, failed=report.failed,
        passes=report.passes, pass_s=report.pass_s, reuse_saved_s=report.reuse_saved_s,
        wall_s=report.wall_s, workers=report.workers, backend=report.backend,
        load_before=load_before, load_after=os.getloadavg()[0],
    )
    return result


def _child(config: str, settings: dict) -> dict:
    # no pass cache: each configuration computes its own passes, so the rates compare
    env = {**os.environ, "KVSIM_PASS_CACHE": "off"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", config, "--settings", json.dumps(settings)],
        check=True, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_rss(values: list[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in values) if values else "-"


def run_figures(jobs: int | None) -> None:
    """``kvsim run`` on every experiments/fig*.yaml and table*.yaml, each timed separately."""
    from sim.errors import KvsimError
    from sim.experiment.planning import plan
    from sim.paths import trace_cache_dir
    from sim.trace.capture import CaptureSettings

    paths = sorted((REPO_ROOT / "experiments").glob("fig*.yaml"))
    paths += sorted((REPO_ROOT / "experiments").glob("table*.yaml"))
    print()
    if not paths:
        print("--figures: no experiments/fig*.yaml or table*.yaml yet; skipped")
        return
    print(f"{'experiment (kvsim run, fresh output)':<40} {'runs':>5} {'wall s':>8} "
          f"{'runs/min':>9}  load 1-min  note")
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="bench_sweep_figures_") as tmp:
        for path in paths:
            note = ""
            try:
                planned = plan(path)
                n_runs = len(planned.unique_runs())
                uncached = [
                    source.name for source in planned.traces.values()
                    if source.capture is not None
                    and not (trace_cache_dir() / CaptureSettings(**source.capture).key()).exists()
                ]
                if uncached:
                    note = "includes capturing " + ", ".join(uncached)
            except KvsimError as exc:
                n_runs, note = 0, f"invalid: {exc}"
            command = [sys.executable, "-m", "sim", "run", str(path), "--quiet", "--force",
                       "--output", str(Path(tmp) / path.stem)]
            if jobs:
                command += ["--jobs", str(jobs)]
            load = os.getloadavg()[0]
            started = time.perf_counter()
            # a fresh pass cache shared by the set: the figure set from scratch, with the
            # cross-experiment reuse a user gets
            env = {**os.environ, "KVSIM_PASS_CACHE": str(Path(tmp) / "pass-cache")}
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                                  env=env)
            wall = time.perf_counter() - started
            total += wall
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                note = f"FAILED (exit {done.returncode}): {lines[-1] if lines else ''}"
            rate = f"{n_runs / wall * 60:9.1f}" if n_runs and done.returncode == 0 else f"{'-':>9}"
            print(f"{path.name:<40} {n_runs:>5} {wall:8.1f} {rate}  {load:10.2f}  {note}")
    print(f"{'all ' + str(len(paths)) + ' experiments':<40} {'':>5} {total:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--text", default="pydoc")
    parser.add_argument("--config", action="append", choices=list(CONFIGS),
                        help="measure only these configurations (repeatable; default: all)")
    parser.add_argument("--figures", action="store_true",
                        help="also time kvsim run on every experiments/fig*.yaml and table*.yaml")
    parser.add_argument("--figures-jobs", type=int, help="--jobs for those runs (default: kvsim's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured

    if args.child:
        print(json.dumps(measure(args.child, json.loads(args.settings))))
        return

    from sim.paths import trace_cache_dir
    from sim.trace.capture import CaptureSettings, get_or_capture
    from sim.trace.format import open_trace

    settings = {"model": "smollm2-135m", "text": args.text, "prompt_len": args.prompt_len,
                "decode_steps": args.decode_steps}
    path = get_or_capture(CaptureSettings(**settings), trace_cache_dir(), progress=True)
    trace = open_trace(path)
    n_runs = len(POLICIES) * len(BUDGETS) * len(BANDWIDTHS_MB_S)
    print(f"trace {path.name}: {trace.prompt_len}+{trace.decode_steps} positions, "
          f"{trace.size_bytes / 2**20:.0f} MiB; {os.cpu_count()} CPUs")
    print(f"sweep: {len(POLICIES)} policies x {len(BUDGETS)} budgets x {len(BANDWIDTHS_MB_S)} "
          f"flash bandwidths = {n_runs} runs in {len(POLICIES) * len(BUDGETS)} policy passes "
          "(simulated llama-3.2-1b, cache 5% of KV)")
    print()
    print(f"{'configuration':<16} {'runs':>5} {'wall s':>7} {'runs/min':>9} {'passes':>7} "
          f"{'pass s':>7} {'reuse saved s':>14} {'load 1-min':>11}  peak RSS per worker MiB")
    for config in args.config or list(CONFIGS):
        r = _child(config, settings)
        rate = r["completed"] / r["wall_s"] * 60 if r["wall_s"] else 0.0
        extra = f"  (largest exact: {r['rss_exact_mib']:.0f})"
        if "cluster_start_s" in r:
            extra += f"  (cluster start {r['cluster_start_s']:.1f} s, not in wall)"
        if r["failed"]:
            extra += f"  FAILED: {r['failed'][0]}"
        load = f"{r['load_before']:.1f}->{r['load_after']:.1f}"
        print(f"{config:<16} {r['completed']:>5} {r['wall_s']:7.1f} {rate:9.1f} {r['passes']:>7} "
              f"{r['pass_s']:7.1f} {r['reuse_saved_s']:14.1f} {load:>11}  "
              f"{_fmt_rss(r['rss_mib'])}{extra}")
    if args.figures:
        run_figures(args.figures_jobs)


if __name__ == "__main__":
    main()
