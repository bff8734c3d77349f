"""Flash order of clusters from their co-retrieval counts (DynaKV, arXiv 2511.07427, §4.2
"inter-cluster"): shared by the ``intra_inter`` and ``dual_head`` layouts, and by the Fig. 7
co-retrieval figure, which shows the matrix in this order."""

from __future__ import annotations

import numpy as np

__all__ = ["coretrieval_chain"]


def _cluster_order(groups: np.ndarray) -> np.ndarray:
    """Distinct labels of ``groups`` in the order of their smallest position."""
    labels, first = np.unique(groups, return_index=True)
    return labels[np.argsort(first, kind="stable")]


def _usable_coretrieval(groups: np.ndarray, coretrieval: np.ndarray | None) -> np.ndarray | None:
    """The symmetric co-retrieval counts between the present labels (sorted), zero diagonal,
    or ``None`` if there is no matrix or it does not cover every label (labels must be
    ``0..n-1`` indices of an (n, n) matrix)."""
    if coretrieval is None or groups.size == 0:
        return None
    matrix = np.asarray(coretrieval)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        return None
    labels = np.unique(groups)
    if labels[0] < 0 or labels[-1] >= matrix.shape[0]:
        return None
    sub = matrix[np.ix_(labels, labels)].astype(np.float64)
    sub = sub + sub.T
    np.fill_diagonal(sub, 0.0)
    return sub


def coretrieval_chain(groups: np.ndarray, coretrieval: np.ndarray | None) -> np.ndarray:
    """Order of the labels of ``groups`` on flash for inter-cluster contiguity.

    Greedy chain over the co-retrieval counts ``C`` (symmetrised: ``C[i, j] + C[j, i]``): start
    with the most co-retrieved pair ``(i, j)``, ``i < j`` (ties: the smallest ``i``, then
    ``j``), chain ``[i, j]``; then repeatedly append the unplaced label most co-retrieved with
    the chain's end (ties: the smallest label). When the end was never retrieved with any
    unplaced label (all counts 0), the chain continues with the most co-retrieved pair of
    unplaced labels (same tie rule), so co-retrieved clusters stay adjacent; labels never
    co-retrieved with anything come last in ascending order. Without a usable matrix (``None``,
    or labels outside ``0..n-1``): the order of smallest position (the ``cluster`` layout's).
    """
    groups = np.asarray(groups)
    counts = _usable_coretrieval(groups, coretrieval)
    if counts is None:
        return _cluster_order(groups)
    labels = np.unique(groups)
    n = len(labels)
    placed = np.zeros(n, dtype=bool)
    chain: list[int] = []

    def best_pair() -> tuple[int, int] | None:
        free = ~placed
        sub = np.where(free[:, None] & free[None, :], counts, -1.0)
        sub = np.triu(sub, 1) - np.tril(np.ones((n, n)))  # upper triangle only
        flat = int(np.argmax(sub))  # row-major: smallest i, then j, on ties
        i, j = divmod(flat, n)
        return (i, j) if sub[i, j] > 0 else None

    while not placed.all():
        end = chain[-1] if chain else None
        if end is not None:
            row = np.where(placed, -1.0, counts[end])
            nxt = int(np.argmax(row))
            if row[nxt] > 0:
                chain.append(nxt)
                placed[nxt] = True
                continue
        pair = best_pair()
        if pair is None:  # nothing left is co-retrieved: ascending labels
            rest = np.flatnonzero(~placed).tolist()
            chain.extend(rest)
            placed[:] = True
            break
        chain.extend(pair)
        placed[list(pair)] = True
    return labels[np.array(chain, dtype=np.int64)]
