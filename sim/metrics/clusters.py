"""Cluster quality over decoding: how tight a policy's groups stay (DynaKV Table 5).

The intra-cluster variance of a group is the mean squared Euclidean distance of its members'
keys (raw post-RoPE keys, whatever space the policy clustered in, so methods compare on one
scale) to the group's mean key. The figure reported per (step, KV head) is the unweighted mean
over the non-empty groups after the step's new token has joined and the step's relabels
(splits) have been applied. Computed incrementally from per-group sums, so a step costs
O(groups x head_dim) plus the entries that changed group.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from sim.policies.base import LayerSelection, Relabel


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


def _head_variance(
    keys: np.ndarray,
    prompt_len: int,
    prefill_groups: np.ndarray,
    append_groups: np.ndarray,
    relabels: list[Relabel],
) -> tuple[np.ndarray, np.ndarray]:
    """One KV head's (variance, group count) per step.

    Per step only the groups the step touched (the new token's, a split's) are recomputed;
    every other group's figure is the previous step's, which the same arithmetic on the same
    sums would reproduce exactly. The per-step mean is then numpy's mean of the live groups'
    figures in id order, as a full recomputation would take it, so the result is bit-identical
    to recomputing every group at every step (tests/test_cluster_metrics.py's reference)."""
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

    def figures(groups: np.ndarray) -> np.ndarray:
        # E||k||^2 - ||E k||^2, clipped: rounding can make a one-member group slightly negative
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

    def join_run(start: int, stop: int) -> None:
        """Steps ``[start, stop)``, none with relabels: one member joins per step. The same
        numbers as one step at a time, batched: each group's running sums are a cumulative
        sum of its joins in step order (the additions ``+=`` makes, in that order), a row's
        einsum and a row's mean do not depend on the rows beside it."""
        nonlocal live_ids
        n = stop - start
        positions = prompt_len + np.arange(start, stop)
        groups = labels[positions]
        joined_sums = np.empty((n, keys.shape[1]))
        joined_squares = np.empty(n)
        joined_counts = np.empty(n, dtype=np.int64)
        order = np.argsort(groups, kind="stable")
        cuts = np.flatnonzero(np.diff(groups[order])) + 1
        for steps_of in np.split(order, cuts):  # one group's steps, ascending
            group = int(groups[steps_of[0]])
            running = np.empty((len(steps_of) + 1, keys.shape[1]))
            running[0] = sums[group]
            running[1:] = keys[positions[steps_of]]
            np.cumsum(running, axis=0, out=running)
            joined_sums[steps_of] = running[1:]
            sums[group] = running[-1]
            square = np.empty(len(steps_of) + 1)
            square[0] = squares[group]
            square[1:] = norms[positions[steps_of]]
            np.cumsum(square, out=square)
            joined_squares[steps_of] = square[1:]
            squares[group] = square[-1]
            joined_counts[steps_of] = counts[group] + np.arange(1, len(steps_of) + 1)
            counts[group] += len(steps_of)
        figure = np.maximum(
            joined_squares / joined_counts
            - np.einsum("gd,gd->g", joined_sums, joined_sums) / joined_counts**2,
            0.0,
        )
        # A group turns live at its first join (unless it already was): the live set changes
        # at those steps only.
        turns_live = np.zeros(n, bool)
        turns_live[order[np.concatenate(([0], cuts))]] = True
        turns_live &= ~live[groups]
        for block in range(0, n, 512):  # the figures after each step: (block, top) arrays
            rows = np.arange(block, min(n, block + 512))
            last = np.full((len(rows), top), -1, dtype=np.int64)  # the group's last join
            last[rows - block, groups[rows]] = rows
            np.maximum.accumulate(last, axis=0, out=last)
            after = np.where(last >= 0, figure[last], values[None, :])
            values[:] = after[-1]
            bounds = [0, *np.flatnonzero(turns_live[rows]).tolist(), len(rows)]
            for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                if k:  # row lo's group turns live
                    live[groups[block + lo]] = True
                    live_ids = np.flatnonzero(live)
                if hi == lo:
                    continue
                part = after[lo:hi]
                if len(live_ids) != top:
                    part = np.ascontiguousarray(part[:, live_ids])
                variance[start + block + lo : start + block + hi] = part.mean(axis=1)
                n_groups[start + block + lo : start + block + hi] = len(live_ids)

    done = 0
    for step in sorted(by_step) + [steps]:
        if step > done:
            join_run(done, step)
        if step == steps:
            break
        position = prompt_len + step
        group = int(labels[position])
        # one member joins: the additions np.add.at would make
        sums[group] += keys[position]
        squares[group] += norms[position]
        counts[group] += 1
        changed = {group}
        for event in by_step[step]:
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
        values[touched] = figures(touched)
        variance[step] = (values if len(live_ids) == top else values[live_ids]).mean()
        n_groups[step] = len(live_ids)
        done = step + 1
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
