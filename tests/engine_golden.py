"""Replay scenarios whose step records were frozen before ``pipeline.swap_layers`` existed.

``tests/data/engine_golden.npz`` holds the records of :func:`scenarios` as produced by the
engine at commit 10f35ed (before per-layer swapping and sliding-window layers were added), so
``test_engine_swap.py`` can check that the new code paths change nothing when they are off.
Regenerate only on purpose, with a pre-change engine: ``python -m tests.engine_golden``.

Selections are random but seeded and built by hand (no policy), so the frozen figures depend
only on the engine, the cache, the layouts and the flash model. Each scenario has three layers
(the middle one full attention), two KV heads, cluster groups, relabels and extra reads, a
cache smaller than the selections, and both orders of issue (query-dependent or not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sim.config import PipelineSpec
from sim.model import ModelGeometry
from sim.outputs import STEP_COLUMNS, PolicyPass
from sim.policies.base import HeadSelections, LayerSelection, Relabel
from sim.replay import SimSetup, simulate

from .conftest import HAND_DEVICE, HandPolicy

GOLDEN = Path(__file__).resolve().parent / "data" / "engine_golden.npz"
#: the columns the pre-change engine had, in order
OLD_COLUMNS = STEP_COLUMNS[: STEP_COLUMNS.index("dram_bytes") + 1]

PROMPT, STEPS = 64, 12
MODEL = ModelGeometry("golden", n_layers=3, n_q_heads=4, n_kv_heads=2, head_dim=256,
                      params_per_layer=200_000)


def _selection(rng: np.random.Generator, layer: int) -> LayerSelection:
    if layer == 1:
        return LayerSelection(heads=None, index_vectors=np.zeros((2, STEPS), np.int64))
    heads, extra = [], []
    for _head in range(2):
        rows, extras = [], []
        for step in range(STEPS):
            context = PROMPT + step
            picked = rng.choice(context, size=int(rng.integers(4, 20)), replace=False)
            rows.append(np.sort(picked).astype(np.int32))
            others = np.setdiff1d(np.arange(context), picked)
            extras.append(np.sort(rng.choice(others, size=int(step % 3 == 0) * 3,
                                             replace=False)).astype(np.int32))
        heads.append(HeadSelections.from_lists(rows))
        extra.append(HeadSelections.from_lists(extras))
    return LayerSelection(
        heads=heads,
        index_vectors=rng.integers(10, 200, size=(2, STEPS)),
        prefill_groups=rng.integers(0, 6, size=(2, PROMPT)).astype(np.int32),
        append_groups=rng.integers(0, 6, size=(2, STEPS)).astype(np.int32),
        relabels=[[Relabel(step=5, positions=np.arange(8, 12), group=9)], []],
        extra_reads=extra,
    )


def scenarios() -> dict[str, tuple[PolicyPass, SimSetup]]:
    """name -> (policy pass, setup) of every frozen scenario."""
    rng = np.random.default_rng(2024)
    selections = [_selection(rng, layer) for layer in range(MODEL.n_layers)]
    out = {}
    for needs_query in (True, False):
        pp = PolicyPass(HandPolicy(needs_query), PROMPT, STEPS, MODEL, selections,
                        pd.DataFrame(), 0.0)
        for layout, replacement in (("sequence", "lru"), ("cluster", "cluster_aligned"),
                                    ("dual_head", "lfu")):
            for stream, overlap in ((False, False), (True, False), (False, True), (True, True)):
                setup = SimSetup(
                    device=HAND_DEVICE, target=MODEL, kv_dtype="fp16",
                    cache_capacity_bytes=30 * MODEL.entry_bytes("fp16") * MODEL.n_layers,
                    replacement={"type": replacement}, layout={"type": layout},
                    pipeline=PipelineSpec(stream_index=stream, overlap_transfer=overlap),
                )
                name = f"q{int(needs_query)}_{layout}_{replacement}_s{int(stream)}o{int(overlap)}"
                out[name] = (pp, setup)
    return out


def records(pp: PolicyPass, setup: SimSetup) -> dict[str, np.ndarray]:
    """The arrays frozen per scenario: step records (old columns), I/O sizes, run lengths."""
    result = simulate(pp, setup)
    return {
        "steps": result.steps[list(OLD_COLUMNS)].to_numpy(),
        "io_sizes": result.io_sizes.to_numpy(),
        "run_lengths": result.run_lengths.to_numpy(),
    }


if __name__ == "__main__":
    arrays = {}
    for name, (pp, setup) in scenarios().items():
        for key, value in records(pp, setup).items():
            arrays[f"{name}/{key}"] = value
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **arrays)
    print(f"wrote {len(arrays)} arrays to {GOLDEN}")
