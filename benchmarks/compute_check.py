"""The compute model against numpy on this machine: for a calibrated device preset and a model
geometry, the simulated time of each decode kernel (the functions the replay charges,
:mod:`sim.hardware.compute`) against the time numpy takes for the same operation, measured
fresh (float32, one BLAS thread, the best of repetitions), with the relative error and a
pass/fail column at a stated tolerance.

Run: ``python benchmarks/compute_check.py [--device results/calibration/this-machine.yaml]
[--model llama-3.2-1b] [--tolerance 0.2] [--seconds 1.0]`` (plain markdown table on stdout;
exit status 1 when a kernel misses the tolerance). The preset is only read.

Kernels (:mod:`sim.calibrate.cpu` builds them as ``kvsim calibrate`` times them):

* the dense block: one decode step's matrix-vector products through a block of ``--model``
  (from DRAM) against ``dense_layer_us`` of the block's weights;
* the LM head: the final RMSNorm and the ``vocab x hidden`` matvec against ``lm_head_us``;
* scoring ``n`` key-sized vectors against a KV head's query heads, at the cluster counts of
  contexts of a few K tokens and Quest's page vectors (``SCORING_VECTORS``), against
  ``scoring_us``;
* one KV head's attention over ``N`` entries (``ATTENTION_ENTRIES``) against
  ``attention_us``.

numpy computes in float32, so the model is charged float32 operands: ``weight_bits`` and the
LM head's bits are set to 32 (a calibrated preset keeps the simulated model's precision,
Q4_0, which numpy does not run), KV entries and index vectors are ``head_dim`` float32 values
each. Everything else comes from the preset. Timings taken while other work holds the cores
are not conclusive (the table says how loaded the machine was: the 1-minute load average).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.calibrate.cpu import (  # noqa: E402
    ATTENTION_ENTRIES,
    SCORING_VECTORS,
    Kernel,
    attention_kernel,
    block_kernel,
    block_shapes,
    lm_head_kernel,
    scoring_kernel,
    time_kernel,
)
from sim.config import load_model_geometry  # noqa: E402
from sim.errors import KvsimError  # noqa: E402
from sim.hardware import (  # noqa: E402
    attention_us,
    dense_layer_us,
    lm_head_us,
    load_device,
    scoring_us,
)
from sim.hardware.device import DeviceParams  # noqa: E402
from sim.model import ModelGeometry  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEVICE = REPO / "results" / "calibration" / "this-machine.yaml"
FLOAT32_BITS = 32.0
#: 1-minute load average per CPU above which the timings are flagged as taken under load
LOADED = 0.5


@dataclass(frozen=True)
class Check:
    """One row: an operation, its simulated time and the numpy kernel that performs it
    (built when timed: its operands take up to a GB)."""

    operation: str
    simulated_us: float
    build: Callable[[], Kernel]


def checks(device: DeviceParams, model: ModelGeometry) -> list[Check]:
    """The rows in table order, the model charged float32 operands."""
    compute = device.compute.model_copy(
        update={"weight_bits": FLOAT32_BITS, "lm_head_min_bits": FLOAT32_BITS})
    dram = device.dram
    d, g = model.head_dim, model.queries_per_kv_head
    # the block's matrices (what numpy multiplies; params_per_layer adds the two norms)
    weights = sum(r * c for _, r, c in block_shapes(model))
    rows = [Check("dense block", float(dense_layer_us(weights, compute, dram)),
                  partial(block_kernel, model))]
    if model.vocab_size:
        rows.append(Check("LM head", lm_head_us(model.vocab_size, model.hidden, compute, dram),
                          partial(lm_head_kernel, model.vocab_size, model.hidden)))
    rows += [Check(f"scoring n={n}", float(scoring_us(n, d, g, 4.0 * d, compute, dram)),
                   partial(scoring_kernel, n, d, g)) for n in SCORING_VECTORS]
    rows += [Check(f"attention N={n}", float(attention_us(n, d, g, 8.0 * d, compute, dram)),
                   partial(attention_kernel, n, d, g)) for n in ATTENTION_ENTRIES]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=str(DEFAULT_DEVICE),
                        help="a device preset name or file (read only)")
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--tolerance", type=float, default=0.2,
                        help="largest |simulated / measured - 1| that passes (default 0.2)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time spent repeating each kernel (default 1)")
    args = parser.parse_args(argv)
    try:
        device = load_device(args.device)
        model = load_model_geometry(args.model, "--model")
    except KvsimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (args.tolerance > 0 and args.seconds > 0):
        print("error: --tolerance and --seconds must be > 0", file=sys.stderr)
        return 2
    from threadpoolctl import threadpool_limits

    c = device.compute
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    print(f"device {device.name} ({args.device}): cpu_gflops {c.cpu_gflops}, attention_gflops "
          f"{c.attention_gflops}, kernel_overhead_us {c.kernel_overhead_us}, sustained DRAM "
          f"{device.dram.sustained_bandwidth_mb_s:,.0f} MB/s; model {model.name} (head_dim "
          f"{model.head_dim}, {model.queries_per_kv_head} query heads per KV head); float32 "
          f"numpy, 1 BLAS thread, best of {args.seconds:g} s per kernel; tolerance "
          f"{100 * args.tolerance:g}%; load average {load:.2f} on {cpus} CPUs"
          + (" (other work holds the cores: the timings are not conclusive)"
             if load > LOADED * cpus else ""))
    print()
    print("| operation | simulated us | numpy us | error | pass |")
    print("| --- | ---: | ---: | ---: | --- |")
    failed = 0
    with threadpool_limits(1):
        for row in checks(device, model):
            kernel = row.build()
            measured = time_kernel(kernel, time.perf_counter() + args.seconds).time_us
            del kernel
            error = row.simulated_us / measured - 1
            ok = abs(error) <= args.tolerance
            failed += not ok
            print(f"| {row.operation} | {row.simulated_us:,.1f} | {measured:,.1f} | "
                  f"{100 * error:+.1f}% | {'pass' if ok else 'FAIL'} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
