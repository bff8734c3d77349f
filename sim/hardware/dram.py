"""Phone DRAM as far as decode cares: the bandwidth that streams weights and KV, and the KV budget.

Capacity accounting itself (which KV bytes are resident) belongs to the KV cache (``sim.kv``);
this module only holds the device's numbers. Bandwidths are in MB/s throughout kvsim (DRAM and
flash alike), and ``1 MB/s = 1e6 bytes/s = 1 byte/us``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from sim.validation import STRICT_CONFIG


class DramParams(BaseModel):
    """DRAM of a phone.

    - ``bandwidth_mb_s``: peak DRAM bandwidth, MB/s (1e6 B/s), > 0: bus width x transfer rate
      (JEDEC data rate of the part), the figure a datasheet gives.
    - ``sustained_fraction``: share of the peak the phone CPU's decode kernels sustain when
      streaming weights and KV, 0 < f <= 1 (default 1: the peak). A CPU cluster does not reach
      the bus peak (the memory controller, the interconnect and the cores' outstanding-miss
      limits all cap it); the presets carry an estimate, labelled as such. The roofline
      (:func:`sim.hardware.compute.roofline_us`) uses :attr:`sustained_bandwidth_mb_s`.
    - ``kv_budget_bytes``: DRAM the KV cache may occupy (cache + buffers), bytes, > 0; a config
      knob that experiments usually override; at most 1 PiB (a thousand times any phone's
      DRAM; byte counts stay exact in float64).
    """

    model_config = STRICT_CONFIG

    bandwidth_mb_s: float = Field(gt=0)
    kv_budget_bytes: int = Field(gt=0, le=2**50)
    sustained_fraction: float = Field(1.0, gt=0, le=1)

    @property
    def sustained_bandwidth_mb_s(self) -> float:
        """``bandwidth_mb_s * sustained_fraction``: what the decode kernels stream at, MB/s."""
        return self.bandwidth_mb_s * self.sustained_fraction

    def stream_us(self, size_bytes: float | np.ndarray) -> float | np.ndarray:
        """Time to stream ``size_bytes`` through DRAM at the peak bandwidth, in microseconds."""
        time_us = np.asarray(size_bytes, dtype=np.float64) / self.bandwidth_mb_s
        return float(time_us) if time_us.ndim == 0 else time_us
