"""Cost of the accuracy pass and of policy selection on one synthetic long layer.

Run from the repository root (or after ``pip install -e .``):
``PYTHONPATH=. python benchmarks/bench_accuracy.py [--prompt 8192] [--steps 256] [--repeat 3]``.

Prints ms per layer for (1) exact softmax attention over every decode step and head — the floor
any accuracy evaluation pays — against ``layer_accuracy`` (the ratio is the figure of merit),
with the accuracy pass's peak traced memory; and (2) ``select_layer`` of every registered policy.
The layer mimics SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64): keys form topical
groups, position 0 is a strong attention sink, and each query leans on a few earlier keys.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from sim.metrics.accuracy import layer_accuracy
from sim.policies import POLICIES
from sim.policies.base import LayerContext, RetrievalPolicy, decode_attention_weights


def synthetic_layer(
    prompt: int, steps: int, rng: np.random.Generator, n_q: int = 9, n_kv: int = 3, d: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries, keys, values) float16 like a captured trace: keys drawn around 64 topics per
    KV head, position 0 an attention sink, each query leaning on a few earlier keys and on one
    topic, so attention is concentrated (top 1% of keys hold most of the mass) but not one-hot."""
    total = prompt + steps
    topics = rng.standard_normal((n_kv, 64, d))
    topic_of = rng.integers(0, 64, size=(n_kv, total))
    keys = topics[np.arange(n_kv)[:, None], topic_of] + rng.standard_normal((n_kv, total, d))
    keys[:, 0] = 2.0 * topics[:, 0].mean(axis=0) + rng.standard_normal((n_kv, d))  # the sink
    values = rng.standard_normal((n_kv, total, d))
    group = n_q // n_kv
    queries = np.empty((n_q, steps, d))
    for q in range(n_q):
        h = q // group
        targets = rng.integers(0, prompt + np.arange(steps)[:, None], size=(steps, 4))
        topic = topics[h, rng.integers(0, 64, size=steps)]
        queries[q] = 0.45 * keys[h, targets].sum(axis=1) + 0.5 * topic + 0.3 * keys[h, 0]
    queries += 0.5 * rng.standard_normal(queries.shape)
    return (
        queries.astype(np.float16),
        keys.astype(np.float16),
        values.astype(np.float16),
    )


def exact_attention(
    queries: np.ndarray, keys: np.ndarray, values: np.ndarray, prompt: int, chunk: int = 32
) -> np.ndarray:
    """The floor: softmax attention output of every step and query head, (H_q, S, d)."""
    n_q, steps, d = queries.shape
    k32 = np.asarray(keys, np.float32)
    v32 = np.asarray(values, np.float32)
    out = np.empty((n_q, steps, d), np.float32)
    for start in range(0, steps, chunk):
        stop = min(steps, start + chunk)
        w, norm, _ = decode_attention_weights(queries, k32, prompt, start, stop)
        n_kv, group, c, width = w.shape
        o = np.matmul(w.reshape(n_kv, group * c, width), v32[:, :width])
        o = o.reshape(n_kv, group, c, d) / norm[..., None]
        out[:, start:stop] = o.reshape(n_q, c, d)
    return out


def best_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` wall time per function, in ms. The functions run interleaved, so a
    burst of load from other processes hits them alike and the ratios stay meaningful."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) * 1e3 for name, t in times.items()}


def policy(name: str, budget: int) -> RetrievalPolicy:
    return POLICIES.create({"type": name} | ({} if name == "full" else {"budget": budget}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30, help="to extrapolate a whole trace")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    queries, keys, values = synthetic_layer(args.prompt, args.steps, rng)
    ctx = LayerContext(0, keys.astype(np.float32), queries.astype(np.float32), args.prompt, rng)
    print(
        f"layer: P={args.prompt} S={args.steps} T={args.prompt + args.steps} "
        f"H_q={queries.shape[0]} H_kv={keys.shape[0]} d={queries.shape[2]} fp16 inputs, "
        f"budget {args.budget}"
    )
    names = POLICIES.names()
    selections = {name: policy(name, args.budget).select_layer(ctx) for name in names}

    def show(label: str, ms: float, extra: str = "") -> None:
        print(f"  {label:<34} {ms:8.1f} ms  [{ms * args.layers / 1e3:6.2f} s]{extra}")

    print(f"\n[1] accuracy pass, ms per layer [x{args.layers} layers]")
    fns: dict[str, Callable[[], object]] = {
        "floor": lambda: exact_attention(queries, keys, values, args.prompt)
    }
    for name in names:
        fns[name] = lambda sel=selections[name]: layer_accuracy(
            queries, keys, values, args.prompt, sel
        )
    ms = best_ms(fns, args.repeat)
    show("exact softmax attention (floor)", ms["floor"])
    for name in names:
        tracemalloc.start()
        acc = layer_accuracy(queries, keys, values, args.prompt, selections[name])
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        show(
            f"layer_accuracy[{name}]",
            ms[name],
            f"  x{ms[name] / ms['floor']:4.2f} floor  peak {peak_mb:5.1f} MB"
            f"  recall {acc['attention_recall'].mean():.3f}"
            f"  topk {acc['topk_recall'].mean():.3f}  err {acc['output_rel_error'].mean():.3f}",
        )

    print(f"\n[2] select_layer, ms per layer [x{args.layers} layers]")
    built = {name: policy(name, args.budget) for name in names}
    ms = best_ms({name: lambda p=built[name]: p.select_layer(ctx) for name in names}, args.repeat)
    for name in names:
        show(name, ms[name])


if __name__ == "__main__":
    main()
