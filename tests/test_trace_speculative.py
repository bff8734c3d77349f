"""The optional speculative-query files of the trace format (format_version 2).

Fast: synthetic traces written with TraceWriter (no torch), plus the committed version-1 sample,
which predates the speculative queries and must still open.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sim.errors import TraceError
from sim.trace.capture import CaptureSettings
from sim.trace.format import FORMAT_VERSION, layer_file, open_trace
from sim.trace.writer import TraceWriter

from .conftest import FIXTURE_TRACE

MODEL = {"name": "toy", "n_layers": 3, "n_q_heads": 4, "n_kv_heads": 2, "head_dim": 8}
PROMPT, STEPS = 10, 5
TOTAL = PROMPT + STEPS


def _write(path: Path, speculative_layers=(1, 2)) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    spec = {}
    with TraceWriter(path, MODEL, PROMPT, STEPS, 0, {"source": "toy"}, {"seed": 0}) as writer:
        writer.write_tokens(np.arange(TOTAL))
        for layer in range(3):
            kv = rng.standard_normal((2, TOTAL, 8))
            queries = rng.standard_normal((4, TOTAL, 8))
            spec[layer] = rng.standard_normal((4, STEPS, 8)).astype(np.float16)
            writer.write_layer(layer, kv, kv, queries,
                               spec[layer] if layer in speculative_layers else None)
    return spec


def test_round_trip_lists_checksums_and_memory_maps(tmp_path: Path) -> None:
    spec = _write(tmp_path / "t")
    trace = open_trace(tmp_path / "t", verify=True)
    assert trace.manifest["format_version"] == FORMAT_VERSION == 2
    assert trace.has_speculative_queries
    assert trace.speculative_queries(0) is None  # nothing precedes layer 0
    for layer in (1, 2):
        stored = trace.speculative_queries(layer)
        assert isinstance(stored, np.memmap) and stored.shape == (4, STEPS, 8)
        np.testing.assert_array_equal(stored, spec[layer])
        entry = trace.manifest["files"][layer_file(layer, "spec_queries")]
        assert entry["shape"] == [4, STEPS, 8] and len(entry["sha256"]) == 64
    # canonical order: each layer's speculative queries follow its queries
    names = list(trace.manifest["files"])
    assert names.index(layer_file(1, "spec_queries")) == names.index(layer_file(1, "queries")) + 1


def test_traces_without_them_still_open(tmp_path: Path) -> None:
    _write(tmp_path / "t", speculative_layers=())
    trace = open_trace(tmp_path / "t", verify=True)
    assert not trace.has_speculative_queries and trace.speculative_queries(2) is None
    old = open_trace(FIXTURE_TRACE)  # format_version 1, captured before they existed
    assert old.manifest["format_version"] == 1
    assert not old.has_speculative_queries and old.speculative_queries(5) is None


def test_all_or_none(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="layer_002.spec_queries.npy was never written"):
        _write(tmp_path / "partial", speculative_layers=(1,))
    assert not (tmp_path / "partial").exists()
    with pytest.raises(TraceError, match="layer 0 has no speculative queries"):
        _write(tmp_path / "zero", speculative_layers=(0, 1, 2))
    # a manifest that lists only some of them is rejected on open
    _write(tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    del manifest["files"][layer_file(2, "spec_queries")]
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match="lists 1 of the 2 speculative-query files"):
        open_trace(tmp_path / "t")


def test_corrupt_speculative_file_is_caught(tmp_path: Path) -> None:
    _write(tmp_path / "t")
    with open(tmp_path / "t" / layer_file(1, "spec_queries"), "r+b") as f:
        f.truncate(200)  # header (128 bytes) intact, data cut
    with pytest.raises(TraceError, match="layer_001.spec_queries.npy is truncated"):
        open_trace(tmp_path / "t")


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"spec_queries.npy has shape \[4, 4, 8\]"):
        with TraceWriter(tmp_path / "t", MODEL, PROMPT, STEPS, 0, {}, {}) as writer:
            kv = np.zeros((2, TOTAL, 8))
            writer.write_layer(1, kv, kv, np.zeros((4, TOTAL, 8)), np.zeros((4, STEPS - 1, 8)))


def test_cache_key_changed_with_the_new_arrays() -> None:
    # traces cached under the version-1 key lack the speculative queries: the key must differ
    from sim.trace import capture

    key = CaptureSettings().key()
    assert capture.CAPTURE_VERSION >= 2
    assert key != "smollm2-135m_pydoc_p2048_d128_cb7a4c4b"  # the key before format 2
