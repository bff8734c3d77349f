"""Measurements in fresh child interpreters, so one measurement's imports, allocator state and
thread pools cannot colour the next (shared by bench_speed.py and bench_long.py)."""

from __future__ import annotations

import json
import subprocess
import sys


def child(code: str, *args: str) -> dict:
    """Run ``code`` with ``args`` in a new interpreter; its last stdout line is a JSON dict."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def fastest(repeat: int, code: str, *args: str) -> dict:
    """The run with the smallest total wall time of ``repeat`` child runs."""
    runs = [child(code, *args) for _ in range(max(1, repeat))]
    return min(runs, key=lambda r: r.get("wall_s", 0) + r.get("policy_s", 0) + r.get("sim_s", 0))
