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


def _step_by_step(keys, prompt_len, prefill_groups, append_groups, relabels):
    """The figures one step at a time: the former implementation (engine at 650456c), kept
    as the reference the batched one must equal to the last bit."""
    steps = len(append_groups)
    labels = np.concatenate([prefill_groups, append_groups]).astype(np.int64)
    top = max(int(labels.max()), max((e.group for e in relabels), default=0)) + 1
    sums = np.zeros((top, keys.shape[1]))
    squares = np.zeros(top)
    counts = np.zeros(top, dtype=np.int64)
    norms = np.einsum("td,td->t", keys, keys)

    def move(positions, groups, sign):
        np.add.at(sums, groups, sign * keys[positions])
        np.add.at(squares, groups, sign * norms[positions])
        np.add.at(counts, groups, sign)

    def figures(groups):
        n = counts[groups]
        mean_sq = squares[groups] / n
        centre_sq = np.einsum("gd,gd->g", sums[groups], sums[groups]) / n**2
        return np.maximum(mean_sq - centre_sq, 0.0)

    move(np.arange(prompt_len), labels[:prompt_len], +1)
    by_step: dict[int, list] = {}
    for event in relabels:
        by_step.setdefault(event.step, []).append(event)
    variance = np.empty(steps)
    n_groups = np.empty(steps, dtype=np.int64)
    values = np.zeros(top)
    live = counts > 0
    live_ids = np.flatnonzero(live)
    values[live_ids] = figures(live_ids)
    for step in range(steps):
        position = prompt_len + step
        group = int(labels[position])
        sums[group] += keys[position]
        squares[group] += norms[position]
        counts[group] += 1
        events = by_step.get(step)
        if events:
            changed = {group}
            for event in events:
                positions = np.asarray(event.positions)
                changed.update(np.unique(labels[positions]).tolist())
                changed.add(int(event.group))
                move(positions, labels[positions], -1)
                labels[positions] = event.group
                move(positions, labels[positions], +1)
            live = counts > 0
            live_ids = np.flatnonzero(live)
            touched = np.array(sorted(changed))
            touched = touched[counts[touched] > 0]
        else:
            if not live[group]:
                live[group] = True
                live_ids = np.flatnonzero(live)
            touched = np.array([group])
        values[touched] = figures(touched)
        variance[step] = (values if len(live_ids) == top else values[live_ids]).mean()
        n_groups[step] = len(live_ids)
    return variance, n_groups


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    prompt=st.integers(1, 40),
    steps=st.integers(1, 1300),
    n_groups=st.integers(1, 40),
    late=st.integers(0, 20),
    n_splits=st.integers(0, 6),
)
def test_batched_equals_step_by_step(seed, prompt, steps, n_groups, late, n_splits):
    """Long runs between relabels (over the 512-step blocks), groups that first appear
    during the decode (the live set grows mid-block), splits to fresh ids: the same figures
    as one step at a time, bit for bit."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(1, prompt + steps, 8)) * rng.uniform(0.1, 30)
    prefill = rng.integers(0, n_groups, prompt)
    append = rng.integers(0, n_groups + late, steps)  # ids >= n_groups: new during decode
    top = n_groups + late
    relabels = []
    for step in sorted(rng.choice(steps, min(n_splits, steps), replace=False).tolist()):
        positions = np.unique(rng.integers(0, prompt + step + 1, 3))
        relabels.append(Relabel(step, positions, top))
        top += 1
    selection = _selection(prefill, append, relabels)
    variance, groups = cluster_variance(keys, prompt, selection)
    ref_variance, ref_groups = _step_by_step(keys[0], prompt, prefill, append, relabels)
    assert variance[0].tobytes() == ref_variance.tobytes()
    np.testing.assert_array_equal(groups[0], ref_groups)
