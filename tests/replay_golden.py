"""Replay scenarios whose records were frozen before the replay's speed-up (branch replay-speed).

``tests/data/replay_golden.npz`` holds what :func:`scenarios` replayed with the engine at commit
8ac5085: the records of every step (all columns), the I/O size and run length histograms and
the totals. The speed-up (heads looked up together, one layout per trace head, the flash's stage
ends processed off SimPy's queue) must change none of it; ``test_replay_golden.py`` checks that
to the last bit. Regenerate only on purpose, with a pre-change engine first on the path:
``PYTHONPATH=<old tree>:. python -m tests.replay_golden``.

Selections are random but seeded and built by hand (no policy). The simulated model has more
KV heads than the trace (4 replaying 2: two simulated heads per trace head) and three layers,
the middle one full attention; the selections have sinks, a recent window, split buffers,
extra reads, cluster groups and relabels (into fresh groups and into an existing one; the
last layer has no window, so its appends go to the cache unless a buffer holds them); the
cache is smaller than the selections. Layouts with and without a write buffer, five
replacement policies, the pipeline switches on and off, swapping, reads issued at the layer's
start, after scoring and by the previous layer (a lead policy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sim.config import PipelineSpec
from sim.model import ModelGeometry
from sim.outputs import PolicyPass
from sim.policies.base import HeadSelections, LayerSelection, Relabel
from sim.replay import SimSetup, simulate

from .conftest import HAND_DEVICE, HandPolicy

GOLDEN = Path(__file__).resolve().parent / "data" / "replay_golden.npz"

PROMPT, STEPS = 48, 16
TRACE = ModelGeometry("golden-trace", n_layers=3, n_q_heads=4, n_kv_heads=2, head_dim=128,
                      params_per_layer=100_000)
TARGET = ModelGeometry("golden-target", n_layers=3, n_q_heads=8, n_kv_heads=4, head_dim=128,
                       params_per_layer=200_000)
TOTALS = ("entry_bytes", "cache_capacity_bytes", "peak_cache_bytes", "simulated_time_us")
LAYOUTS = (
    ("sequence", {}, "lru"),
    ("cluster", {}, "cluster_aligned"),
    ("dual_head", {"write_buffer_groups": 2}, "cluster_aligned"),
    ("dual_head", {}, "lfu"),
    ("intra_inter", {}, "fifo"),
    ("dual_head", {}, "belady"),
)


def _sorted_choice(rng: np.random.Generator, high: int, size: int) -> np.ndarray:
    return np.sort(rng.choice(high, size=min(size, high), replace=False)).astype(np.int32)


def _selection(rng: np.random.Generator, layer: int) -> LayerSelection:
    if layer == 1:
        return LayerSelection(heads=None, index_vectors=np.zeros((2, STEPS), np.int64))
    heads, extra, buffers = [], [], []
    for _head in range(2):
        rows, extras, held = [], [], []
        for step in range(STEPS):
            context = PROMPT + step
            picked = _sorted_choice(rng, context, int(rng.integers(6, 24)))
            rows.append(picked)
            others = np.setdiff1d(np.arange(context), picked)
            extras.append(others[_sorted_choice(rng, len(others), 4 if step % 4 == 1 else 0)])
            # the split buffers at the step's end: some recent positions, the new one sometimes
            recent = np.arange(max(2, context - 12), context + 1)
            held.append(recent[_sorted_choice(rng, len(recent), int(rng.integers(0, 4)))])
        heads.append(HeadSelections.from_lists(rows))
        extra.append(HeadSelections.from_lists(extras))
        buffers.append(HeadSelections.from_lists(held))
    return LayerSelection(
        heads=heads,
        index_vectors=rng.integers(10, 200, size=(2, STEPS)),
        prefill_groups=rng.integers(0, 6, size=(2, PROMPT)).astype(np.int32),
        append_groups=rng.integers(0, 6, size=(2, STEPS)).astype(np.int32),
        relabels=[
            [Relabel(step=3, positions=np.arange(8, 14), group=40),
             Relabel(step=9, positions=np.array([20, 21, 30]), group=41)],
            [Relabel(step=6, positions=np.arange(2, 7), group=3)],  # into an existing group
        ],
        extra_reads=extra,
        # layer 0 holds sinks and a recent window (so every new token); layer 2 split buffers
        # only (a new token goes to the cache unless a buffer or the layout holds it)
        dram_sinks=2 if layer == 0 else 0,
        dram_tail=PROMPT + np.arange(STEPS) - 3 if layer == 0 else None,
        split_buffers=buffers,
    )


def scenarios() -> dict[str, tuple[PolicyPass, SimSetup]]:
    """name -> (policy pass, setup) of every frozen scenario."""
    rng = np.random.default_rng(2025)
    selections = [_selection(rng, layer) for layer in range(TRACE.n_layers)]
    passes = {}
    for name, needs_query, lead in (("query", True, 0), ("start", False, 0), ("lead", True, 1)):
        policy = HandPolicy(needs_query)
        policy.selection_lead_layers = lead
        passes[name] = PolicyPass(policy, PROMPT, STEPS, TRACE, selections, pd.DataFrame(), 0.0)
    out = {}
    for reads, pp in passes.items():
        for layout, params, replacement in LAYOUTS:
            for stream, overlap, swap in ((False, False, False), (True, True, False),
                                          (False, True, True), (True, False, True)):
                setup = SimSetup(
                    device=HAND_DEVICE, target=TARGET, kv_dtype="fp16",
                    cache_capacity_bytes=60 * TARGET.entry_bytes("fp16") * TARGET.n_layers,
                    replacement={"type": replacement}, layout={"type": layout, **params},
                    pipeline=PipelineSpec(stream_index=stream, overlap_transfer=overlap,
                                          swap_layers=swap),
                )
                wb = "_wb" if params else ""
                name = (f"{reads}_{layout}{wb}_{replacement}"
                        f"_s{int(stream)}o{int(overlap)}w{int(swap)}")
                out[name] = (pp, setup)
    return out


def records(pp: PolicyPass, setup: SimSetup) -> dict[str, np.ndarray]:
    """The arrays frozen per scenario: step records (every column, in order), I/O sizes, run
    lengths and the totals of :data:`TOTALS`."""
    result = simulate(pp, setup)
    return {
        "steps": result.steps.to_numpy(),
        "io_sizes": result.io_sizes.to_numpy(),
        "run_lengths": result.run_lengths.to_numpy(),
        "totals": np.array([result.totals[key] for key in TOTALS], dtype=np.float64),
    }


if __name__ == "__main__":
    import sim

    arrays = {}
    for name, (pp, setup) in scenarios().items():
        for key, value in records(pp, setup).items():
            arrays[f"{name}/{key}"] = value
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **arrays)
    print(f"wrote {len(arrays)} arrays to {GOLDEN} with the engine of {sim.__file__}")
