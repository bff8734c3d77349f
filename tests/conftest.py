"""Shared fixtures: the committed real trace (SmolLM2-135M, pydoc text)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURE_TRACE = Path(__file__).resolve().parent.parent / "traces" / "sample" / (
    "smollm2-135m_pydoc_p160_d24"
)


@pytest.fixture(scope="session")
def fixture_trace():
    from sim.trace.format import open_trace

    return open_trace(FIXTURE_TRACE)
