"""What a worker is sent: one run's settings, a group of runs sharing a policy pass, and the
hashes that name them.

Plain, picklable data with no dependency on planning or drawing: a worker that unpickles a
:class:`RunPlan` imports this module and nothing heavier (no figures, no matplotlib).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TraceSource:
    """Where a run's trace comes from: an existing directory or capture settings."""

    key: str  # the stored trace: the capture's cache key, or "path:<absolute path>"
    name: str  # short name for tables and legends ("<trace>@<decode_from>" for a split)
    path: str | None = None
    capture: dict[str, Any] | None = None
    prompt_len: int = 0  # the prompt as replayed (decode_from, for a split)
    decode_from: int | None = None  # the split point (trace.decode_from); None: no split

    def identity(self) -> dict[str, Any]:
        """What identifies the trace as replayed: the stored trace, and the split if any (a
        run without one keeps the identity it had before splits existed)."""
        if self.decode_from is None:
            return {"trace": self.key}
        return {"trace": self.key, "decode_from": self.decode_from}


@dataclass
class RunPlan:
    """One run: one policy on one trace, device, cache and pipeline. Plain, picklable data."""

    run_id: str
    pass_id: str
    label: str
    point: dict[str, Any]
    trace: TraceSource
    policy: dict[str, Any]
    layout: dict[str, Any] | None  # None: chosen from the policy's output ("auto")
    device: dict[str, Any]
    model: dict[str, Any] | None  # simulated model geometry; None: the trace's own
    kv_dtype: str
    cache: dict[str, Any]  # replacement (spec), capacity (as written)
    pipeline: dict[str, Any]
    seed: int
    experiment: str
    record: dict[str, Any] = field(default_factory=dict)  # extra records (RecordSpec)
    accuracy_every: int = 1  # accuracy on decode steps 0, k, 2k, ... (accuracy_every)
    record_io: dict[str, Any] = field(default_factory=dict)  # flash schedule (RecordIoSpec)
    #: the closed-loop task (ClosedLoopSpec, defaults filled in); empty: a trace replay
    closed_loop: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """Everything that determines the run's results (what ``run_id`` hashes); the split
        point, ``accuracy_every`` and ``record_io`` only when set, so other runs keep their
        ids. A closed-loop run: its task, policy and seed (no device, cache or layout)."""
        if self.closed_loop:
            return {"closed_loop": self.closed_loop, "policy": self.policy, "seed": self.seed}
        return {
            **self.trace.identity(),
            **({"accuracy_every": self.accuracy_every} if self.accuracy_every != 1 else {}),
            "policy": self.policy,
            "layout": self.layout,
            "device": self.device,
            "model": self.model,
            "kv_dtype": self.kv_dtype,
            "cache": self.cache,
            "pipeline": self.pipeline,
            "seed": self.seed,
            **({"record": self.record} if self.record else {}),
            **({"record_io": self.record_io} if self.record_io else {}),
        }


@dataclass
class PassGroup:
    """Runs sharing one policy pass (same trace, policy spec and seed)."""

    pass_id: str
    runs: list[RunPlan]


def digest(payload: Any, length: int = 12) -> str:
    """Hex prefix of the SHA-256 of ``payload`` as canonical JSON (sorted keys): run ids, pass
    ids and pass-cache keys."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# Paths under sim/ that never change a run's records: drawing, the CLI, scheduling, and the
# replay of a finished run's I/O on real storage (it reads records, never writes them).
_PRESENTATION = ("figures/", "cli.py", "experiment/runner.py", "__main__.py", "io_replay/")


def code_fingerprint() -> str:
    """Hash of the kvsim source that decides a run's records (``sim/**/*.py`` except figures,
    CLI and scheduling), stored with each run and keying the pass cache, so reusing results
    made by different code is flagged or avoided."""
    root = Path(__file__).resolve().parents[1]
    sha = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(_PRESENTATION):
            continue
        sha.update(relative.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()[:12]
