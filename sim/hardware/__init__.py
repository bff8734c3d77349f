"""The simulated phone: UFS flash (SimPy), DRAM, and a roofline compute model.

``load_device("ufs40-flagship")`` gives a :class:`DeviceParams`; ``Flash(env, device.flash)``
is the SimPy storage model; ``dense_layer_us`` / ``lm_head_us`` / ``scoring_us`` /
``attention_us`` cost compute.
"""

from __future__ import annotations

from sim.hardware.compute import (
    ComputeParams,
    attention_us,
    dense_layer_us,
    lm_head_us,
    roofline_us,
    scoring_us,
)
from sim.hardware.device import DeviceParams, load_device, preset_names
from sim.hardware.dram import DramParams
from sim.hardware.flash import Flash, FlashParams, ResourceFlash, read_bandwidth_curve

__all__ = [
    "ComputeParams",
    "DeviceParams",
    "DramParams",
    "Flash",
    "FlashParams",
    "ResourceFlash",
    "attention_us",
    "dense_layer_us",
    "lm_head_us",
    "load_device",
    "preset_names",
    "read_bandwidth_curve",
    "roofline_us",
    "scoring_us",
]
