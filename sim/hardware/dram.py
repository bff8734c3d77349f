"""Phone DRAM as far as decode cares: the bandwidth that streams weights and KV, and the KV budget.

Capacity accounting itself (which KV bytes are resident) belongs to the KV cache (``sim.kv``);
this module only holds the device's numbers. Bandwidths are in MB/s throughout kvsim (DRAM and
flash alike), and ``1 MB/s = 1e6 bytes/s = 1 byte/us``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class DramParams(BaseModel):
    """DRAM of a phone.

    - ``bandwidth_mb_s``: bandwidth the decode kernels can stream from DRAM, MB/s (1e6 B/s), > 0.
    - ``kv_budget_bytes``: DRAM the KV cache may occupy (cache + buffers), bytes, > 0; a config
      knob that experiments usually override.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bandwidth_mb_s: float = Field(gt=0)
    kv_budget_bytes: int = Field(gt=0)

    def stream_us(self, size_bytes: float | np.ndarray) -> float | np.ndarray:
        """Time to stream ``size_bytes`` through DRAM at full bandwidth, in microseconds."""
        time_us = np.asarray(size_bytes, dtype=np.float64) / self.bandwidth_mb_s
        return float(time_us) if time_us.ndim == 0 else time_us
