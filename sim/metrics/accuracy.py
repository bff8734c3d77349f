"""Accuracy of a policy's selection against exact attention, per (query head, decode step).

Pure numpy and vectorised over a chunk of decode steps: the pass costs about twice the exact
softmax attention it is measured against (see ``benchmarks/bench_accuracy.py``). Memory is the
layer's keys and values in float32 plus a few (H_q, chunk_steps, context) float32 buffers.

Definitions (kvsim's own), for query head ``q`` at decode step ``s`` with its KV head
``h = q // queries_per_kv_head``, stored context ``[0, P + s)`` and the current token ``P + s``:

* ``attention_recall``: share of the exact softmax mass over ``[0, P + s]`` (scaled by
  ``1 / sqrt(d)``) that falls on ``h``'s selected positions plus the current token, which is
  always attended;
* ``topk_recall``: ``|selected & top_k| / k`` with ``k`` the number of selected positions and
  ``top_k`` the ``k`` stored positions of highest attention probability for ``q`` (ties count
  for the selection); 1.0 when ``k`` is 0 or the whole context;
* ``output_rel_error``: ``||o_sel - o_full|| / ||o_full||`` with ``o_sel`` the softmax restricted
  to selected + current, renormalised;
* ``n_selected``: ``k`` (the full context for full attention).

Why these three: attention recall is the softmax mass a selection keeps, and what it drops
bounds the output's change (``||o_sel - o_full|| <= 2 (1 - recall) max_j ||v_j||``); top-k recall
asks whether the selection ranks positions as exact attention does, however peaked the weights
are; the output error is what the next layer actually receives.

Sliding-window layers (``window=w``, Gemma 3's local layers): the exact reference is the
model's own windowed attention, step ``s`` seeing only ``(P + s - w, P + s]`` (the convention
of :meth:`sim.policies.base.LayerSelection.sliding_window`); mass, top-k and output are all
measured against it, so the window itself scores recall 1 and error 0.

Weights below ``e^-80`` of a row's maximum are floored there (no float32 subnormals, which slow
the matmuls ~50x); the top-k is ranked by logit, which orders exactly like the probability.
"""

from __future__ import annotations

import numpy as np

from sim.policies.base import HeadSelections, LayerSelection, decode_attention_weights

#: Sampled steps (``every > 1``): a chunk's matrix products run on its sampled rows alone only
#: above this many multiply-adds, else on the whole chunk with the other rows zero. OpenBLAS
#: (0.3.31, SkylakeX) computes products of at most 1e6 multiply-adds with small-matrix kernels
#: that round differently from its general kernel, whose results, measured on this project's
#: shapes, do not depend on how many rows a product has; so with this margin a sampled row's
#: figures stay bit-identical to the same row's in every step's computation
#: (tests/test_long_decode.py checks it on both sides of the limit).
SMALL_PRODUCT = 2_000_000


def layer_accuracy(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    prompt_len: int,
    selection: LayerSelection,
    chunk_steps: int = 32,
    window: int | None = None,
    every: int = 1,
) -> dict[str, np.ndarray]:
    """The metrics of :data:`sim.outputs.ACCURACY_COLUMNS` for one layer's selection, each an
    array of shape (H_q, S), or (H_q, ceil(S / every)) for the sampled steps.

    ``every``: score only decode steps ``0, every, 2 every, ...`` (``accuracy_every``; exact
    attention is the cost of long decodes). A sampled step's figures are bit-identical to the
    same step's with ``every=1``: steps are still taken in the same chunks of ``chunk_steps``,
    each row over the same positions (the chunk's width), so only the rows of unsampled steps
    are left out of the arithmetic; ``tests/test_long_decode.py`` checks it.

    ``queries``: (H_q, S, d); ``keys``/``values``: (H_kv, P + S, d), any float dtype (float16
    memmaps are converted once to float32). ``selection.heads`` must hold one
    :class:`HeadSelections` per KV head with S steps; raises ValueError if a step's positions are
    not sorted, unique and inside ``[0, P + s)``. ``window``: the layer's sliding window (the
    reference is then windowed attention), ``None`` for a global layer.
    """
    n_q, n_steps, head_dim = queries.shape
    n_kv = keys.shape[0]
    _check_shapes(queries, keys, values, prompt_len)
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    q_per_kv = n_q // n_kv
    sampled = np.arange(0, n_steps, every)
    n_out = len(sampled)
    context = prompt_len + np.arange(n_steps)
    heads = selection.heads
    if heads is None:  # selection.is_full
        # Full attention is the reference itself: exact by definition, no arithmetic needed.
        ones = np.ones((n_q, n_out))
        return {
            "attention_recall": ones,
            "topk_recall": ones.copy(),
            "output_rel_error": np.zeros((n_q, n_out)),
            "n_selected": np.broadcast_to(context[sampled], (n_q, n_out)).astype(np.int64),
        }
    if len(heads) != n_kv:
        raise ValueError(f"selection has {len(heads)} KV heads, trace layer has {n_kv}")
    counts = np.stack([_validated_counts(h, n_steps, prompt_len) for h in heads])  # (H_kv, S)
    if window is not None and selection.window == window:
        # The layer's own window against windowed attention: every position the reference
        # weighs is selected, so the selected weights are the weights bit for bit, their sum
        # the norm (recall exactly 1), the output the reference's (error exactly 0) and the
        # window the top-k (recall 1): what the arithmetic below gives, without it
        # (tests/test_sliding_window.py checks both agree).
        return {
            "attention_recall": np.ones((n_q, n_out)),
            "topk_recall": np.ones((n_q, n_out)),
            "output_rel_error": np.zeros((n_q, n_out)),
            "n_selected": np.repeat(counts[:, sampled], q_per_kv, axis=0).astype(np.int64),
        }
    if every == 1:
        # Step of every flat selection entry, to scatter/gather a chunk's entries in one shot.
        entry_step = [np.repeat(np.arange(n_steps, dtype=np.int64), c) for c in counts]

    k32 = np.asarray(keys, dtype=np.float32)
    v32 = np.asarray(values, dtype=np.float32)
    recall = np.ones((n_kv, q_per_kv, n_out))
    topk = np.ones((n_kv, q_per_kv, n_out))
    error = np.zeros((n_kv, q_per_kv, n_out))
    max_width = prompt_len + n_steps
    chunk_rows = min(chunk_steps, n_steps) if every == 1 else -(-min(chunk_steps, n_steps) // every)
    max_rows = n_kv * q_per_kv * chunk_rows
    # Two reused buffers: weights, and logits (ranked for the top-k, then reused for the
    # selected weights). Fresh 10 MB arrays per chunk would cost more in page faults than math.
    buf_w = np.empty(max_rows * max_width, np.float32)
    buf_l = np.empty(max_rows * max_width, np.float32)
    buf_mask = np.empty(n_kv * chunk_rows * max_width, np.float32)
    # Sampled steps: the matrix products run on whole chunks (see _sampled_matmul), here.
    buf_full = None if every == 1 else np.empty(
        n_kv * q_per_kv * min(chunk_steps, n_steps) * max_width, np.float32
    )

    for start in range(0, n_steps, chunk_steps):
        stop = min(n_steps, start + chunk_steps)
        width = prompt_len + stop
        if every == 1:
            rows, out = None, slice(start, stop)
            steps, current = stop - start, prompt_len + np.arange(start, stop)
            flat_rows, flat_pos = [], []  # per head: chunk row and position of every entry
            for h, sel in enumerate(heads):
                lo, hi = sel.offsets[start], sel.offsets[stop]
                flat_rows.append(entry_step[h][lo:hi] - start)
                flat_pos.append(sel.positions[lo:hi].astype(np.int64))
        else:
            first = -(-start // every)  # index of the chunk's first sampled step
            rows = sampled[first : first + len(range(first * every, stop, every))]
            if not len(rows):
                continue
            out = slice(first, first + len(rows))
            steps, current = len(rows), prompt_len + rows
            flat_rows, flat_pos = _sampled_entries(heads, rows)
            alone = q_per_kv * steps * width * head_dim > SMALL_PRODUCT
        w, norm, logits = decode_attention_weights(
            queries, k32, prompt_len, start, stop, out=buf_w, logits_out=buf_l, window=window,
            rows=rows, scratch=None if rows is None or alone else buf_full,
        )
        assert logits is not None  # logits_out was given, so the logits are returned
        picked = slice(start, stop) if rows is None else rows

        topk[:, :, out] = _topk_recall(
            logits, counts[:, picked], context[picked], flat_rows, flat_pos, current
        )

        # Selection mask (H_kv, steps, width), current token included, one scatter per chunk.
        mask = buf_mask[: n_kv * steps * width].reshape(n_kv, steps, width)
        mask.fill(0.0)
        cur = np.arange(steps)
        pairs = enumerate(zip(flat_rows, flat_pos, strict=True))
        scatter = [(h * steps + r) * width + p for h, (r, p) in pairs]
        scatter.append(((np.arange(n_kv)[:, None] * steps + cur) * width + current).ravel())
        mask.reshape(-1)[np.concatenate(scatter)] = 1.0

        sel_w = np.multiply(w, mask[:, None], out=logits)  # the logits are spent: reuse
        sel_norm = sel_w.sum(axis=-1)
        flat_shape = (n_kv, q_per_kv * steps, width)
        v = v32[:, :width]
        if rows is None or alone:
            out_full = np.matmul(w.reshape(flat_shape), v).reshape(n_kv, q_per_kv, steps,
                                                                   head_dim)
            out_sel = np.matmul(sel_w.reshape(flat_shape), v).reshape(n_kv, q_per_kv, steps,
                                                                      head_dim)
        else:
            assert buf_full is not None  # allocated whenever accuracy_every > 1
            out_full = _sampled_matmul(w, v, rows - start, stop - start, buf_full)
            out_sel = _sampled_matmul(sel_w, v, rows - start, stop - start, buf_full)
        out_full /= norm[..., None]
        out_sel /= sel_norm[..., None]
        ref = np.linalg.norm(out_full, axis=-1)
        diff = np.linalg.norm(out_sel - out_full, axis=-1)
        recall[:, :, out] = sel_norm / norm
        error[:, :, out] = np.divide(diff, ref, out=np.zeros_like(diff), where=ref > 0)

    def per_query_head(a: np.ndarray) -> np.ndarray:
        return a.reshape(n_q, n_out)

    return {
        "attention_recall": per_query_head(np.minimum(recall, 1.0)),
        "topk_recall": per_query_head(topk),
        "output_rel_error": per_query_head(error),
        "n_selected": np.repeat(counts[:, sampled], q_per_kv, axis=0).astype(np.int64),
    }


def _sampled_matmul(
    a: np.ndarray, v: np.ndarray, local: np.ndarray, chunk: int, buf: np.ndarray
) -> np.ndarray:
    """``a @ v`` for the sampled rows ``a`` (H_kv, G, rows, width) of a chunk of ``chunk``
    steps (``local``: their indices in it), computed as the whole chunk's product with the
    other rows zero: the same shapes as every step's product, so each sampled row's result is
    bit-identical to it whatever kernel the BLAS picks for those shapes (it would not be for a
    product of the sampled rows alone: OpenBLAS's small-matrix kernels round differently).
    Returns (H_kv, G, rows, d)."""
    n_kv, q_per_kv, _, width = a.shape
    whole = buf[: n_kv * q_per_kv * chunk * width].reshape(n_kv, q_per_kv, chunk, width)
    whole.fill(0.0)
    whole[:, :, local] = a
    product = np.matmul(whole.reshape(n_kv, q_per_kv * chunk, width), v)
    return product.reshape(n_kv, q_per_kv, chunk, -1)[:, :, local]


def _sampled_entries(
    heads: list[HeadSelections], rows: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per KV head: the sampled row (index into ``rows``) and position of every selection
    entry of the decode steps ``rows``, in step order."""
    flat_rows, flat_pos = [], []
    for sel in heads:
        lo, hi = sel.offsets[rows], sel.offsets[rows + 1]
        sizes = hi - lo
        row_of = np.repeat(np.arange(len(rows)), sizes)
        index = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        flat_rows.append(row_of)
        flat_pos.append(sel.positions[lo[row_of] + index].astype(np.int64))
    return flat_rows, flat_pos


def reference_output(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    prompt_len: int,
    window: int | None = None,
    chunk_steps: int = 32,
) -> np.ndarray:
    """The exact attention output the metrics compare against, (H_q, S, d) float32.

    Softmax of ``q . k / sqrt(d)`` over ``[0, P + s]`` (the step's own key included), or over
    ``(P + s - window, P + s]`` for a sliding-window layer; the same weights ``layer_accuracy``
    uses (floored at ``e^-80`` of the row maximum).
    """
    n_q, n_steps, head_dim = queries.shape
    _check_shapes(queries, keys, values, prompt_len)
    n_kv = keys.shape[0]
    k32 = np.asarray(keys, dtype=np.float32)
    v32 = np.asarray(values, dtype=np.float32)
    out = np.empty((n_q, n_steps, head_dim), np.float32)
    for start in range(0, n_steps, chunk_steps):
        stop = min(n_steps, start + chunk_steps)
        w, norm, _ = decode_attention_weights(queries, k32, prompt_len, start, stop,
                                              window=window)
        flat = w.reshape(n_kv, -1, prompt_len + stop)
        o = np.matmul(flat, v32[:, : prompt_len + stop]).reshape(*w.shape[:3], head_dim)
        o /= norm[..., None]
        out[:, start:stop] = o.reshape(n_q, stop - start, head_dim)
    return out


def _topk_recall(
    logits: np.ndarray,
    k: np.ndarray,
    context: np.ndarray,
    flat_rows: list[np.ndarray],
    flat_pos: list[np.ndarray],
    current: np.ndarray,
) -> np.ndarray:
    """Top-k recall of a chunk; destroys ``logits`` (H_kv, G, steps, width) by partitioning.
    ``current``: each row's own position (the current token, not a candidate).

    Ranks by logit (same order as probability, but without the ties the e^-80 weight floor
    creates, which make ``np.partition`` ~15x slower). The k-th largest stored logit of each row
    is the threshold; a selected position is in the top-k iff it reaches it (clipped to k, so
    ties favour the selection).
    """
    n_kv, q_per_kv, steps, width = logits.shape
    result = np.ones((n_kv, q_per_kv, steps))
    needed = (k > 0) & (k < context[None, :])  # (H_kv, steps); the rest are 1.0 by definition
    if not needed.any():
        return result
    # Gather the selected logits before partitioning scrambles the rows.
    picked = [
        logits[h].reshape(q_per_kv, steps * width)[:, r * width + p]
        for h, (r, p) in enumerate(zip(flat_rows, flat_pos, strict=True))
    ]
    # The current token (and later positions, already -inf) are not candidates.
    logits[:, :, np.arange(steps), current] = -np.inf
    flat = logits.reshape(n_kv * q_per_kv * steps, width)
    row_k = np.repeat(k[:, None, :], q_per_kv, axis=1).reshape(-1)
    row_needed = np.repeat(needed[:, None, :], q_per_kv, axis=1).reshape(-1)
    threshold: np.ndarray = np.empty(flat.shape[0], np.float32)
    ks = np.unique(row_k[row_needed])
    if len(ks) == 1 and row_needed.all():
        # Common case (token budget, long context): partition the whole chunk in place.
        kth = width - int(ks[0])
        flat.partition(kth, axis=-1)
        threshold[:] = flat[:, kth]
    else:
        for kk in ks:
            members = np.flatnonzero(row_needed & (row_k == kk))
            sub = flat[members]
            kth = width - int(kk)
            sub.partition(kth, axis=-1)
            threshold[members] = sub[:, kth]
    threshold = threshold.reshape(n_kv, q_per_kv, steps)
    for h in range(n_kv):
        hits = picked[h] >= threshold[h][:, flat_rows[h]]  # (G, entries)
        cum = np.zeros((q_per_kv, hits.shape[1] + 1), np.int64)
        np.cumsum(hits, axis=1, out=cum[:, 1:])
        bounds = np.concatenate([[0], np.cumsum(k[h])])
        found = cum[:, bounds[1:]] - cum[:, bounds[:-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            rec = np.minimum(found, k[h]) / k[h]
        result[h] = np.where(needed[h], rec, 1.0)
    return result


def _check_shapes(
    queries: np.ndarray, keys: np.ndarray, values: np.ndarray, prompt_len: int
) -> None:
    n_q, n_steps, head_dim = queries.shape
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} differ in shape")
    n_kv, n_pos, key_dim = keys.shape
    if n_kv == 0 or n_q % n_kv:
        raise ValueError(f"{n_q} query heads do not group over {n_kv} KV heads")
    if key_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != key head_dim {key_dim}")
    if prompt_len < 1 or n_pos != prompt_len + n_steps:
        raise ValueError(
            f"keys hold {n_pos} positions, expected prompt_len + steps = {prompt_len + n_steps}"
        )


def _validated_counts(sel: HeadSelections, n_steps: int, prompt_len: int) -> np.ndarray:
    """Per-step selection sizes of one head, after checking the CSR contract (O(entries))."""
    offsets = np.asarray(sel.offsets)
    if offsets.shape != (n_steps + 1,) or offsets[0] != 0:
        raise ValueError(f"selection offsets must have {n_steps + 1} entries starting at 0")
    counts = np.diff(offsets)
    if (counts < 0).any() or offsets[-1] != len(sel.positions):
        raise ValueError("selection offsets are not a valid CSR index of positions")
    positions = np.asarray(sel.positions)
    # int32 positions (a policy's) as they are: their differences fit; others as int64
    pos = positions if positions.dtype == np.int32 else positions.astype(np.int64)
    starts = offsets[:-1][counts > 0]  # first entry of each non-empty step
    inner = np.ones(len(pos), bool)
    inner[starts] = False  # the first entry of a step has no predecessor
    ordered = not (np.diff(pos, prepend=-1)[inner] <= 0).any()
    if len(pos):
        if ordered:  # each step's extremes are its first and last entries
            nonempty = np.flatnonzero(counts)
            outside = pos[starts].min() < 0 or (
                pos[offsets[1:][nonempty] - 1] >= prompt_len + nonempty
            ).any()
        else:
            step = np.repeat(np.arange(n_steps), counts)
            outside = pos.min() < 0 or (pos >= prompt_len + step).any()
        if outside:
            raise ValueError(
                "a selected position lies outside its step's stored context [0, P + s)"
            )
    if not ordered:
        raise ValueError("selected positions must be sorted and unique within each step")
    return counts
