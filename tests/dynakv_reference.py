"""The original (per-position priority) implementation of DynaKV's Algorithm 1 loop, kept as
the reference the optimised :mod:`sim.policies.dynakv` must match bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.policies.base import Relabel
from sim.policies.dynakv import DynaKV, _HeadRun, split_in_two
from sim.policies.static_clusters import (
    cluster_priorities,
    cluster_space,
    kmeans_labels,
    nearest_centroid,
    sum_by_label,
)


@dataclass
class ReferenceDynaKV(DynaKV):
    """DynaKV with the original step loop (not registered)."""

    def _run_head(
        self, keys: np.ndarray, group_query: np.ndarray, prompt: int, rng: np.random.Generator
    ) -> _HeadRun:
        """Algorithm 1 over every decode step of one KV head."""
        sinks, n_steps = self.sink_tokens, len(group_query)
        space = cluster_space(keys, self.distance)
        clustered = space[sinks:prompt]
        # static_clusters' prefill clustering, same rng draw: adaptation=False reproduces it.
        wanted = self.n_clusters or max(1, round(len(clustered) / self.tokens_per_cluster))
        seed = int(rng.integers(2**31 - 1))
        prefill_lab = kmeans_labels(clustered, wanted, self.max_iter, seed)
        n0 = int(prefill_lab.max()) + 1
        state = _RefClusters(space, keys, capacity=n0 + 1 + 2 * n_steps + 2, sink_id=n0)
        state.init_prefill(prefill_lab, sinks, prompt)
        tau = float(np.quantile(state.m2[:n0] / state.n[:n0], self.tau_quantile))
        prefill_groups = state.labels[:prompt].copy()
        if not self.adaptation:
            # Static update as static_clusters computes it (fixed centroids and
            # representatives), batched: nothing depends on the order of the joins.
            size = state.n[:n0]
            centroids = state.csum[:n0] / size[:, None]
            state.labels[prompt:] = nearest_centroid(space[prompt:], centroids)
            static_scores = group_query @ (state.rsum[:n0] / size[:, None]).T
        run = _HeadRun(prefill_groups, state.labels[prompt:].copy())

        for s in range(n_steps):
            width = prompt + s
            # (1) rank the clusters, fill the budget; the active set is what is in DRAM.
            if self.adaptation:
                scores = state.representatives() @ group_query[s]
                scores[state.sink_id] = -np.inf  # the sinks' group: forced by the base anyway
            else:
                scores = np.append(static_scores[s], -np.inf)  # sink_id = n0 = the last
            priority = cluster_priorities(scores[None, :], state.labels[:width])
            buffered = state.buffered_positions()
            if len(buffered):
                # Buffered entries (DRAM) first inside their cluster. A cluster of rank r holds
                # priorities r (width + 1) + (width - p) <= r (width + 1) + width and the next
                # one starts above r (width + 1) + width + 1: move p to the open interval
                # between, r (width + 1) + width + 1 - (p + 1) / (width + 2) (earliest first).
                priority[0, buffered] += 1 + buffered - (buffered + 1) / (width + 2)
            selected = self._fill(priority, prompt, s)[0]
            run.selected.append(selected)
            run.n_clusters.append(state.count - 1)
            run.extra.append(np.zeros(0, np.int32))
            if not self.adaptation:
                continue
            active = state.active(selected, buffered)

            # (2) place the new token.
            new = width
            j = state.nearest(space[new])
            state.labels[new] = run.append_groups[s] = j
            state.size[j] += 1
            variance = state.append_variance(j, new)
            if variance <= tau:
                state.append(j, new)
            elif active[j]:
                self._split(state, run, j, s, new)
            else:
                state.buffers.setdefault(j, []).append(new)
            # (3) delayed splits of the loaded clusters.
            for c in sorted(state.buffers):
                if active[c]:
                    self._split(state, run, c, s, new)
            # (4) buffers full: force-load the cluster with the largest buffer and split it.
            extra = []
            while sum(len(b) for b in state.buffers.values()) >= self.buffer_max:
                c = max(sorted(state.buffers), key=lambda k: len(state.buffers[k]))
                members = state.members(c, width)
                in_dram = np.isin(members, selected) | np.isin(members, buffered)
                extra.append(members[~in_dram])
                self._split(state, run, c, s, new)
            if extra:
                run.extra[-1] = np.unique(np.concatenate(extra)).astype(np.int32)
        return run

    def _split(self, state: _RefClusters, run: _HeadRun, j: int, step: int, last: int) -> None:
        """Split cluster ``j`` (members up to position ``last``, buffer included) in two."""
        members = state.members(j, last + 1)
        move = split_in_two(state.space[members].astype(np.float64), self.split_iters)
        if move.sum() * 2 > len(move) or (move.sum() * 2 == len(move) and move[0]):
            move = ~move  # the larger half (or the one with the earliest member) keeps j
        moved = members[move].astype(np.int32)
        new_id = state.add_cluster()
        state.labels[moved] = new_id
        state.buffers.pop(j, None)
        state.recompute(j, members[~move])
        state.recompute(new_id, moved)
        run.relabels.append(Relabel(step, moved, new_id))



class _RefClusters:
    """Per-cluster statistics of one KV head, ids ``0..count-1`` (``sink_id`` = the sinks).

    ``n``/``csum``/``rsum``/``m2``: members counted in the statistics (buffered entries are
    not), their clustering-space sum, raw-key sum and sum of squared deviations from the
    centroid; ``size``: every member with a label (buffered included).
    """

    def __init__(self, space: np.ndarray, keys: np.ndarray, capacity: int, sink_id: int):
        self.space, self.keys, self.sink_id = space, keys, sink_id
        d = space.shape[1]
        self.n = np.ones(capacity)  # 1 for unused slots and the sinks: no division by zero
        self.csum = np.zeros((capacity, d))
        self.rsum = np.zeros((capacity, d))
        self.m2 = np.zeros(capacity)
        self.centroid = np.zeros((capacity, d))
        self.rep = np.zeros((capacity, d))
        self.half_sq = np.zeros(capacity)
        self.size = np.zeros(capacity, np.int64)
        self.count = sink_id + 1
        self.labels = np.full(len(keys), sink_id, np.int32)
        self.buffers: dict[int, list[int]] = {}

    def init_prefill(self, prefill_lab: np.ndarray, sinks: int, prompt: int) -> None:
        n0 = self.sink_id
        self.labels[sinks:prompt] = prefill_lab
        self.n[:n0] = np.bincount(prefill_lab, minlength=n0)
        self.size[:n0] = self.n[:n0]
        self.size[n0] = sinks
        points = self.space[sinks:prompt]
        self.csum[:n0] = sum_by_label(points, prefill_lab, n0)
        self.rsum[:n0] = sum_by_label(self.keys[sinks:prompt], prefill_lab, n0)
        self._derive(slice(0, n0))
        deviation = points - self.centroid[prefill_lab]
        self.m2[:n0] = np.bincount(prefill_lab, (deviation**2).sum(axis=1), minlength=n0)

    def representatives(self) -> np.ndarray:
        return self.rep[: self.count]

    def nearest(self, x: np.ndarray) -> int:
        """The cluster of the nearest centroid (Euclidean in the clustering space)."""
        affinity = self.centroid[: self.count] @ x.astype(np.float64) - self.half_sq[: self.count]
        affinity[self.sink_id] = -np.inf
        return int(np.argmax(affinity))

    def _derive(self, rows: slice | int) -> None:
        """Centroid, representative and half squared centroid norm from the sums."""
        n = self.n[rows] if isinstance(rows, int) else self.n[rows, None]
        self.centroid[rows] = self.csum[rows] / n
        self.rep[rows] = self.rsum[rows] / n
        self.half_sq[rows] = 0.5 * (self.centroid[rows] ** 2).sum(axis=-1)

    def append_variance(self, j: int, position: int) -> float:
        """Variance of cluster ``j``'s statistics with ``position`` added (Welford)."""
        n = self.n[j]
        deviation = self.space[position] - self.centroid[j]
        return float((self.m2[j] + n / (n + 1) * (deviation @ deviation)) / (n + 1))

    def append(self, j: int, position: int) -> None:
        n = self.n[j]
        x = self.space[position].astype(np.float64)
        deviation = x - self.centroid[j]
        self.m2[j] += n / (n + 1) * (deviation @ deviation)
        self.n[j] = n + 1
        self.csum[j] += x
        self.rsum[j] += self.keys[position]
        self._derive(j)

    def buffered_positions(self) -> np.ndarray:
        if not self.buffers:
            return np.zeros(0, np.int64)
        return np.sort(np.fromiter((p for b in self.buffers.values() for p in b), np.int64))

    def active(self, selected: np.ndarray, buffered: np.ndarray) -> np.ndarray:
        """Clusters whose members (labelled so far) are all in DRAM: selected or buffered."""
        held = np.bincount(self.labels[selected], minlength=self.count)
        if len(buffered):
            extra = buffered[~np.isin(buffered, selected)]
            held += np.bincount(self.labels[extra], minlength=self.count)
        active = held == self.size[: self.count]
        active[self.sink_id] = False
        return active

    def members(self, j: int, stop: int) -> np.ndarray:
        return np.flatnonzero(self.labels[:stop] == j)

    def add_cluster(self) -> int:
        self.count += 1
        return self.count - 1

    def recompute(self, j: int, members: np.ndarray) -> None:
        points = self.space[members].astype(np.float64)
        self.n[j] = self.size[j] = len(members)
        self.csum[j] = points.sum(axis=0)
        self.rsum[j] = self.keys[members].astype(np.float64).sum(axis=0)
        self._derive(j)
        self.m2[j] = float(((points - self.centroid[j]) ** 2).sum())
