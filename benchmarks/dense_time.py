"""Simulated dense time per decode token (all blocks + final norm + LM head), per model and
weight precision, from the device presets and the model configs; no trace, no replay.

Run: ``python benchmarks/dense_time.py [--device ufs40-flagship] [--bits 8 4.5]
[--models llama-3.2-1b llama-3.2-3b qwen2.5-1.5b]`` (plain markdown table on stdout).

Per token: ``n_layers * dense_layer_us(params_per_layer) + lm_head_us(vocab, hidden)``, the
same functions the replay charges (:mod:`sim.hardware.compute`). ``bound`` says which roofline
term decides a block (``memory``: weight bytes / sustained DRAM bandwidth; ``compute``:
FLOPs / cpu_gflops). Attention, scoring and flash waits are not included: this is the floor a
run's ``dense_us`` column shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.config import load_model_geometry  # noqa: E402
from sim.hardware import dense_layer_us, lm_head_us, load_device  # noqa: E402
from sim.hardware.device import DeviceParams  # noqa: E402

MODELS = ["llama-3.2-1b", "llama-3.2-3b", "qwen2.5-1.5b"]


def dense_row(model: str, device: DeviceParams, bits: float) -> dict[str, object]:
    """One table row: the per-token dense time of ``model`` at ``bits`` bits per weight."""
    geometry = load_model_geometry(model)
    compute = device.compute.model_copy(update={"weight_bits": bits})
    dram = device.dram
    block_us = float(dense_layer_us(geometry.params_per_layer, compute, dram))
    head_us = lm_head_us(geometry.vocab_size, geometry.hidden, compute, dram)
    total_us = geometry.n_layers * block_us + head_us
    flop_us = 2 * geometry.params_per_layer / (compute.cpu_gflops * 1e3)
    byte_us = geometry.params_per_layer * bits / 8 / dram.sustained_bandwidth_mb_s
    return {
        "model": model,
        "weight bits": bits,
        "LM head bits": compute.lm_head_bits,
        "bound": "memory" if byte_us >= flop_us else "compute",
        "block us": round(block_us, 1),
        "LM head us": round(head_us, 1),
        "dense ms/token": round(total_us / 1e3, 2),
        "tok/s (dense only)": round(1e6 / total_us, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="ufs40-flagship")
    parser.add_argument("--bits", type=float, nargs="+", default=[8.0, 4.5])
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args(argv)
    device = load_device(args.device)
    dram = device.dram
    print(
        f"device {device.name}: cpu_gflops {device.compute.cpu_gflops}, DRAM "
        f"{dram.bandwidth_mb_s:.0f} MB/s peak x {dram.sustained_fraction} = "
        f"{dram.sustained_bandwidth_mb_s:.0f} MB/s sustained, kernel overhead "
        f"{device.compute.kernel_overhead_us} us\n"
    )
    rows = [dense_row(m, device, b) for m in args.models for b in args.bits]
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")


if __name__ == "__main__":
    main()
