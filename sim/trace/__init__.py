"""Attention traces: the on-disk format and its reader (:mod:`sim.trace.format`), the writer
(:mod:`sim.trace.writer`), a trace replayed from a later split point (:mod:`sim.trace.split`),
offline texts (:mod:`sim.trace.sources`) and capture from a real model (:mod:`sim.trace.capture`,
with :mod:`sim.trace.models`, :mod:`sim.trace.recording` and :mod:`sim.trace.decoding`; needs
the ``capture`` extra; torch is imported only when a capture runs).
"""

from __future__ import annotations

from sim.trace.format import Trace, open_trace
from sim.trace.writer import TraceWriter

__all__ = ["Trace", "TraceWriter", "open_trace"]
