"""Long decodes: the engine, policies and metrics at thousands of decode steps (issue
"Long-sequence decoding", part 2).

DynaKV (arXiv 2511.07427) decodes 1K-16K tokens after a short prompt. A trace captured with a
long prompt and every position's queries replays as such a decode with ``decode_from``
(:func:`sim.trace.split.split_trace`), so this benchmark needs no long generation. For one
trace and split it prints, for static_clusters and DynaKV with all techniques (dual-head
layout, cluster-aligned replacement, pipelined index streaming and transfer overlap):

* the floor: numpy exact softmax attention of every decode step, layer and query head, in
  chunks of 32 steps (as the accuracy metrics compute it, so the floor needs no more memory
  than they do and is a fair one), over what the model attends: the whole causal context of a
  global layer, the window of a sliding-window layer (Gemma 3's local layers);
* the policy pass (selections + accuracy, ``--accuracy-every k`` scores steps 0, k, 2k, ...),
  single-threaded like the floor, and its ratio to the floor (the issue's goal: within 3x);
* the SimPy replay's wall time per decode step;
* the peak RSS of each measurement (each in its own child process) against the trace's size.

    python benchmarks/bench_long.py [--trace PATH] [--decode-from 1024] [--accuracy-every 1]
        [--policy JSON ...] [--repeat 1]

Default trace: SmolLM2-135M on pydoc, 7936 + 256 positions with every query stored (captured
and cached on first use, several minutes), split at 1024: 7168 decode steps. Smoke test:
``--trace traces/sample/smollm2-135m_pydoc_p160_d24 --decode-from 160``.
"""

from __future__ import annotations

import argparse
import json
import time

from child_runs import fastest

FLOOR = r"""
import json, sys, time, resource
import numpy as np
from threadpoolctl import threadpool_limits
from sim.policy_pass import sliding_windows
from sim.trace.format import open_trace
from sim.trace.split import split_trace
trace = split_trace(open_trace(sys.argv[1]), int(sys.argv[2]))
chunk = 32
P, S = trace.prompt_len, trace.decode_steps
model = trace.model
g, d = model.queries_per_kv_head, model.head_dim
windows = sliding_windows(trace)
started = time.perf_counter()
with threadpool_limits(1):  # as the policy pass runs each layer
    for layer in range(model.n_layers):
        w = windows[layer]  # None: global; else the query at t attends (t - w, t]
        q = np.asarray(trace.decode_queries(layer), dtype=np.float32) * np.float32(d ** -0.5)
        k = np.asarray(trace.keys(layer), dtype=np.float32)
        v = np.asarray(trace.values(layer), dtype=np.float32)
        for start in range(0, S, chunk):
            stop = min(S, start + chunk)
            lo = 0 if w is None else max(0, P + start - w + 1)  # first key any row sees
            hi = P + stop
            t = P + np.arange(start, stop)[:, None]  # each row's own position
            j = np.arange(lo, hi)[None, :]
            hidden = j > t if w is None else (j > t) | (j <= t - w)
            for h in range(model.n_kv_heads):
                logits = q[h * g:(h + 1) * g, start:stop] @ k[h, lo:hi].T  # (g, C, hi - lo)
                logits[:, hidden] = -np.inf
                logits -= logits.max(axis=-1, keepdims=True)
                np.exp(logits, out=logits)
                logits /= logits.sum(axis=-1, keepdims=True)
                out = logits @ v[h, lo:hi]                                  # (g, C, d)
wall = time.perf_counter() - started
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "rss_mb": rss_mb}))
"""

RUN = r"""
import json, sys, time, resource
from sim.config import PipelineSpec
from sim.hardware import load_device
from sim.policies import POLICIES
from sim.policy_pass import run_policy_pass
from sim.replay import SimSetup, simulate
from sim.trace.format import open_trace
from sim.trace.split import split_trace
trace = split_trace(open_trace(sys.argv[1]), int(sys.argv[2]))
spec = json.loads(sys.argv[3])
every = int(sys.argv[4])
layout = spec.pop("layout", "sequence")
replacement = spec.pop("replacement", "lru")
pipeline = PipelineSpec(**spec.pop("pipeline", {}))
policy = POLICIES.create(spec)
imports_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# one thread, as the floor: the same cores for both (a run's pass may use 2 threads)
pp = run_policy_pass(trace, policy, seed=0, accuracy_every=every, workers=1)
pass_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
device = load_device("ufs40-flagship")
target = trace.model
capacity = int(0.1 * trace.n_positions * target.kv_bytes_per_token("fp16"))
setup = SimSetup(device=device, target=target, kv_dtype="fp16", cache_capacity_bytes=capacity,
                 replacement={"type": replacement}, layout={"type": layout}, pipeline=pipeline)
sim = simulate(pp, setup)
print(json.dumps({"policy_s": pp.wall_s, "sim_s": sim.wall_s, "steps": pp.decode_steps,
                  "pass_rss_mb": pass_rss_mb, "imports_rss_mb": imports_rss_mb,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

DEFAULT_POLICIES = [
    '{"type": "static_clusters", "budget": 0.05, "layout": "cluster"}',
    '{"type": "dynakv", "budget": 0.05, "layout": "dual_head", "replacement": "cluster_aligned",'
    ' "pipeline": {"stream_index": true, "overlap_transfer": true}}',
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", help="trace directory (default: capture or find the 7936+256 "
                        "SmolLM2 pydoc trace in the trace cache)")
    parser.add_argument("--decode-from", type=int, default=1024)
    parser.add_argument("--accuracy-every", type=int, default=1)
    parser.add_argument("--policy", action="append", help="policy JSON spec (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (fastest kept)")
    args = parser.parse_args()

    from sim.trace.format import open_trace
    from sim.trace.split import split_trace

    if args.trace:
        path = args.trace
    else:
        from sim.paths import trace_cache_dir
        from sim.trace.capture import CaptureSettings, get_or_capture

        settings = CaptureSettings(model="smollm2-135m", text="pydoc", prompt_len=8192 - 256,
                                   decode_steps=256)
        path = str(get_or_capture(settings, trace_cache_dir(), progress=True))
    trace = split_trace(open_trace(path), args.decode_from)  # a bad split fails here, in one line
    size_mb = trace.size_bytes / 2**20
    print(
        f"trace {trace.path.name} from position {args.decode_from}: {trace.prompt_len} prompt + "
        f"{trace.decode_steps} decode steps, {trace.model.n_layers} layers, {size_mb:.0f} MiB "
        f"on disk; accuracy on every {args.accuracy_every} step(s)"
    )
    floor = fastest(args.repeat, FLOOR, path, str(args.decode_from))
    print(f"{'measurement':<52} {'wall s':>8} {'x floor':>8} {'ms/step':>8} "
          f"{'peak RSS MiB':>13} {'x trace':>8}")
    print(
        f"{'numpy exact attention, chunks of 32 steps (floor)':<52} {floor['wall_s']:8.2f} "
        f"{1.0:8.2f} {'':>8} {floor['rss_mb']:13.0f} {floor['rss_mb'] / size_mb:8.2f}"
    )
    for spec in args.policy or DEFAULT_POLICIES:
        started = time.perf_counter()
        result = fastest(args.repeat, RUN, path, str(args.decode_from), spec,
                          str(args.accuracy_every))
        name = json.loads(spec)["type"]
        if "pipeline" in json.loads(spec):
            name += " (all techniques)"
        print(
            f"{name + ': policy pass + accuracy':<52} {result['policy_s']:8.2f} "
            f"{result['policy_s'] / floor['wall_s']:8.2f} {'':>8} "
            f"{result['pass_rss_mb']:13.0f} {result['pass_rss_mb'] / size_mb:8.2f}"
        )
        per_step_ms = 1e3 * result["sim_s"] / max(1, result["steps"])
        print(
            f"{name + ': replay':<52} {result['sim_s']:8.2f} "
            f"{result['sim_s'] / floor['wall_s']:8.2f} {per_step_ms:8.2f} "
            f"{result['rss_mb']:13.0f} {result['rss_mb'] / size_mb:8.2f}"
        )
        print(f"{'':<4}(child's wall incl. imports {time.perf_counter() - started:.1f} s; peak "
              f"RSS of the pass, then of pass + replay; {result['imports_rss_mb']:.0f} MiB of "
              "it is the imported libraries)")


if __name__ == "__main__":
    main()
