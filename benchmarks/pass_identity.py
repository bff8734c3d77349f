"""The policy passes' output and speed before and after a change to them, on a real trace.

A speed-up of the policy passes (:func:`sim.policy_pass.run_policy_pass`: each policy's
selections, the accuracy metrics of :mod:`sim.metrics.accuracy` and the cluster records of
:mod:`sim.metrics.clusters`) must not change any result. This script runs the passes of the
policies the ``experiments/long_*.yaml`` files use (static update, ClusterKV, DynaKV at each
split buffer size of ``long_fig11_split_buffer`` and at the budgets of ``long_fig15_budget``,
token-level top-k, Quest, H2O, StreamingLLM, InfiniGen, PQCache, the oracle and full
attention), each with ``accuracy_every`` 1 and 8, and dumps everything a pass returns: every
field of every layer's :class:`~sim.policies.base.LayerSelection` (selections, index vectors,
groups, relabels, forced reads, split buffers, co-retrieval counts, DRAM window), the accuracy
records and the cluster records. ``compare`` checks two dumps for exact equality (same values,
NaNs in the same places, same dtypes and shapes). ``time`` measures the pass of some policies
for two source trees (e.g. the pre-change code unpacked with ``git archive``), alternating
child processes so both see the same load.

    python benchmarks/pass_identity.py dump OUT_DIR [--config NAME ...] [--every K ...]
    python benchmarks/pass_identity.py compare BEFORE_DIR AFTER_DIR
    python benchmarks/pass_identity.py time --base-src DIR [--repeat R] [--config NAME ...]
        [--every K ...]

Every run goes to its own pickle in ``OUT_DIR`` (one in memory at a time). Passes run on one
thread (``workers=1``), as ``benchmarks/bench_long.py`` measures them. ``--decode-from N``
replays the trace from position ``N`` (:func:`sim.trace.split.split_trace`), ``--layers``
limits the pass to some trace layers (for quick checks; the other layers are not run).

Default trace: SmolLM2-135M on pydoc, teacher-forced, 512 + 2048 positions (a long decode of
``long_regime_map``'s), read from ``$KVSIM_TRACE_CACHE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

from child_runs import add_identity_commands, child, code_trees, median

DEFAULT_TRACE = "smollm2-135m_pydoc_p512_d2048_tf_d9825447"
EVERY = (1, 8)

#: name -> policy spec (the long_* files' policies; the layouts and caches are the replay's)
CONFIGS: dict[str, dict] = {
    "static_clusters": {"type": "static_clusters", "budget": 0.05},
    "clusterkv": {"type": "clusterkv", "budget": 0.05},
    "dynakv": {"type": "dynakv", "budget": 0.05},
    "dynakv_bmax1": {"type": "dynakv", "budget": 0.05, "buffer_max": 1},
    "dynakv_bmax4": {"type": "dynakv", "budget": 0.05, "buffer_max": 4},
    "dynakv_budget02": {"type": "dynakv", "budget": 0.02},
    "dynakv_budget20": {"type": "dynakv", "budget": 0.2},
    "token_topk": {"type": "token_topk", "budget": 0.05},
    "quest": {"type": "quest", "budget": 0.05},
    "h2o": {"type": "h2o", "budget": 0.05},
    "streaming_llm": {"type": "streaming_llm", "budget": 0.05},
    "infinigen": {"type": "infinigen", "budget": 0.05},
    "pqcache": {"type": "pqcache", "budget": 0.05},
    "oracle": {"type": "oracle", "budget": 0.05},
    "full": {"type": "full"},
}


def open_view(path: str, decode_from: int | None) -> Any:
    from sim.trace.format import open_trace
    from sim.trace.split import split_trace

    trace = open_trace(path)
    return trace if decode_from is None else split_trace(trace, decode_from)


def run_pass(trace: Any, name: str, every: int, layers: list[int] | None) -> Any:
    """The policy pass of config ``name`` (one thread), all layers or only ``layers``."""
    from sim.policies import POLICIES
    from sim.policy_pass import run_policy_pass

    policy = POLICIES.create(dict(CONFIGS[name]))
    if layers is None:
        return run_policy_pass(trace, policy, seed=0, accuracy_every=every, workers=1)
    import sim.policy_pass as pass_module

    full = pass_module._layer_pass
    n_layers = trace.model.n_layers
    wanted = set(layers)

    class Subset:  # the pass walks range(n_layers): answer the wanted layers only
        def __init__(self) -> None:
            self.model = dataclasses.replace(trace.model, n_layers=len(layers))

        def __getattr__(self, attr: str) -> Any:
            return getattr(trace, attr)

    order = sorted(wanted)
    assert all(0 <= layer < n_layers for layer in order), order

    def layer_pass(_trace: Any, policy: Any, seed: int, layer: int, every: int = 1) -> Any:
        return full(trace, policy, seed, order[layer], every)

    pass_module._layer_pass = layer_pass  # type: ignore[assignment]
    try:
        return run_policy_pass(Subset(), policy, seed=0, accuracy_every=every,  # type: ignore[arg-type]
                               workers=1)
    finally:
        pass_module._layer_pass = full  # type: ignore[assignment]


def plain(value: Any) -> Any:
    """``value`` as plain containers of arrays and scalars (for pickling and comparison)."""
    import numpy as np

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__class__": type(value).__name__,
                **{f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)  # a copy of a view; memmaps become arrays
    return value


def dump(args: argparse.Namespace) -> None:
    import sim

    print(f"passes with {sim.__file__}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = open_view(args.trace, args.decode_from)
    for name in args.config or list(CONFIGS):
        for every in args.every or EVERY:
            started = time.perf_counter()
            pp = run_pass(trace, name, every, args.layers)
            record = {
                "selections": [plain(s) for s in pp.selections],
                "accuracy": pp.accuracy,
                "clusters": pp.clusters,
                "meta": (pp.prompt_len, pp.decode_steps, pp.accuracy_every),
            }
            with (out / f"{name}_every{every}.pkl").open("wb") as handle:
                pickle.dump(record, handle, protocol=pickle.HIGHEST_PROTOCOL)
            print(f"{name:<18} every {every}: pass {pp.wall_s:7.2f} s "
                  f"(with the dump {time.perf_counter() - started:.2f} s)", flush=True)


def differences(a: Any, b: Any, where: str) -> list[str]:
    """Where ``a`` and ``b`` differ in value, dtype, shape or type ([] if they are equal)."""
    import numpy as np
    import pandas as pd

    if type(a) is not type(b):
        return [f"{where}: type {type(a).__name__} != {type(b).__name__}"]
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"]
        nan = a.dtype.kind in "fc"
        if not np.array_equal(a, b, equal_nan=nan):
            return [f"{where}: values differ"]
        return []
    if isinstance(a, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        except AssertionError as exc:
            return [f"{where}: {str(exc)[:300]}"]
        return [d for c in a.columns
                for d in differences(a[c].to_numpy(), b[c].to_numpy(), f"{where}.{c}")]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(args: argparse.Namespace) -> None:
    before = {p.name: p for p in Path(args.before).glob("*.pkl")}
    after = {p.name: p for p in Path(args.after).glob("*.pkl")}
    failed = sorted(set(before) ^ set(after))
    for run in sorted(set(before) & set(after)):
        with before[run].open("rb") as handle:
            a = pickle.load(handle)
        with after[run].open("rb") as handle:
            b = pickle.load(handle)
        found = differences(a, b, run)
        if found:
            print(f"{run}: DIFFERS: " + "; ".join(found[:5]))
            failed.append(run)
    n = len(set(before) & set(after))
    unpaired = len(set(before) ^ set(after))  # in one dump only: counted as differing
    print(f"{n - (len(failed) - unpaired)} runs equal, {len(failed)} differ"
          + (f": {failed}" if failed else ""))
    sys.exit(1 if failed or not n else 0)


TIME = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import pass_identity as pi
import sim.policy_pass as pass_module
trace = pi.open_view(sys.argv[2], json.loads(sys.argv[5]))
layer_pass, cpu = pass_module._layer_pass, []

def timed(*args, **kwargs):  # the CPU time of the thread running the layer
    started = time.thread_time()
    try:
        return layer_pass(*args, **kwargs)
    finally:
        cpu.append(time.thread_time() - started)

pass_module._layer_pass = timed
pp = pi.run_pass(trace, sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[6]))
import sim
print(json.dumps({"wall_s": pp.wall_s, "cpu_s": sum(cpu), "sim": sim.__file__}))
"""


def timing(args: argparse.Namespace) -> None:
    here = str(Path(__file__).resolve().parent)
    trees = code_trees(args.base_src)
    names = args.config or ["dynakv", "static_clusters", "clusterkv", "token_topk"]
    everies = args.every or [8]
    times: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(args.repeat):
        for name in names:
            for every in everies:
                for tree, src in trees.items():
                    result = child(TIME, here, args.trace, name, str(every),
                                   json.dumps(args.decode_from), json.dumps(args.layers),
                                   src=src, cwd=here)  # not the repository: see child()
                    for clock in ("wall_s", "cpu_s"):
                        times.setdefault((name, every, tree, clock), []).append(result[clock])
    print("one thread; median of the runs, each run [before, after] alternating; the CPU "
          "time of the thread running the layers is steadier than the wall time under load")
    print(f"{'config':<18} {'every':>5} {'wall before s':>14} {'after s':>8} {'ratio':>6}"
          f" {'CPU before s':>13} {'after s':>8} {'ratio':>6}")
    for name in names:
        for every in everies:
            cells = []
            for clock in ("wall_s", "cpu_s"):
                mb, ma = (median(times[(name, every, t, clock)]) for t in trees)
                cells.append(f"{mb:{14 if clock == 'wall_s' else 13}.2f} {ma:8.2f} {mb / ma:6.2f}")
            print(f"{name:<18} {every:5d} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(Path(os.environ.get(
        "KVSIM_TRACE_CACHE", "traces/cache")) / DEFAULT_TRACE))
    parser.add_argument("--decode-from", type=int, default=None,
                        help="replay the trace from this position (default: its own prompt)")
    parser.add_argument("--layers", type=lambda text: [int(x) for x in text.split(",")],
                        default=None, help="only these trace layers, e.g. 2,9 (default: all)")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS))
    parser.add_argument("--every", action="append", type=int, help="accuracy_every (1 and 8)")
    add_identity_commands(parser)
    args = parser.parse_args()
    {"dump": dump, "compare": compare, "time": timing}[args.command](args)


if __name__ == "__main__":
    main()
