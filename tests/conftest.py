"""Shared fixtures: the committed real trace (SmolLM2-135M, pydoc text)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.hardware import ComputeParams, DeviceParams, DramParams, FlashParams
from sim.policies.base import RetrievalPolicy
from tests.direct_io import direct_io_problem

FIXTURE_TRACE = Path(__file__).resolve().parent.parent / "traces" / "sample" / (
    "smollm2-135m_pydoc_p160_d24"
)


@pytest.fixture(autouse=True, scope="session")
def _private_pass_cache(tmp_path_factory):
    """Tests keep their policy passes out of the repository's results/.pass-cache."""
    import os

    previous = os.environ.get("KVSIM_PASS_CACHE")
    os.environ["KVSIM_PASS_CACHE"] = str(tmp_path_factory.mktemp("pass-cache"))
    yield
    if previous is None:
        os.environ.pop("KVSIM_PASS_CACHE", None)
    else:
        os.environ["KVSIM_PASS_CACHE"] = previous


@pytest.fixture(scope="session")
def fixture_trace():
    from sim.trace.format import open_trace

    return open_trace(FIXTURE_TRACE)


# A device whose every duration is easy to compute by hand (1 MB/s = 1 byte/us):
#   read command: 50 us on a unit + bytes / 4096 us on the link
#   write command: 100 us on a unit + bytes / 2048 us on the link
#   roofline: max(flops / 1e5, bytes / 1e4) us  (100 GFLOP/s, 10,000 MB/s), no kernel overhead
HAND_DEVICE = DeviceParams(
    name="hand",
    flash=FlashParams(
        read_bandwidth_mb_s=4096, write_bandwidth_mb_s=2048, queue_depth=4, parallel_units=2,
        read_command_latency_us=50, write_command_latency_us=100, page_size_bytes=4096,
        max_io_bytes=8192,
    ),
    dram=DramParams(bandwidth_mb_s=10_000, kv_budget_bytes=1 << 20),
    compute=ComputeParams(cpu_gflops=100, weight_bits=8, kernel_overhead_us=0),
)


class HandPolicy(RetrievalPolicy):
    """A policy whose selections the test writes by hand into a PolicyPass (never registered)."""

    name = "hand"

    def __init__(self, needs_query: bool = True) -> None:
        self.selection_needs_query = needs_query

    def select_layer(self, ctx):  # pragma: no cover - the tests build PolicyPass directly
        raise NotImplementedError


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    """An empty directory where O_DIRECT works (skips the test where it does not)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    problem = direct_io_problem(disk)
    if problem:
        pytest.skip(f"O_DIRECT unusable on the test directory: {problem}")
    return disk
