"""Cluster quality over decoding: how tight a policy's groups stay (DynaKV Table 5).

The intra-cluster variance of a group is the mean squared Euclidean distance of its members'
keys (raw post-RoPE keys, whatever space the policy clustered in, so methods compare on one
scale) to the group's mean key. The figure reported per (step, KV head) is the unweighted mean
over the non-empty groups after the step's new token has joined and the step's relabels
(splits) have been applied. Computed incrementally from per-group sums, so a step costs
O(groups x head_dim) plus the entries that changed group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sim.policies.base import LayerSelection


def cluster_variance(
    keys: np.ndarray, prompt_len: int, selection: LayerSelection
) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean intra-cluster variance and group count per (KV head, step), both (H_kv, S).

    ``None`` if the policy reports no groups. ``keys``: (H_kv, P + S, d).
    """
    if selection.prefill_groups is None or selection.append_groups is None:
        return None
    n_heads, steps = selection.append_groups.shape
    variance = np.empty((n_heads, steps))
    n_groups = np.empty((n_heads, steps), dtype=np.int64)
    for head in range(n_heads):
        relabels = selection.relabels[head] if selection.relabels is not None else []
        variance[head], n_groups[head] = _head_variance(
            np.asarray(keys[head], dtype=np.float64), prompt_len,
            selection.prefill_groups[head], selection.append_groups[head], relabels,
        )
    return variance, n_groups


def _head_variance(keys, prompt_len, prefill_groups, append_groups, relabels):
    steps = len(append_groups)
    labels = np.concatenate([prefill_groups, append_groups]).astype(np.int64)
    top = max(int(labels.max()), max((e.group for e in relabels), default=0)) + 1
    sums = np.zeros((top, keys.shape[1]))
    squares = np.zeros(top)
    counts = np.zeros(top, dtype=np.int64)
    norms = np.einsum("td,td->t", keys, keys)

    def move(positions: np.ndarray, groups: np.ndarray, sign: int) -> None:
        np.add.at(sums, groups, sign * keys[positions])
        np.add.at(squares, groups, sign * norms[positions])
        np.add.at(counts, groups, sign)

    move(np.arange(prompt_len), labels[:prompt_len], +1)
    by_step: dict[int, list] = {}
    for event in relabels:
        by_step.setdefault(event.step, []).append(event)
    variance = np.empty(steps)
    n_groups = np.empty(steps, dtype=np.int64)
    for step in range(steps):
        position = prompt_len + step
        move(np.array([position]), labels[position : position + 1], +1)
        for event in by_step.get(step, ()):
            positions = np.asarray(event.positions)
            move(positions, labels[positions], -1)
            labels[positions] = event.group
            move(positions, labels[positions], +1)
        live = counts > 0
        n = counts[live]
        mean_sq = squares[live] / n
        centre_sq = np.einsum("gd,gd->g", sums[live], sums[live]) / n**2
        # E||k||^2 - ||E k||^2, clipped: rounding can make a one-member group slightly negative
        variance[step] = np.maximum(mean_sq - centre_sq, 0.0).mean()
        n_groups[step] = int(live.sum())
    return variance, n_groups


def labels_after(
    prompt_len: int, selection: LayerSelection, head: int, step: int
) -> np.ndarray:
    """Group of every position ``[0, prompt_len + step]`` of KV ``head`` after decode ``step``
    (its token placed, its relabels applied); ``step = -1``: after prefill. ``-1`` marks
    positions in no group (sinks)."""
    # The contract: ``selection`` is one with groups (callers check ``prefill_groups``).
    assert selection.prefill_groups is not None and selection.append_groups is not None
    labels = np.asarray(selection.prefill_groups[head], dtype=np.int64)
    if step >= 0:
        labels = np.concatenate([labels, selection.append_groups[head][: step + 1]])
    relabels = selection.relabels[head] if selection.relabels is not None else []
    for event in relabels:
        if event.step > step:
            break
        labels[np.asarray(event.positions)] = event.group
    return labels


def update_retrieval(
    prompt_len: int,
    selection: LayerSelection,
    horizon: int,
    kept_tail_start: Callable[[int], int] | None = None,
) -> np.ndarray | None:
    """DynaKV Table 2: how soon a just-updated cluster is retrieved.

    A cluster is *updated* at step ``s`` when the step's token joins it or a split at ``s``
    moves entries into or out of it. It is *retrieved* at step ``s'`` when the selection of
    ``s'`` contains one of its entries before ``kept_tail_start(s')`` (the policy's
    always-attended tail -- a recent window, ClusterKV's unclustered window -- is kept whatever
    the scores, so it says nothing about retrieval; default: nothing excluded). Returns counts
    ``(horizon + 1,)`` summed over KV heads: ``[0]`` updates observed (those with ``horizon``
    steps left), ``[t]`` those retrieved within ``t`` steps. ``None`` without groups.
    """
    if selection.prefill_groups is None or selection.append_groups is None or not horizon:
        return None
    # A policy that groups entries selects per KV head (only full attention has heads=None,
    # and it has no groups).
    assert selection.heads is not None
    n_heads, steps = selection.append_groups.shape
    counts = np.zeros(horizon + 1, dtype=np.int64)
    for head in range(n_heads):
        labels = np.concatenate(
            [selection.prefill_groups[head], selection.append_groups[head]]
        ).astype(np.int64)
        relabels = selection.relabels[head] if selection.relabels is not None else []
        by_step: dict[int, list] = {}
        for event in relabels:
            by_step.setdefault(event.step, []).append(event)
        updated: list[set[int]] = []
        retrieved: list[set[int]] = []
        for step in range(steps):
            # selection of this step: made with the labels as of the previous step
            context = prompt_len + step
            positions = np.asarray(selection.heads[head].at(step))
            if kept_tail_start is not None:
                positions = positions[positions < kept_tail_start(step)]
            groups = labels[positions]
            retrieved.append(set(np.unique(groups[groups >= 0]).tolist()))
            changed = {int(labels[context])}
            for event in by_step.get(step, ()):
                moved = np.asarray(event.positions)
                changed |= set(np.unique(labels[moved]).tolist()) | {int(event.group)}
                labels[moved] = event.group
            updated.append({g for g in changed if g >= 0})
        for step in range(steps - horizon):
            for group in updated[step]:
                counts[0] += 1
                for t in range(1, horizon + 1):
                    if group in retrieved[step + t]:
                        counts[t:] += 1
                        break
    return counts
