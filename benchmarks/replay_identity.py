"""The replay's output and speed before and after a change to it, on a real trace.

A speed-up of the SimPy replay (:func:`sim.replay.simulate`) must not change any result. This
script replays a set of configurations (DynaKV with all its techniques and with each alone,
the baselines, several cache replacement policies; each with and without ``swap_layers``, in
fp8 and fp16) and dumps what a replay returns: the step records, I/O sizes, run lengths and
totals. ``compare`` then checks two dumps for exact equality. ``time`` measures the replay's
wall time per decode step of some configurations for two source trees (e.g. the pre-change
code unpacked with ``git archive``), alternating child processes so both see the same load.

    python benchmarks/replay_identity.py dump OUT.pkl [--steps N] [--config NAME ...]
    python benchmarks/replay_identity.py compare BEFORE.pkl AFTER.pkl
    python benchmarks/replay_identity.py time --base-src DIR [--steps N] [--repeat R]
        [--config NAME ...]

Policy passes are computed once per policy (accuracy on step 0 only: the replay never reads
it) and kept in ``--pass-dir`` (default ``/tmp/kvsim-replay-identity``); both trees replay the
same pickled passes. ``--steps N`` replays the first ``N`` decode steps only (the rest of the
records stay 0), for quick checks; the default is the whole trace.

Default settings are those of ``experiments/long_regime_map.yaml``: the 512 + 1024-token
SmolLM2 pydoc trace replayed with Llama-3.2-1B's sizes on a UFS 4.0 flagship with 8-bit
weights, a DRAM cache of 2% of the KV cache and a 5% budget.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import pickle
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from child_runs import add_identity_commands, child, code_trees, median

DEFAULT_TRACE = "traces/cache/smollm2-135m_pydoc_p512_d1024_tf_f886caf6"
ALL = {"stream_index": True, "overlap_transfer": True}

#: name -> (policy spec, layout, replacement, pipeline)
CONFIGS: dict[str, tuple[dict, dict, str, dict]] = {
    "dynakv_all": ({"type": "dynakv", "budget": 0.05}, {"type": "dual_head"},
                   "cluster_aligned", ALL),
    "dynakv_dual_head": ({"type": "dynakv", "budget": 0.05}, {"type": "dual_head"}, "lru", {}),
    "dynakv_write_buffer": ({"type": "dynakv", "budget": 0.05},
                            {"type": "dual_head", "write_buffer_groups": 4},
                            "cluster_aligned", ALL),
    "dynakv_cluster_aligned": ({"type": "dynakv", "budget": 0.05}, {"type": "sequence"},
                               "cluster_aligned", {}),
    "dynakv_stream_index": ({"type": "dynakv", "budget": 0.05}, {"type": "sequence"}, "lru",
                            {"stream_index": True}),
    "dynakv_overlap": ({"type": "dynakv", "budget": 0.05}, {"type": "sequence"}, "lru",
                       {"overlap_transfer": True}),
    "dynakv_lfu": ({"type": "dynakv", "budget": 0.05}, {"type": "dual_head"}, "lfu", {}),
    "dynakv_fifo": ({"type": "dynakv", "budget": 0.05}, {"type": "cluster"}, "fifo", {}),
    "dynakv_belady": ({"type": "dynakv", "budget": 0.05}, {"type": "dual_head"}, "belady", {}),
    "static_clusters": ({"type": "static_clusters", "budget": 0.05}, {"type": "sequence"},
                        "lru", {}),
    "static_clusters_cluster": ({"type": "static_clusters", "budget": 0.05},
                                {"type": "intra_inter"}, "lru", {}),
    "clusterkv": ({"type": "clusterkv", "budget": 0.05}, {"type": "sequence"}, "lru", {}),
    "token_topk": ({"type": "token_topk", "budget": 0.05}, {"type": "sequence"}, "lru", {}),
    "quest": ({"type": "quest", "budget": 0.05}, {"type": "sequence"}, "lru", {}),
    "h2o": ({"type": "h2o", "budget": 0.05}, {"type": "sequence"}, "lru", {}),
    "streaming_llm": ({"type": "streaming_llm", "budget": 0.05}, {"type": "sequence"}, "lru",
                      {}),
    "infinigen": ({"type": "infinigen", "budget": 0.05}, {"type": "sequence"}, "lru",
                  {"stream_index": True}),
}
DTYPES = ("fp8", "fp16")


def variants(names: list[str]) -> list[tuple[str, str, str, bool]]:
    """(run name, config, kv dtype, swap_layers) of every variant of ``names``."""
    return [
        (f"{name}/{dtype}/swap{int(swap)}", name, dtype, swap)
        for name in names for dtype in DTYPES for swap in (False, True)
    ]


def load_pass(trace_path: str, name: str, pass_dir: Path) -> Any:
    """The policy pass of config ``name`` (computed and pickled on first use)."""
    from sim.policies import POLICIES
    from sim.policy_pass import run_policy_pass
    from sim.trace.format import open_trace

    spec = CONFIGS[name][0]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = pass_dir / f"{Path(trace_path).name}_{key}.pkl"
    if path.exists():
        with path.open("rb") as handle:
            return pickle.load(handle)
    trace = open_trace(trace_path)
    started = time.perf_counter()
    pp = run_policy_pass(trace, POLICIES.create(dict(spec)), seed=0,
                         accuracy_every=trace.decode_steps, workers=1)
    print(f"policy pass {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    pass_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as handle:
        pickle.dump(pp, handle, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return pp


def replay(pp: Any, name: str, dtype: str, swap: bool, steps: int | None) -> Any:
    """:func:`sim.replay.simulate` of ``pp`` in one variant; only the first ``steps`` decode
    steps when given (the replay is built for the whole pass, then stops early)."""
    import sim.replay as engine
    from sim.config import PipelineSpec, load_model_geometry
    from sim.experiment.pass_group import cache_capacity_bytes
    from sim.hardware import load_device

    _, layout, replacement, pipeline = CONFIGS[name]
    device = load_device({"preset": "ufs40-flagship", "compute": {"weight_bits": 8}})
    target = load_model_geometry("llama-3.2-1b")
    n_positions = pp.prompt_len + pp.decode_steps
    setup = engine.SimSetup(
        device=device, target=target, kv_dtype=dtype,
        cache_capacity_bytes=cache_capacity_bytes(0.02, device, target, n_positions, dtype),
        replacement={"type": replacement}, layout=copy.deepcopy(layout),
        pipeline=PipelineSpec(**pipeline, swap_layers=swap),
    )
    if steps is None or steps >= pp.decode_steps:
        return engine.simulate(pp, setup)
    # the module whose `simulate` builds the Replay (sim.replay itself before it became a
    # package, sim.replay.result since), so that `time` works on both trees
    home = sys.modules[engine.simulate.__module__]
    full = home.Replay

    class Limited(full):  # type: ignore[misc,valid-type]
        def __init__(self, pp: Any, setup: Any, *rest: Any) -> None:
            super().__init__(pp, setup, *rest)  # rest: record_io, in trees that have it
            self.pp = replace(pp, decode_steps=steps)

    home.Replay = Limited
    try:
        return engine.simulate(pp, setup)
    finally:
        home.Replay = full


def dump(args: argparse.Namespace) -> None:
    import sim

    print(f"replaying with {sim.__file__}", flush=True)
    names = args.config or list(CONFIGS)
    out: dict[str, dict[str, Any]] = {}
    passes: dict[str, Any] = {}
    for run, name, dtype, swap in variants(names):
        if name not in passes:
            passes = {name: load_pass(args.trace, name, args.pass_dir)}  # one in memory
        result = replay(passes[name], name, dtype, swap, args.steps)
        out[run] = {"steps": result.steps, "io_sizes": result.io_sizes,
                    "run_lengths": result.run_lengths, "totals": result.totals}
        n = args.steps or passes[name].decode_steps
        print(f"{run:<44} {1e3 * result.wall_s / n:7.2f} ms/step", flush=True)
    with open(args.out, "wb") as handle:
        pickle.dump(out, handle, protocol=pickle.HIGHEST_PROTOCOL)


def compare(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    with open(args.before, "rb") as handle:
        before = pickle.load(handle)
    with open(args.after, "rb") as handle:
        after = pickle.load(handle)
    failed = sorted(set(before) ^ set(after))
    for run in sorted(set(before) & set(after)):
        a, b = before[run], after[run]
        try:
            for key in ("steps", "io_sizes", "run_lengths"):
                pd.testing.assert_frame_equal(a[key], b[key], check_exact=True)
                assert np.array_equal(a[key].to_numpy(), b[key].to_numpy(), equal_nan=True)
            assert a["totals"] == b["totals"], (a["totals"], b["totals"])
            assert all(type(a["totals"][k]) is type(b["totals"][k]) for k in a["totals"])
        except AssertionError as exc:
            print(f"{run}: DIFFERS: {str(exc)[:400]}")
            failed.append(run)
    print(f"{len(set(before) & set(after)) - len(failed)} runs equal, {len(failed)} differ"
          + (f": {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


TIME = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import replay_identity as ri
pp = ri.load_pass(sys.argv[2], sys.argv[3], ri.Path(sys.argv[4]))
steps = int(sys.argv[5]) or pp.decode_steps
result = ri.replay(pp, sys.argv[3], "fp8", False, steps)
import sim
print(json.dumps({"ms_per_step": 1e3 * result.wall_s / steps, "sim": sim.__file__}))
"""


def timing(args: argparse.Namespace) -> None:
    here = str(Path(__file__).resolve().parent)
    trees = code_trees(args.base_src)
    names = args.config or ["dynakv_all", "static_clusters"]
    for name in names:  # make the passes once, outside the timed children
        load_pass(args.trace, name, args.pass_dir)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for name in names:
            for tree, src in trees.items():
                result = child(TIME, here, args.trace, name, str(args.pass_dir),
                               str(args.steps or 0), src=src, cwd=here)  # see child()
                times.setdefault((name, tree), []).append(result["ms_per_step"])
    print(f"{'config':<20} {'before ms/step':>15} {'after ms/step':>14} {'ratio':>7}"
          "   (fp8, no swap; median of the runs; each run: [before, after] alternating)")
    for name in names:
        b, a = (sorted(times[(name, t)]) for t in trees)
        mb, ma = median(b), median(a)
        print(f"{name:<20} {mb:15.2f} {ma:14.2f} {mb / ma:7.2f}   before {b} after {a}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(Path(os.environ.get(
        "KVSIM_TRACE_CACHE", "traces/cache")) / Path(DEFAULT_TRACE).name))
    parser.add_argument("--pass-dir", type=Path, default=Path("/tmp/kvsim-replay-identity"))
    parser.add_argument("--steps", type=int, default=None, help="decode steps replayed")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS))
    add_identity_commands(parser)
    args = parser.parse_args()
    {"dump": dump, "compare": compare, "time": timing}[args.command](args)


if __name__ == "__main__":
    main()
