"""Measurements in fresh child interpreters, so one measurement's imports, allocator state and
thread pools cannot colour the next (shared by bench_speed.py and bench_long.py), and the
before/after machinery of the identity scripts (replay_identity.py, pass_identity.py): a child
runs one source tree's kvsim, the trees alternate, the median of each is compared."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def child(code: str, *args: str, src: str | None = None, cwd: str | None = None) -> dict:
    """Run ``code`` with ``args`` in a new interpreter; its last stdout line is a JSON dict.

    ``src``: a source tree to import kvsim from (its ``PYTHONPATH``); the child must report
    ``sim.__file__`` as ``"sim"``, which is checked to lie in that tree. ``cwd``: the child's
    working directory (``-c`` puts it first on the path)."""
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
        env=env, cwd=cwd,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if src is not None:
        assert result["sim"].startswith(src), (result["sim"], src)
    return result


def fastest(repeat: int, code: str, *args: str) -> dict:
    """The run with the smallest total wall time of ``repeat`` child runs."""
    runs = [child(code, *args) for _ in range(max(1, repeat))]
    return min(runs, key=lambda r: r.get("wall_s", 0) + r.get("policy_s", 0) + r.get("sim_s", 0))


def code_trees(base_src: str) -> dict[str, str]:
    """The two source trees an identity script times: ``before`` (``--base-src``, e.g. a
    ``git archive`` of the previous commit) and ``after`` (this repository)."""
    return {"before": str(Path(base_src).resolve()),
            "after": str(Path(__file__).resolve().parents[1])}


def median(values: list[float]) -> float:
    """The upper median (the middle run of an odd count)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def add_identity_commands(parser: argparse.ArgumentParser) -> None:
    """The ``dump OUT`` / ``compare BEFORE AFTER`` / ``time --base-src DIR [--repeat N]``
    subcommands every identity script has."""
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump").add_argument("out")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    tim = sub.add_parser("time")
    tim.add_argument("--base-src", required=True, help="source tree of the code before")
    tim.add_argument("--repeat", type=int, default=3)
