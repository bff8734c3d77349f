"""A trace replayed from an earlier split point (``trace.decode_from``): a read-only view
(:class:`SplitTrace`) that calls the stored positions ``[0, decode_from)`` the prompt and the
rest decode steps, and the conditions a split must meet (:func:`check_decode_from`).
"""

from __future__ import annotations

import numpy as np

from sim.errors import TraceError
from sim.trace.format import Trace, is_int


class SplitTrace(Trace):
    """A read-only view of a :class:`Trace` whose decode starts at position ``decode_from``.

    Positions ``[0, decode_from)`` are the prompt and ``[decode_from, n_positions)`` the decode
    steps, whose queries are the stored queries of those positions: teacher-forced decoding of
    the stored tokens, exactly what the trace's own model attended at those positions (the
    stored keys, values and queries are the model's, whatever the capture called prompt). So a
    trace captured with a long prompt and ``queries: all`` replays as a short prompt plus a
    long decode without recapture (DynaKV, arXiv 2511.07427, §5: 1K-16K generated tokens).

    Attributes as :class:`Trace`, with ``prompt_len = decode_from`` and ``decode_steps =
    n_positions - decode_from``; ``decode_from``; ``source_prompt_len``, the prompt length
    the trace was captured with. Nothing is copied: every array is the stored memmap (or a
    view of it). Speculative queries (InfiniGen) exist only for the captured decode steps, so
    :meth:`speculative_queries` returns them sliced to the new decode steps when ``decode_from
    >= source_prompt_len`` and ``None`` before that (:attr:`speculative_gap` then says why).
    """

    def __init__(self, trace: Trace, decode_from: int) -> None:
        super().__init__(trace.path, trace.manifest, trace.model)
        self.decode_from = decode_from
        self.source_prompt_len: int = trace.manifest["prompt_len"]
        self.prompt_len = decode_from
        self.decode_steps = trace.n_positions - decode_from
        self.speculative_gap: str | None = None
        if self.has_speculative_queries and decode_from < self.source_prompt_len:
            self.speculative_gap = (
                f"trace {self.path.name} stores speculative queries for its captured decode "
                f"steps only (positions >= {self.source_prompt_len}), not from decode_from "
                f"{decode_from}; split at {self.source_prompt_len} or later"
            )

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", decode_from={self.decode_from})"

    def speculative_queries(self, layer: int) -> np.ndarray | None:
        """As :meth:`Trace.speculative_queries`, aligned with this view's decode steps;
        ``None`` also when the split lies before the captured prompt's end."""
        spec = super().speculative_queries(layer)
        if spec is None or self.speculative_gap is not None:
            return None
        return spec[:, self.decode_from - self.source_prompt_len :, :]


def check_decode_from(
    decode_from: object, n_positions: int, query_start: int, where: str = "decode_from"
) -> str | None:
    """Why ``decode_from`` cannot split a trace of ``n_positions`` positions whose queries are
    stored from ``query_start`` on (``None``: it can). The conditions of :func:`split_trace`,
    shared with config validation, which checks them before anything runs."""
    if not (is_int(decode_from) or isinstance(decode_from, np.integer)):
        return f"{where} must be an integer, got {decode_from!r}"
    split = int(decode_from)  # type: ignore[call-overload]  # an int or numpy integer, checked
    if not 1 <= split < n_positions:
        return (
            f"{where} {decode_from} is out of range: the trace has {n_positions} positions, so "
            f"1 <= {where} <= {n_positions - 1}"
        )
    if query_start > split:
        return (
            f"{where} {decode_from} needs the queries of positions >= {decode_from}, but the "
            f"trace stores them from position {query_start} on (capture with queries: all)"
        )
    return None


def split_trace(trace: Trace, decode_from: int) -> SplitTrace:
    """``trace`` replayed from position ``decode_from`` (see :class:`SplitTrace`).

    Raises :class:`TraceError` (one line) if ``decode_from`` is not an integer in
    ``[1, n_positions)`` or the trace lacks the queries of the positions it would decode
    (``query_start > decode_from``). A split of a split splits the underlying trace.
    """
    base = trace
    problem = check_decode_from(decode_from, base.n_positions, base.query_start)
    if problem is not None:
        raise TraceError(f"trace {base.path}: {problem}")
    if isinstance(base, SplitTrace):
        base = Trace(base.path, base.manifest, base.model)
    return SplitTrace(base, int(decode_from))
