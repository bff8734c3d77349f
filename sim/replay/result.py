"""A replay run to its end and its records assembled: :func:`simulate`.

The step records (:data:`sim.outputs.STEP_COLUMNS`, one row per decode step), the read
commands by size, the runs of contiguous entries read by length and the run's totals make a
:class:`sim.outputs.SimResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from sim.config import RecordIoSpec
from sim.outputs import STEP_COLUMNS, PolicyPass, SimResult
from sim.progress import progress as progress_bar
from sim.replay.process import Replay
from sim.replay.setup import SimSetup


def simulate(
    pp: PolicyPass,
    setup: SimSetup,
    progress: bool = False,
    on_step: Callable[[], None] | None = None,
    record_io: RecordIoSpec | None = None,
) -> SimResult:
    """Replay ``pp``'s selections on the device of ``setup``; deterministic. ``on_step`` is
    called after each decode step (progress reports). ``record_io``: also record the flash
    schedule of the sampled steps (:attr:`SimResult.io_schedule`)."""
    started = time.perf_counter()
    replay = Replay(pp, setup, record_io)
    bar = progress_bar(pp.decode_steps, f"{pp.policy.name}: simulate", "step", enabled=progress)
    tick = on_step
    if progress:
        def tick() -> None:
            bar.update()
            if on_step is not None:
                on_step()
    replay.env.process(replay.decode(tick))
    replay.env.run()
    bar.close()
    return _result(replay, pp, setup, started)


def _result(replay: Replay, pp: PolicyPass, setup: SimSetup, started: float) -> SimResult:
    """The records of a finished ``replay``, as a :class:`SimResult` (its wall time counted
    from ``started``, a :func:`time.perf_counter`, to the end of the assembly)."""
    run, io = replay.run, replay.io
    steps = pd.DataFrame(replay.records, columns=list(STEP_COLUMNS))
    steps.insert(0, "step", np.arange(pp.decode_steps, dtype=np.int32))
    size_counts = io.io_size_counts
    sizes = np.nonzero(size_counts)[0]
    io_sizes = pd.DataFrame(
        {"size_bytes": sizes * run.page_bytes, "commands": size_counts[sizes]}
    )
    length_counts = io.run_length_counts
    lengths = np.nonzero(length_counts)[0]
    run_lengths = pd.DataFrame({"run_entries": lengths, "runs": length_counts[lengths]})
    peak_cache = sum(c.peak_resident_entries for c in run.caches if c is not None)
    totals = {
        "entry_bytes": run.entry_bytes,
        "cache_capacity_bytes": setup.cache_capacity_bytes,
        "peak_cache_bytes": peak_cache * run.entry_bytes,
        "simulated_time_us": replay.env.now,
    }
    recorder = io.recorder
    schedule = None if recorder is None else recorder.schedule()
    return SimResult(steps, io_sizes, run_lengths, totals, time.perf_counter() - started,
                     schedule)
