"""Speed and memory of a whole run against the numpy floor (issue: foundation, "Speed and memory").

Prints, side by side, for one real trace (default: SmolLM2-135M, 8K prompt + 256 decode steps,
captured and cached on first use):

* the floor: numpy exact softmax attention for every decode step, layer and query head;
* each policy's policy pass (selections + accuracy) and latency simulation, and their ratio to
  the floor, and whether the total is within the budget (``--budget``, default 5x the floor);
* the peak RSS of each measurement (in its own child process) against the trace's size on disk.

Timings on a shared machine are noisy: ``--repeat N`` runs every measurement N times (each in
a fresh child process) and keeps the fastest.

    python benchmarks/bench_speed.py [--prompt-len 8192] [--decode-steps 256] [--policy ...]
        [--repeat 1] [--budget 5]
"""

from __future__ import annotations

import argparse
import json
import time

from child_runs import fastest

FLOOR = r"""
import json, sys, time, resource
import numpy as np
from sim.trace.format import open_trace
trace = open_trace(sys.argv[1])
P, S = trace.prompt_len, trace.decode_steps
model = trace.model
g, d = model.queries_per_kv_head, model.head_dim
# causality only bites in the trailing S x S block: step s sees positions [0, P + s]
rows, cols = np.triu_indices(S, 1)
started = time.perf_counter()
for layer in range(model.n_layers):
    q = np.asarray(trace.decode_queries(layer), dtype=np.float32) * np.float32(d ** -0.5)
    k = np.asarray(trace.keys(layer), dtype=np.float32)
    v = np.asarray(trace.values(layer), dtype=np.float32)
    for h in range(model.n_kv_heads):
        logits = q[h * g:(h + 1) * g] @ k[h].T                   # (g, S, P + S)
        logits[:, rows, P + cols] = -np.inf
        logits -= logits.max(axis=-1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=-1, keepdims=True)
        out = logits @ v[h]                                       # (g, S, d)
wall = time.perf_counter() - started
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "rss_mb": rss_mb}))
"""

RUN = r"""
import json, sys, time, resource
from sim.config import PipelineSpec
from sim.policy_pass import run_policy_pass
from sim.replay import SimSetup, simulate
from sim.hardware import load_device
from sim.policies import POLICIES
from sim.trace.format import open_trace
trace = open_trace(sys.argv[1])
spec = json.loads(sys.argv[2])
layout = spec.pop("layout", "sequence")
replacement = spec.pop("replacement", "lru")
pipeline = PipelineSpec(**spec.pop("pipeline", {}))
policy = POLICIES.create(spec)
device = load_device("ufs40-flagship")
target = trace.model
pp = run_policy_pass(trace, policy, seed=0)
capacity = int(0.1 * trace.n_positions * target.kv_bytes_per_token("fp16"))
setup = SimSetup(device=device, target=target, kv_dtype="fp16", cache_capacity_bytes=capacity,
                 replacement={"type": replacement}, layout={"type": layout}, pipeline=pipeline)
sim = simulate(pp, setup)
print(json.dumps({"policy_s": pp.wall_s, "sim_s": sim.wall_s,
                  "commands": int(sim.steps["read_commands"].sum()),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

DEFAULT_POLICIES = [
    '{"type": "static_clusters", "budget": 0.05, "layout": "cluster"}',
    '{"type": "dynakv", "budget": 0.05, "layout": "dual_head", "replacement": "cluster_aligned",'
    ' "pipeline": {"stream_index": true, "overlap_transfer": true}}',
    '{"type": "token_topk", "budget": 0.05}',
    '{"type": "full"}',
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=8192 - 256)
    parser.add_argument("--decode-steps", type=int, default=256)
    parser.add_argument("--text", default="pydoc")
    parser.add_argument("--policy", action="append", help="policy JSON spec (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (fastest kept)")
    parser.add_argument("--budget", type=float, default=5.0, help="total wall budget, x floor")
    args = parser.parse_args()

    from sim.paths import trace_cache_dir
    from sim.trace.capture import CaptureSettings, get_or_capture
    from sim.trace.format import open_trace

    settings = CaptureSettings(
        model="smollm2-135m",
        text=args.text,
        prompt_len=args.prompt_len,
        decode_steps=args.decode_steps,
    )
    path = get_or_capture(settings, trace_cache_dir(), progress=True)
    trace = open_trace(path)
    size_mb = trace.size_bytes / 2**20
    print(
        f"trace {path.name}: {trace.prompt_len}+{trace.decode_steps} positions, "
        f"{size_mb:.0f} MiB on disk"
    )
    floor = fastest(args.repeat, FLOOR, str(path))
    print(f"{'measurement':<58} {'wall s':>8} {'x floor':>8} {'peak RSS MiB':>13}")
    print(
        f"{'numpy exact attention, every step/layer/head (floor)':<58} "
        f"{floor['wall_s']:8.2f} {1.0:8.2f} {floor['rss_mb']:13.0f}"
    )
    verdicts = []
    for spec in args.policy or DEFAULT_POLICIES:
        started = time.perf_counter()
        result = fastest(args.repeat, RUN, str(path), spec)
        total = result["policy_s"] + result["sim_s"]
        name = json.loads(spec)["type"]
        if "pipeline" in json.loads(spec):
            name += " (all techniques)"
        print(
            f"{name + ': policy pass + accuracy':<58} {result['policy_s']:8.2f} "
            f"{result['policy_s'] / floor['wall_s']:8.2f}"
        )
        print(
            f"{name + ': SimPy replay (' + str(result['commands']) + ' reads)':<58} "
            f"{result['sim_s']:8.2f} {result['sim_s'] / floor['wall_s']:8.2f}"
        )
        ratio = total / floor["wall_s"]
        within = ratio <= args.budget
        print(
            f"{name + ': total':<58} {total:8.2f} {ratio:8.2f} "
            f"{result['rss_mb']:13.0f}   {'within' if within else 'OVER'} the "
            f"{args.budget:g}x budget (children's wall incl. imports "
            f"{time.perf_counter() - started:.1f} s)"
        )
        verdicts.append((name, ratio, within))
    print()
    for name, ratio, within in verdicts:
        print(f"{name:<44} {ratio:6.2f}x floor   {'within' if within else 'OVER'} "
              f"the {args.budget:g}x budget")


if __name__ == "__main__":
    main()
