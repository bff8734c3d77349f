"""Attention traces: the on-disk format (:mod:`sim.trace.format`), offline texts
(:mod:`sim.trace.sources`) and capture from a real model (:mod:`sim.trace.capture`, needs the
``capture`` extra; torch is imported only when a capture runs).
"""

from __future__ import annotations

from sim.trace.format import Trace, TraceWriter, open_trace

__all__ = ["Trace", "TraceWriter", "open_trace"]
