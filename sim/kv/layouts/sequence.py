"""The sequence-order layout: the baseline every other layout is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.kv.layouts.base import LAYOUTS, FlashLayout

__all__ = ["SequenceLayout"]


@LAYOUTS.register("sequence")
@dataclass(eq=False)
class SequenceLayout(FlashLayout):
    """Sequence order: slot = position (what llama.cpp-style KV offloading does)."""

    def _prefill_slots(self, prompt_len: int, groups: np.ndarray | None) -> np.ndarray:
        return np.arange(prompt_len, dtype=np.int64)

    def _append_slot(self, position: int, group: int | None) -> int:
        return position
