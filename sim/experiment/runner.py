"""Running a plan: traces first, then pass groups on local processes or a Dask cluster.

``execute`` is the whole of ``kvsim run``:

1. obtain every trace the plan needs (capturing missing ones, one at a time) and verify each
   once (:mod:`sim.trace.verified`) -- so a trace that cannot be captured or is corrupt stops
   the experiment before anything is written;
2. take the results directory's lock (:func:`sim.experiment.store.results_lock`: another run
   writing there stops this one in one line) and remove what a killed run left there;
3. skip runs whose result directory is complete (unless ``force``);
4. send each pass group (runs sharing a policy pass, see :mod:`sim.experiment.planning`) to a
   worker (:func:`sim.experiment.pass_group.run_group`):
   in-process when there is one worker or one group, else a local process pool (whose workers
   end with this process, :mod:`sim.experiment.worker`), or a Dask cluster when a scheduler
   address is given; workers write each run as it completes;
5. show progress (runs done, estimated time left) by watching result directories appear, and
   inside the running groups (policy pass: layers done; replay: steps done) from the progress
   each group reports (:mod:`sim.experiment.group_progress`);
6. write the summary of every completed run of the plan.

An interrupted sweep (Ctrl-C, SIGTERM, a crash, a lost worker) keeps every completed run;
running the same command again does only what is missing. A failing pass group is reported in
one line and the others go on; ``KVSIM_DEBUG=1`` re-raises it with its traceback instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sim.errors import KvsimError
from sim.experiment import worker
from sim.experiment.group_progress import describe, read_progress
from sim.experiment.pass_group import pass_cache_dir, run_group
from sim.experiment.planning import Plan, check_dram_totals
from sim.experiment.runs import PassGroup, RunPlan, code_fingerprint
from sim.experiment.store import (
    read_summary,
    remove_stale_temporaries,
    results_lock,
    write_experiment,
    write_summary,
)
from sim.paths import trace_cache_dir
from sim.progress import progress as progress_bar
from sim.result_files import PROGRESS_DIR, RUN_SUMMARY
from sim.trace.format import open_trace
from sim.trace.verified import is_verified, verify_once

POLL_S = 0.5
#: seconds a stopped worker has to end before it is killed
STOP_TIMEOUT_S = 5.0
#: traces from this size on take a noticeable time to verify (~350 MiB/s): say so
_VERIFY_NOTE_BYTES = 64 << 20


@dataclass
class Report:
    """What a run of the plan did: counts, times and the policy-pass reuse it gained."""

    planned: int = 0
    skipped: int = 0
    completed: int = 0
    failed: list[str] = field(default_factory=list)
    passes: int = 0  # policy passes computed
    cached_passes: int = 0  # policy passes loaded from the pass cache
    pass_s: float = 0.0
    reuse_saved_s: float = 0.0  # pass compute time (worker CPU) not spent thanks to reuse
    wall_s: float = 0.0
    workers: int = 1
    backend: str = "local"
    closed_loop: bool = False  # runs inside the model: decodes, not policy passes

    def lines(self) -> list[str]:
        out = [
            f"{self.completed} of {self.planned} runs done in {self.wall_s:.1f} s "
            f"({self.skipped} already complete) on {self.workers} {self.backend} worker(s)"
        ]
        if self.closed_loop and self.passes:
            out.append(
                f"closed-loop decodes: {self.passes} runs in {self.pass_s:.1f} s (each worker "
                "prefills a prompt and decodes full attention's reference once)"
            )
        elif self.passes or self.cached_passes:
            out.append(
                f"policy passes: {self.passes} computed ({self.pass_s:.1f} s), "
                f"{self.cached_passes} from the pass cache, for {self.completed} runs; reuse "
                f"saved ~{self.reuse_saved_s:.1f} s of pass compute"
            )
        return out


def obtain_traces(
    plan: Plan, progress: bool, log: Callable[[str], None]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Trace key -> (trace directory, its verified fingerprint) for every trace of the plan,
    captured when missing and verified once (:mod:`sim.trace.verified`): a corrupt trace stops
    the run here, before anything is written. Traces given by path are verified before any
    capture starts, so a corrupt one costs no capture time."""
    from sim.trace.capture import CaptureSettings, get_or_capture

    cache_dir = trace_cache_dir()
    paths = {}
    # traces given by path first (False sorts before True)
    for key, source in sorted(plan.traces.items(), key=lambda item: item[1].path is None):
        if source.path is not None:
            path = source.path
        else:
            assert source.capture is not None  # a TraceSource has a path or capture settings
            settings = CaptureSettings(**source.capture)
            if not (cache_dir / settings.key()).exists():
                log(f"capturing trace {source.name} (cached afterwards under {cache_dir})")
            path = str(get_or_capture(settings, cache_dir, progress=progress))
        paths[key] = (path, _verified(path, log))
    return paths


def _verified(path: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The fingerprint of the trace at ``path``, verified now unless it was before."""
    trace = open_trace(path)
    if trace.size_bytes >= _VERIFY_NOTE_BYTES and not is_verified(trace):
        log(
            f"verifying trace {path} ({trace.size_bytes / 2**20:.0f} MiB: checksums and "
            "finite values; once, the verdict is kept beside it)"
        )
    fingerprint, _ran = verify_once(trace)
    return fingerprint


def _make_executor(workers: int, scheduler: str | None):
    if scheduler:
        try:
            from dask.distributed import Client
        except ImportError:
            raise KvsimError(
                "--scheduler needs Dask: pip install -e '.[dask]'"
            ) from None
        try:
            client = Client(scheduler, timeout="5s")
        except (OSError, TimeoutError) as exc:
            raise KvsimError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        n = max(1, len(client.scheduler_info().get("workers", {})))
        return client.get_executor(pure=False), client, n
    # workers leave Ctrl-C to this process and end with it (sim.experiment.worker)
    pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=worker.initialize,
                                  initargs=(os.getpid(),))
    return pool, None, workers


def execute(
    plan: Plan,
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> tuple[pd.DataFrame, Report]:
    """Run what the plan still needs; returns the summary of all its completed runs."""
    started = time.perf_counter()
    runs = plan.unique_runs()
    report = Report(planned=len(runs), closed_loop=plan.config.closed_loop is not None)
    if plan.config.closed_loop is not None:
        from sim.experiment.closed_loop import check_texts

        # the model loads and the text is long enough: found before anything is written (for
        # the runs still to do: a finished experiment reruns without loading the model)
        check_texts([run for run in runs if force or not plan.is_complete(run)],
                    str(plan.source))
    traces = obtain_traces(plan, progress, log)
    # the traces captured just now are known only here: checked before anything is written
    paths = {key: path for key, (path, _) in traces.items()}
    plan.check_traces(paths)
    check_dram_totals(plan, paths)
    with results_lock(plan.output_dir):
        summary = _execute_locked(plan, runs, traces, jobs, scheduler, force, progress, log,
                                  report)
    report.wall_s = time.perf_counter() - started
    for line in report.lines():
        log(line)
    if report.failed:
        raise KvsimError(
            f"{len(report.failed)} pass group(s) failed ({report.failed[0]}); completed runs are "
            "saved, run the same command again to retry the rest"
        )
    return summary, report


def _execute_locked(
    plan: Plan,
    runs: list[RunPlan],
    traces: dict[str, tuple[str, dict[str, Any]]],
    jobs: int | None,
    scheduler: str | None,
    force: bool,
    progress: bool,
    log: Callable[[str], None],
    report: Report,
) -> pd.DataFrame:
    """What :func:`execute` does holding the results directory's lock: everything it writes."""
    write_experiment(plan)
    remove_stale_temporaries(plan.output_dir)
    pending = [run for run in runs if force or not plan.is_complete(run)]
    report.skipped = len(runs) - len(pending)
    if report.skipped:
        pending_ids = {run.run_id for run in pending}
        skipped = [run for run in runs if run.run_id not in pending_ids]
        stale = plan.made_by_other_code(skipped, code_fingerprint())
        if stale:
            log(
                f"note: {stale} of the {report.skipped} complete runs were made by different "
                "kvsim code; they are reused as they are (--force reruns them)"
            )
    groups = plan.groups(pending)
    if plan.config.closed_loop is not None:
        groups = _by_prompt(groups)
    jobs = max(1, jobs or os.cpu_count() or 1)
    workers = 1 if scheduler is None and (jobs == 1 or len(groups) <= 1) else jobs
    report.workers, report.backend = workers, "dask" if scheduler else "local"
    if plan.config.closed_loop is not None:
        log(
            f"{plan.config.name}: {len(runs)} closed-loop runs ({plan.config.closed_loop.task}"
            f"); {report.skipped} complete, {len(pending)} to run"
        )
    else:
        log(
            f"{plan.config.name}: {len(runs)} runs in {len(plan.groups(runs))} policy "
            f"passes over {len(plan.traces)} trace(s); {report.skipped} complete, "
            f"{len(pending)} to run"
        )
    if pending:
        _run_groups(plan, groups, traces, workers, scheduler, progress, report)
    summary = read_summary(plan)
    write_summary(plan, summary)
    return summary


def _by_prompt(groups: list[PassGroup]) -> list[PassGroup]:
    """Closed-loop runs sharing a prompt (their ``trace.key``) next to each other, prompts in
    order of first appearance: a worker keeps one prompt's prefill at a time
    (:mod:`sim.experiment.closed_loop`), so it prefills each prompt about once whatever order
    a sweep's axes list its runs in."""
    first: dict[str, int] = {}
    for group in groups:
        first.setdefault(group.runs[0].trace.key, len(first))
    return sorted(groups, key=lambda group: first[group.runs[0].trace.key])


def _run_groups(
    plan: Plan,
    groups: list[PassGroup],
    traces: dict[str, tuple[str, dict[str, Any]]],
    workers: int,
    scheduler: str | None,
    progress: bool,
    report: Report,
) -> None:
    total = sum(len(group.runs) for group in groups)
    bar = progress_bar(total, plan.config.name, "run", enabled=progress, leave=True)
    # Pass threads per worker: the cores divided among the workers (results do not depend on it).
    threads = max(1, (os.cpu_count() or 1) // workers)

    def account(group: PassGroup, result: dict[str, Any]) -> None:
        uses = len(result["rows"])
        if result.get("pass_cached"):
            report.cached_passes += 1
            report.reuse_saved_s += result["pass_s"] * uses
        else:
            report.passes += 1
            report.pass_s += result["pass_s"]
            report.reuse_saved_s += result["pass_s"] * (uses - 1)
        report.completed += uses

    cache = pass_cache_dir()

    def args(group: PassGroup) -> tuple[list[RunPlan], str, str, int, str | None]:
        runs_dir = str(plan.runs_dir)
        return (group.runs, traces.get(group.runs[0].trace.key, ("", {}))[0], runs_dir,
                threads, None if cache is None else str(cache))

    def verified(group: PassGroup) -> dict[str, Any] | None:
        return traces[group.runs[0].trace.key][1] if group.runs[0].trace.key in traces else None

    work: Callable[..., dict[str, Any]] = run_group
    if plan.config.closed_loop is not None:  # a closed-loop run: no trace, no policy pass
        from sim.experiment.closed_loop import run_closed_loop_group

        work = run_closed_loop_group

    def failed(group: PassGroup, exc: BaseException) -> None:
        if os.environ.get("KVSIM_DEBUG"):
            raise exc
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        report.failed.append(f"{group.runs[0].label}: {message}")

    if workers == 1 and scheduler is None:

        def show(state: dict[str, Any]) -> None:
            bar.set_postfix_str(describe(state))
            bar.update(0)  # lets a log's progress write its line every 30 s

        for group in groups:
            try:
                account(group, work(*args(group), on_progress=show if progress else None,
                                         verified=verified(group)))
            except Exception as exc:  # the group's completed runs are already saved
                failed(group, exc)
            bar.update(len(group.runs))
        bar.close()
        return

    started = time.time()
    executor, client, n_workers = _make_executor(workers, scheduler)
    report.workers = n_workers
    progress_dir = plan.output_dir / PROGRESS_DIR
    progress_dir.mkdir(parents=True, exist_ok=True)

    def progress_file(group: PassGroup) -> str:
        return str(progress_dir / f"{group.pass_id}.json")

    futures = {
        executor.submit(work, *args(group), progress_file(group) if progress else None,
                        verified=verified(group)):
        group for group in groups
    }
    done_ids: set[str] = set()
    try:
        not_done = set(futures)
        while not_done:
            finished, not_done = cf.wait(not_done, timeout=POLL_S,
                                         return_when=cf.FIRST_COMPLETED)
            for future in finished:
                group = futures[future]
                try:
                    account(group, future.result())
                except Exception as exc:  # a worker died or a run raised
                    failed(group, exc)
            # progress from the run directories workers have finished so far
            now_done = {
                run.run_id for group in groups for run in group.runs
                if run.run_id not in done_ids and _written_since(plan, run, started)
            }
            done_ids |= now_done
            if progress:
                states = (read_progress(progress_file(futures[f])) for f in not_done)
                bar.set_postfix_str("; ".join(describe(s) for s in states if s))
            bar.update(len(now_done))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (sim.errors.Terminated)
        _stop(executor, client, list(futures))
        if client is None:  # the workers are gone: what they were writing is stale
            remove_stale_temporaries(plan.output_dir)
        bar.close()
        raise
    finally:
        shutil.rmtree(progress_dir, ignore_errors=True)
    bar.close()
    if client is not None:
        client.close()
    else:
        executor.shutdown(wait=True)


def _written_since(plan: Plan, run: Any, since: float) -> bool:
    path = plan.run_dir(run) / RUN_SUMMARY
    try:
        return path.stat().st_mtime >= since - 1.0
    except FileNotFoundError:
        return False


def _stop(executor: Any, client: Any, futures: list[Any]) -> None:
    """Stop every worker now; their half-written run directories are temporaries. Local
    workers are gone when this returns; a Dask cluster's pending tasks are cancelled (a task
    already running finishes on its worker, writing its run atomically)."""
    if client is not None:
        client.cancel(futures)
        client.close()
        return
    processes = list(getattr(executor, "_processes", {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=STOP_TIMEOUT_S)
        if process.is_alive():  # pragma: no cover - SIGTERM's default action ends a worker
            process.kill()
