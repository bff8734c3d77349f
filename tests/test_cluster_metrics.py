"""Intra-cluster variance tracking against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.metrics.clusters import cluster_variance
from sim.policies.base import LayerSelection, Relabel


def _selection(prefill, append, relabels=None):
    return LayerSelection(
        heads=None, index_vectors=np.zeros((1, len(append))),
        prefill_groups=np.array([prefill]), append_groups=np.array([append]),
        relabels=None if relabels is None else [relabels],
    )


def test_hand_computed_variance_with_a_split():
    # 1-D keys: prompt 0, 2 in group 0 and 10 in group 1; step 0 adds 4 to group 0.
    keys = np.array([[[0.0], [2.0], [10.0], [4.0], [11.0]]])
    selection = _selection([0, 0, 1], [0, 1], [Relabel(step=0, positions=np.array([3]), group=2)])
    variance, n_groups = cluster_variance(keys, 3, selection)
    # step 0: {0, 2, 4} -> then 4 splits off: {0, 2} var 1, {10} var 0, {4} var 0 -> mean 1/3
    # step 1: {0, 2} var 1, {10, 11} var 0.25, {4} var 0 -> mean 1.25 / 3
    assert variance[0].tolist() == pytest.approx([1 / 3, 1.25 / 3])
    assert n_groups[0].tolist() == [3, 3]


def test_no_groups_no_figure():
    selection = LayerSelection(heads=None, index_vectors=np.zeros((1, 1)))
    assert cluster_variance(np.zeros((1, 2, 1)), 1, selection) is None


@settings(max_examples=30, deadline=None)
@given(data=st.data(), prompt=st.integers(1, 12), steps=st.integers(1, 6))
def test_incremental_equals_recomputed(data, prompt, steps):
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    keys = rng.normal(size=(1, prompt + steps, 3))
    labels = [data.draw(st.integers(0, 3)) for _ in range(prompt + steps)]
    relabels = []
    for step in range(steps):
        if data.draw(st.booleans()):
            positions = np.array(sorted(data.draw(
                st.sets(st.integers(0, prompt + step), min_size=1, max_size=3))))
            relabels.append(Relabel(step, positions, 4 + step))
    selection = _selection(labels[:prompt], labels[prompt:], relabels)
    variance, _ = cluster_variance(keys, prompt, selection)
    current = np.array(labels)
    for step in range(steps):
        for event in relabels:
            if event.step == step:
                current[event.positions] = event.group
        stored = current[: prompt + step + 1]
        visible = keys[0, : prompt + step + 1]
        expected = np.mean([
            ((visible[stored == g] - visible[stored == g].mean(axis=0)) ** 2).sum(axis=1).mean()
            for g in np.unique(stored)
        ])
        assert variance[0, step] == pytest.approx(expected, rel=1e-9, abs=1e-12)
