"""What a local worker process of ``kvsim run`` does when it starts: it leaves Ctrl-C to the
coordinator, and it never outlives the coordinator.

A worker of the local process pool (:func:`sim.experiment.runner.execute`) ignores SIGINT (the
coordinator stops its workers on Ctrl-C), ends at once on SIGTERM (the default action: the
coordinator terminates its workers when it is interrupted or terminated itself), and ends with
its parent:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (``man 2 PR_SET_PDEATHSIG``): the kernel sends
  SIGTERM the moment the coordinator dies, SIGKILL included;
- everywhere, a daemon thread compares ``os.getppid()`` with the coordinator's pid every
  ``WATCH_INTERVAL_S`` and sends itself SIGTERM once the worker has been re-parented.

A worker ended this way may leave a half-written run directory under a temporary name
(:mod:`sim.atomic`); the next ``kvsim run`` into the same results directory removes it, under the
results directory's lock (:func:`sim.experiment.store.results_lock`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

#: seconds between two checks of the portable parent watchdog
WATCH_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def initialize(parent_pid: int) -> None:
    """The pool's initializer: run in each worker process before any work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a forked worker inherits the coordinator's SIGTERM handler (raise, then clean up); a
    # worker must end at once instead: an exception would only be reported to a dead parent
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (an unusual libc): the watchdog remains
            pass
    if os.getppid() != parent_pid:  # the parent died before the worker could ask
        _end()
    threading.Thread(
        target=_watch, args=(parent_pid,), name="kvsim-parent-watchdog", daemon=True
    ).start()


def _watch(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != parent_pid:
            _end()


def _end() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # the default action: end now, whatever runs
    time.sleep(WATCH_INTERVAL_S)
    os._exit(128 + signal.SIGTERM)  # pragma: no cover - only if SIGTERM was blocked
