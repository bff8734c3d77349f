"""The on-disk trace format: round trip, laziness, and one clear TraceError per corruption.

Fast: synthetic traces written with TraceWriter (no torch), plus the committed real fixture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sim.errors import CaptureError, TraceError
from sim.model import ModelGeometry
from sim.trace.format import layer_file, open_trace
from sim.trace.sources import list_sources, load_text
from sim.trace.writer import TraceWriter

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "traces" / "sample" / "smollm2-135m_pydoc_p160_d24"

MODEL = {
    "name": "toy",
    "source": "synthetic",
    "n_layers": 2,
    "n_q_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 8,
    "params_per_layer": 1234,
    "rope_theta": 10000.0,
    "sliding_window": None,
}
PROMPT_LEN, DECODE_STEPS = 10, 5
N_POS = PROMPT_LEN + DECODE_STEPS


def _arrays(query_start: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {"tokens": rng.integers(0, 50_000, N_POS).astype(np.int64)}
    for layer in range(MODEL["n_layers"]):
        out[f"k{layer}"] = rng.standard_normal((2, N_POS, 8)).astype(np.float32)
        out[f"v{layer}"] = rng.standard_normal((2, N_POS, 8)).astype(np.float32)
        out[f"q{layer}"] = rng.standard_normal((4, N_POS - query_start, 8)).astype(np.float32)
    return out


def _write(path: Path, query_start: int = 0) -> dict[str, np.ndarray]:
    arrays = _arrays(query_start)
    text = {"source": "synthetic", "name": "toy", "sha256": "0" * 64, "n_chars": 0}
    with TraceWriter(
        path, MODEL, PROMPT_LEN, DECODE_STEPS, query_start, text, {"seed": 0}
    ) as writer:
        writer.write_tokens(arrays["tokens"])
        for layer in range(MODEL["n_layers"]):
            writer.write_layer(layer, arrays[f"k{layer}"], arrays[f"v{layer}"], arrays[f"q{layer}"])
    return arrays


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    path = tmp_path / "toy"
    _write(path)
    return path


def _error(path: Path, verify: bool = False) -> str:
    with pytest.raises(TraceError) as info:
        open_trace(path, verify=verify)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    assert str(path) in message
    return message


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _save_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("query_start", [0, 3, PROMPT_LEN])
def test_round_trip_float16(tmp_path: Path, query_start: int) -> None:
    path = tmp_path / "t"
    arrays = _write(path, query_start)
    trace = open_trace(path, verify=True)
    assert trace.model == ModelGeometry("toy", 2, 4, 2, 8, 1234)
    assert (trace.prompt_len, trace.decode_steps) == (PROMPT_LEN, DECODE_STEPS)
    assert (trace.n_positions, trace.query_start) == (N_POS, query_start)
    np.testing.assert_array_equal(trace.tokens(), arrays["tokens"])
    assert trace.tokens().dtype == np.int32
    for layer in range(2):
        for got, want in (
            (trace.keys(layer), arrays[f"k{layer}"]),
            (trace.values(layer), arrays[f"v{layer}"]),
            (trace.queries(layer), arrays[f"q{layer}"]),
        ):
            assert got.dtype == np.float16
            # stored as float16: exactly the float16 rounding of what was written
            np.testing.assert_array_equal(got, want.astype(np.float16))
        dq = trace.decode_queries(layer)
        assert dq.shape == (4, DECODE_STEPS, 8)
        # decode step s is position PROMPT_LEN + s, i.e. queries index PROMPT_LEN + s - query_start
        np.testing.assert_array_equal(
            dq, arrays[f"q{layer}"][:, PROMPT_LEN - query_start :].astype(np.float16)
        )
    # every file but the writer's verification verdict (sim.trace.verified), not a trace file
    on_disk = sum(f.stat().st_size for f in path.iterdir() if f.name != ".verified.json")
    assert trace.size_bytes == on_disk
    assert not list(tmp_path.glob(".*")), "no temp dir may remain after a successful write"


def test_arrays_are_lazy_memmaps(trace_dir: Path) -> None:
    trace = open_trace(trace_dir)
    for array in (trace.keys(0), trace.values(1), trace.queries(0), trace.tokens()):
        assert isinstance(array, np.memmap)
        assert not array.flags.writeable
    assert isinstance(trace.decode_queries(0).base, np.memmap) or isinstance(
        trace.decode_queries(0), np.memmap
    )


def test_float16_input_accepted(tmp_path: Path) -> None:
    arrays = _arrays(0)
    with TraceWriter(tmp_path / "t", MODEL, PROMPT_LEN, DECODE_STEPS, 0, {}, {}) as writer:
        writer.write_tokens(arrays["tokens"].astype(np.int32))
        for layer in range(2):
            writer.write_layer(
                layer,
                arrays[f"k{layer}"].astype(np.float16),
                arrays[f"v{layer}"].astype(np.float16),
                arrays[f"q{layer}"].astype(np.float16),
            )
    np.testing.assert_array_equal(
        open_trace(tmp_path / "t").keys(1), arrays["k1"].astype(np.float16)
    )


def test_layer_index_out_of_range(trace_dir: Path) -> None:
    with pytest.raises(TraceError, match="layer 2 out of range"):
        open_trace(trace_dir).keys(2)


# --------------------------------------------------------------------------- corruption


def test_not_a_directory(tmp_path: Path) -> None:
    assert "not a directory" in _error(tmp_path / "nothing")


def test_missing_manifest(trace_dir: Path) -> None:
    (trace_dir / "manifest.json").unlink()
    assert "manifest.json is missing" in _error(trace_dir)


def test_bad_json(trace_dir: Path) -> None:
    (trace_dir / "manifest.json").write_text('{"format_version": 1,')
    assert "manifest.json is not valid JSON" in _error(trace_dir)


def test_manifest_missing_key(trace_dir: Path) -> None:
    manifest = _manifest(trace_dir)
    del manifest["decode_steps"]
    _save_manifest(trace_dir, manifest)
    assert "lacks key(s) decode_steps" in _error(trace_dir)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"n_positions": 99}, "n_positions (99) != prompt_len"),
        ({"query_start": PROMPT_LEN + 1}, "query_start"),
        ({"prompt_len": 0}, "prompt_len must be >= 1"),
        ({"format_version": 7}, "format_version 7"),
        ({"dtype": "bfloat16"}, "dtype 'bfloat16'; supported: 'float16', 'float32'"),
        # a float32 manifest over float16 files: the headers disagree
        ({"dtype": "float32"}, "layer_000.keys.npy has dtype float16, expected float32"),
        ({"decode_steps": -1}, "decode_steps must be an integer >= 0"),
    ],
)
def test_manifest_impossible_values(trace_dir: Path, change: dict, expected: str) -> None:
    manifest = _manifest(trace_dir)
    manifest.update(change)
    _save_manifest(trace_dir, manifest)
    assert expected in _error(trace_dir)


def test_manifest_impossible_geometry(trace_dir: Path) -> None:
    manifest = _manifest(trace_dir)
    manifest["model"]["n_q_heads"] = 3  # not a multiple of 2 KV heads
    _save_manifest(trace_dir, manifest)
    assert "impossible model geometry" in _error(trace_dir)


def test_missing_layer_file(trace_dir: Path) -> None:
    (trace_dir / layer_file(1, "values")).unlink()
    assert "layer_001.values.npy is missing" in _error(trace_dir)


def test_wrong_shape_in_header(trace_dir: Path) -> None:
    np.save(trace_dir / layer_file(0, "keys"), np.zeros((2, N_POS - 1, 8), np.float16))
    message = _error(trace_dir)
    assert "layer_000.keys.npy has shape [2, 14, 8] in its header, expected [2, 15, 8]" in message


def test_wrong_dtype_in_header(trace_dir: Path) -> None:
    np.save(trace_dir / layer_file(0, "queries"), np.zeros((4, N_POS, 8), np.float32))
    assert "layer_000.queries.npy has dtype float32" in _error(trace_dir)


def test_corrupt_header(trace_dir: Path) -> None:
    (trace_dir / "tokens.npy").write_bytes(b"not an npy file at all")
    assert "tokens.npy has a corrupt .npy header" in _error(trace_dir)


def test_truncated_file(trace_dir: Path) -> None:
    target = trace_dir / layer_file(1, "keys")
    full = target.stat().st_size
    with open(target, "r+b") as f:
        f.truncate(full - 10)
    message = _error(trace_dir)
    assert f"layer_001.keys.npy is truncated (expected {full} bytes, found {full - 10})" in message


def test_checksum_mismatch_only_with_verify(trace_dir: Path) -> None:
    target = trace_dir / layer_file(0, "values")
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, same header: only the checksum can tell
    target.write_bytes(bytes(data))
    open_trace(trace_dir)  # cheap validation cannot see it
    assert "layer_000.values.npy checksum mismatch" in _error(trace_dir, verify=True)


def test_manifest_geometry_mismatch(trace_dir: Path) -> None:
    manifest = _manifest(trace_dir)
    manifest["model"]["n_layers"] = 3  # files exist for 2 layers only
    _save_manifest(trace_dir, manifest)
    assert "layer_002.keys.npy is not listed" in _error(trace_dir)
    manifest["model"]["n_layers"] = 1
    _save_manifest(trace_dir, manifest)
    assert "layer_001.keys.npy is listed" in _error(trace_dir)


def test_manifest_shape_disagrees_with_geometry(trace_dir: Path) -> None:
    manifest = _manifest(trace_dir)
    manifest["model"]["head_dim"] = 16
    _save_manifest(trace_dir, manifest)
    assert "tokens.npy" in _error(trace_dir) or "layer_000" in _error(trace_dir)


# --------------------------------------------------------------------------- writer


def test_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "t"
    arrays = _arrays(0)
    with pytest.raises(RuntimeError, match="boom"):
        with TraceWriter(target, MODEL, PROMPT_LEN, DECODE_STEPS, 0, {}, {}) as writer:
            writer.write_tokens(arrays["tokens"])
            writer.write_layer(0, arrays["k0"], arrays["v0"], arrays["q0"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_incomplete_trace_is_an_error(tmp_path: Path) -> None:
    arrays = _arrays(0)
    with pytest.raises(TraceError, match="never written"):
        with TraceWriter(tmp_path / "t", MODEL, PROMPT_LEN, DECODE_STEPS, 0, {}, {}) as writer:
            writer.write_tokens(arrays["tokens"])
            writer.write_layer(0, arrays["k0"], arrays["v0"], arrays["q0"])
    assert list(tmp_path.iterdir()) == []


def test_a_float32_trace_keeps_every_bit_and_its_non_finite_values_are_found(
    tmp_path: Path,
) -> None:
    """A closed loop's own trace is stored float32 (the open-loop pass must see the loop's
    keys unrounded): written and read back bit for bit, its manifest says so, and a NaN
    written into its data is found by verification (the float32 exponent mask)."""
    arrays = _arrays(0)
    path = tmp_path / "f32"
    with TraceWriter(path, MODEL, PROMPT_LEN, DECODE_STEPS, 0, {}, {}, dtype="float32") as w:
        w.write_tokens(arrays["tokens"])
        for layer in range(MODEL["n_layers"]):
            w.write_layer(layer, arrays[f"k{layer}"], arrays[f"v{layer}"], arrays[f"q{layer}"])
    trace = open_trace(path, verify=True)
    assert trace.manifest["dtype"] == "float32" and trace.keys(1).dtype == np.float32
    for layer in range(MODEL["n_layers"]):
        np.testing.assert_array_equal(trace.keys(layer), arrays[f"k{layer}"])
        np.testing.assert_array_equal(trace.queries(layer), arrays[f"q{layer}"])
    assert float(np.float16(arrays["k0"][0, 0, 0])) != arrays["k0"][0, 0, 0]  # fp16 would round
    name = layer_file(1, "values")
    data = np.load(path / name)
    offset = (path / name).stat().st_size - data.nbytes
    with open(path / name, "r+b") as f:  # one NaN, the manifest's checksum updated to match
        f.seek(offset + 4 * 7)
        f.write(np.float32("nan").tobytes())
    manifest = _manifest(path)
    from sim.trace.format import sha256_file

    manifest["files"][name]["sha256"] = sha256_file(path / name)
    _save_manifest(path, manifest)
    assert f"{name} holds 1 non-finite value(s)" in _error(path, verify=True)


def test_writer_rejects_bad_shapes_and_overflow(tmp_path: Path) -> None:
    arrays = _arrays(0)
    with pytest.raises(TraceError, match=r"layer_000.queries.npy has shape \[4, 14, 8\]"):
        with TraceWriter(tmp_path / "t", MODEL, PROMPT_LEN, DECODE_STEPS, 0, {}, {}) as writer:
            writer.write_layer(0, arrays["k0"], arrays["v0"], arrays["q0"][:, 1:])
    with pytest.raises(TraceError, match="non-finite"):
        with TraceWriter(tmp_path / "t", MODEL, PROMPT_LEN, DECODE_STEPS, 0, {}, {}) as writer:
            writer.write_layer(0, arrays["k0"] * 1e6, arrays["v0"], arrays["q0"])
    with pytest.raises(TraceError, match="impossible model geometry"):
        TraceWriter(tmp_path / "t", {**MODEL, "n_kv_heads": 3}, 10, 5, 0, {}, {})
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_unless_overwrite(trace_dir: Path) -> None:
    with pytest.raises(TraceError, match="already exists"):
        with TraceWriter(trace_dir, MODEL, PROMPT_LEN, DECODE_STEPS, 0, {}, {}):
            pass
    before = open_trace(trace_dir).keys(0).copy()
    arrays = _arrays(0, seed=1)
    with TraceWriter(
        trace_dir, MODEL, PROMPT_LEN, DECODE_STEPS, 0, {}, {}, overwrite=True
    ) as writer:
        writer.write_tokens(arrays["tokens"])
        for layer in range(2):
            writer.write_layer(layer, arrays[f"k{layer}"], arrays[f"v{layer}"], arrays[f"q{layer}"])
    after = open_trace(trace_dir, verify=True).keys(0)
    assert not np.array_equal(before, after)
    assert sorted(p.name for p in trace_dir.parent.iterdir()) == [trace_dir.name]


# --------------------------------------------------------------------------- committed fixture


def test_committed_fixture_opens_and_has_smollm2_shapes() -> None:
    trace = open_trace(FIXTURE, verify=True)
    geometry = trace.model
    assert (geometry.n_layers, geometry.n_q_heads, geometry.n_kv_heads, geometry.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert geometry.params_per_layer > 0
    assert (trace.prompt_len, trace.decode_steps, trace.query_start) == (160, 24, 160)
    assert trace.keys(29).shape == (3, 184, 64)
    assert trace.values(0).shape == (3, 184, 64)
    assert trace.queries(7).shape == (9, 24, 64)
    assert trace.decode_queries(7).shape == (9, 24, 64)
    assert trace.tokens().shape == (184,)
    assert trace.size_bytes < 5.2e6
    # real attention, recomputed from the fp16 trace: a proper distribution per head, and
    # concentrated (not uniform) in a middle layer: in SmolLM2's middle and late layers the
    # top 1% of keys hold most of the attention mass
    keys = np.asarray(trace.keys(15), np.float32)
    q = np.asarray(trace.decode_queries(15)[:, -1], np.float32)  # last decode step
    k = np.repeat(keys, geometry.queries_per_kv_head, axis=0)  # GQA: query head h -> KV head h // 3
    scores = np.einsum("hd,htd->ht", q, k) * trace.manifest["model"]["attn_scale"]
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top_share = np.sort(probs, axis=1)[:, ::-1][:, :10].sum(axis=1)
    assert top_share.mean() > 0.3  # 10 of 184 keys hold far more than their 5% share


def test_fixture_copy_with_deleted_file_fails(tmp_path: Path) -> None:
    copy = tmp_path / "fixture"
    shutil.copytree(FIXTURE, copy)
    (copy / "layer_017.queries.npy").unlink()
    assert "layer_017.queries.npy is missing" in _error(copy)


# --------------------------------------------------------------------------- texts


def test_builtin_texts_are_deterministic_and_long() -> None:
    assert list_sources() == ["pydoc", "stdlib-docstrings"]
    for name in list_sources():
        first, second = load_text(name), load_text(name)
        assert first.sha256 == second.sha256 and first.text == second.text
        # >= 16K tokens at a pessimistic ~4.5 characters per token
        assert first.n_chars > 16_000 * 4.5
    assert load_text("pydoc").text != load_text("stdlib-docstrings").text


def test_file_text_sources(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    single = load_text(f"file:{tmp_path / 'a.txt'}")
    assert single.text == "first"
    globbed = load_text(f"file:{tmp_path}/*.txt")
    assert globbed.text == "first\n\nsecond"  # sorted order
    listed = load_text(f"file:{tmp_path / 'b.txt'},{tmp_path / 'a.txt'}")
    assert listed.text == "second\n\nfirst"
    assert "/" not in globbed.name
    for bad, expected in (
        (f"file:{tmp_path / 'missing.txt'}", "does not exist"),
        (f"file:{tmp_path}/*.md", "no file matches"),
        ("file:", "needs a path"),
        ("gutenberg", "unknown text source"),
    ):
        with pytest.raises(CaptureError, match=expected) as info:
            load_text(bad)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- streamed writing


def _write_streamed(path: Path, arrays: dict[str, np.ndarray], blocks: list[int]) -> None:
    """Write the toy trace through TraceWriter.stream in blocks of the given sizes."""
    text = {"source": "synthetic", "name": "toy", "sha256": "0" * 64, "n_chars": 0}
    with TraceWriter(path, MODEL, PROMPT_LEN, DECODE_STEPS, 0, text, {"seed": 0}) as writer:
        writer.write_tokens(arrays["tokens"])
        for layer in range(MODEL["n_layers"]):
            for kind, prefix in (("keys", "k"), ("values", "v"), ("queries", "q")):
                stream = writer.stream(layer, kind)
                start = 0
                for n in blocks:
                    stream.write(start, arrays[f"{prefix}{layer}"][:, start : start + n])
                    start += n


def test_streamed_trace_equals_one_written_whole(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    arrays = _write(whole, 0)
    streamed = tmp_path / "streamed"
    _write_streamed(streamed, arrays, [1, 4, 2, 8])  # 15 positions, uneven blocks
    a, b = open_trace(whole, verify=True), open_trace(streamed, verify=True)
    for name, entry in a.manifest["files"].items():
        assert b.manifest["files"][name] == entry, name  # same bytes, same checksums
    assert not list(tmp_path.glob(".*")), "no temp dir may remain after a successful write"


def test_stream_rejects_gaps_overlaps_and_bad_blocks(tmp_path: Path) -> None:
    arrays = _arrays(0)
    # a position never written: nothing is saved
    with pytest.raises(TraceError, match="position\\(s\\) never written; nothing was saved"):
        _write_streamed(tmp_path / "gap", arrays, [4, 4])
    assert not (tmp_path / "gap").exists() and not list(tmp_path.glob(".*"))
    text = {"source": "synthetic"}
    with pytest.raises(TraceError, match="layer_000.keys.npy has 10 position"):
        with TraceWriter(tmp_path / "t", MODEL, PROMPT_LEN, DECODE_STEPS, 0, text, {}) as writer:
            writer.write_tokens(arrays["tokens"])
            writer.write_layer(1, arrays["k1"], arrays["v1"], arrays["q1"])
            stream = writer.stream(0, "keys")
            stream.write(0, arrays["k0"][:, :5])
            with pytest.raises(TraceError, match="overlap"):
                stream.write(4, arrays["k0"][:, 4:6])
            with pytest.raises(TraceError, match="outside"):
                stream.write(14, arrays["k0"][:, :2])
            with pytest.raises(TraceError, match="block has shape"):
                stream.write(5, arrays["q0"][:, 5:6])
            with pytest.raises(TraceError, match="non-finite"):
                stream.write(5, np.full((2, 1, 8), 1e6, dtype=np.float32))
            with pytest.raises(TraceError, match="already being written"):
                writer.stream(0, "keys")
            with pytest.raises(TraceError, match="being streamed"):
                writer.write_layer(0, arrays["k0"], arrays["v0"], arrays["q0"])
            with pytest.raises(TraceError, match="no file layer_000.spec_queries"):
                writer.stream(0, "spec_queries")
            for kind, prefix in (("values", "v"), ("queries", "q")):
                writer.stream(0, kind).write(0, arrays[f"{prefix}0"])
            # keys of layer 0 stay incomplete: leaving the block must fail and save nothing
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".*"))


def test_streaming_memory_does_not_grow_with_the_layer(tmp_path: Path) -> None:
    """Structural: writing a layer of 4 MB in blocks of 256 positions allocates (numpy and
    Python, as tracemalloc sees them) far less than the layer, so a capture never holds one."""
    import tracemalloc

    model = dict(MODEL, n_layers=1, n_q_heads=2, n_kv_heads=2, head_dim=64)
    prompt_len, decode_steps = 8000, 8000
    n_positions = prompt_len + decode_steps
    layer_bytes = 2 * n_positions * 64 * 2  # one float16 file: 4 MiB
    rng = np.random.default_rng(0)
    block = rng.standard_normal((2, 256, 64)).astype(np.float16)
    with TraceWriter(tmp_path / "t", model, prompt_len, decode_steps, 0, {}, {}) as writer:
        writer.write_tokens(np.zeros(n_positions, dtype=np.int32))
        tracemalloc.start()
        for kind in ("keys", "values", "queries"):
            stream = writer.stream(0, kind)
            for start in range(0, n_positions, 256):
                stream.write(start, block[:, : min(256, n_positions - start)])
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak_bytes < layer_bytes / 8, peak_bytes
    trace = open_trace(tmp_path / "t", verify=True)
    np.testing.assert_array_equal(trace.keys(0)[:, 512:768], block)
    np.testing.assert_array_equal(trace.queries(0)[:, -128:], block[:, :128])
