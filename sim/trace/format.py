"""On-disk trace format: one directory per trace, lazily memory-mapped, validated on open.

Layout of a trace directory (format_version 2; version 1 traces, without the optional
speculative queries, still open)::

    manifest.json                 what the trace is (model, positions, text, capture, checksums)
    tokens.npy                    int32   (n_positions,)
    (float16 below; float32 in a trace whose manifest says ``"dtype": "float32"``: a closed
    loop's own trace, stored unrounded so the open-loop pass makes exactly the loop's selections)
    layer_{l:03d}.keys.npy        float16 (n_kv_heads, n_positions, head_dim)   post-RoPE keys
    layer_{l:03d}.values.npy      float16 (n_kv_heads, n_positions, head_dim)
    layer_{l:03d}.queries.npy     float16 (n_q_heads, n_positions - query_start, head_dim)
    layer_{l:03d}.spec_queries.npy  float16 (n_q_heads, decode_steps, head_dim)  optional, l >= 1

Speculative queries (InfiniGen): for layer ``l >= 1``, the decode steps' queries of layer ``l``
computed from layer ``l - 1``'s attention input (its input_layernorm output) through layer
``l``'s query projection (q_norm if any) and RoPE. A trace holds them for every layer >= 1 or
for none.

Position convention: decode step ``s`` (0-based) is position ``prompt_len + s``; its query attends
keys ``[0, prompt_len + s]`` inclusive (its own fresh key included). Query ``j`` of a
``queries`` array belongs to position ``query_start + j``.

Opening a trace (:func:`open_trace`) reads only the manifest and the ``.npy`` headers, so it is
cheap at any trace size; arrays are returned as read-only ``np.memmap`` views, so the trace is
never held whole in RAM. Every problem surfaces as one-line :class:`sim.errors.TraceError` that
names the trace and the file.

This module is the read side; traces are written by :class:`sim.trace.writer.TraceWriter`, and
:mod:`sim.trace.split` replays a trace from an earlier split point (``trace.decode_from``).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from sim.errors import TraceError
from sim.model import ModelGeometry

FORMAT_VERSION = 2
#: versions :func:`open_trace` accepts (1: no speculative queries).
READABLE_FORMAT_VERSIONS = (1, 2)
STORED_DTYPE = "float16"
#: the dtypes a trace's keys, values and queries may be stored in (manifest ``dtype``):
#: float16 (captures) or float32 (a closed-loop run's own trace, ``closed_loop.save_trace``)
STORED_DTYPES = ("float16", "float32")
MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.npy"
_TOKEN_DTYPE = np.dtype("<i4")
_HASH_CHUNK_BYTES = 1 << 20
#: serialises .npy header parsing (ast.literal_eval) across threads (see :meth:`Trace._load`)
_NPY_HEADER_LOCK = threading.Lock()
# what numpy's .npy header parser raises on a corrupt header (it tokenizes the header's dict)
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, tokenize.TokenError)

_REQUIRED_TOP_KEYS = (
    "format_version",
    "model",
    "prompt_len",
    "decode_steps",
    "n_positions",
    "query_start",
    "dtype",
    "files",
)
_REQUIRED_MODEL_KEYS = ("name", "n_layers", "n_q_heads", "n_kv_heads", "head_dim")


SPEC_KIND = "spec_queries"


def layer_file(layer: int, kind: str) -> str:
    """File name of one layer's array; ``kind`` is ``keys``, ``values``, ``queries`` or
    ``spec_queries``."""
    return f"layer_{layer:03d}.{kind}.npy"


def expected_files(
    geometry: ModelGeometry, n_positions: int, query_start: int, speculative_steps: int = 0,
    dtype: str = STORED_DTYPE,
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every file a trace of this shape must hold: name -> (shape, dtype), canonical order.

    ``speculative_steps > 0`` adds the optional speculative-query files of layers ``1 ..``
    (shape ``(n_q_heads, speculative_steps, head_dim)``, after each layer's queries).
    ``dtype``: the layer files' (one of :data:`STORED_DTYPES`).
    """
    kv_dtype = np.dtype(dtype).newbyteorder("<")
    kv_shape = (geometry.n_kv_heads, n_positions, geometry.head_dim)
    q_shape = (geometry.n_q_heads, n_positions - query_start, geometry.head_dim)
    spec_shape = (geometry.n_q_heads, speculative_steps, geometry.head_dim)
    files: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        TOKENS_NAME: ((n_positions,), _TOKEN_DTYPE)
    }
    for layer in range(geometry.n_layers):
        files[layer_file(layer, "keys")] = (kv_shape, kv_dtype)
        files[layer_file(layer, "values")] = (kv_shape, kv_dtype)
        files[layer_file(layer, "queries")] = (q_shape, kv_dtype)
        if speculative_steps and layer >= 1:
            files[layer_file(layer, SPEC_KIND)] = (spec_shape, kv_dtype)
    return files


def speculative_names(files: dict[str, Any]) -> list[str]:
    """The speculative-query file names among ``files`` (names or a name-keyed dict)."""
    return [name for name in files if name.endswith(f".{SPEC_KIND}.npy")]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# a float is NaN or infinite exactly when its exponent bits are all ones: (bits view, mask)
_EXPONENT_BITS = {"float16": ("<u2", 0x7C00), "float32": ("<u4", 0x7F800000)}


def _scan_file(path: Path, float_data: str | None) -> tuple[str, int]:
    """(hex sha256 of the file, number of non-finite values in its data), in one read of 1 MiB
    chunks (constant memory). ``float_data``: the dtype of an ``.npy`` of floats (a layer
    file, ``float16`` or ``float32``), whose data follow the header; ``None``: the count is
    0."""
    digest = hashlib.sha256()
    nonfinite = 0
    with open(path, "rb") as f:
        if float_data is not None:
            view, exponent = _EXPONENT_BITS[float_data]
            width = np.dtype(view).itemsize
            _shape, _dtype, _fortran, offset = _read_npy_header(path)
            digest.update(f.read(offset))
        for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
            if float_data is not None:
                # the header is padded to a multiple of 64 bytes and chunks are 1 MiB, so every
                # chunk holds whole values; a trailing partial value (an invalid file) is ignored
                bits = np.frombuffer(chunk, dtype=view, count=len(chunk) // width)
                nonfinite += int(np.count_nonzero((bits & exponent) == exponent))
    return digest.hexdigest(), nonfinite


def is_int(value: Any) -> bool:
    """A Python int that is not a bool (JSON integers and sizes)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset in bytes) from an .npy header; reads ~128 bytes.

    Raises ValueError/OSError on a malformed header; the caller turns them into TraceError.
    """
    with open(path, "rb") as f, _NPY_HEADER_LOCK:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:  # pragma: no cover - read_magic accepts only known versions today
            raise ValueError(f"unsupported .npy version {version}")
        return tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran), f.tell()


class Trace:
    """A validated trace directory. Arrays are read lazily (memory-mapped, read-only).

    Attributes: ``path``, ``manifest`` (the parsed manifest.json), ``model`` (the
    :class:`ModelGeometry` of the traced model), ``prompt_len``, ``decode_steps``,
    ``n_positions`` (= prompt_len + decode_steps), ``query_start`` (the first position whose
    query is stored), ``size_bytes`` (all files on disk, manifest included),
    ``has_speculative_queries`` (the optional InfiniGen speculative queries are stored).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], model: ModelGeometry) -> None:
        self.path = path
        self.manifest = manifest
        self.model = model
        self.prompt_len: int = manifest["prompt_len"]
        self.decode_steps: int = manifest["decode_steps"]
        self.n_positions: int = manifest["n_positions"]
        self.query_start: int = manifest["query_start"]
        self.has_speculative_queries = bool(speculative_names(manifest["files"]))
        self.size_bytes: int = (path / MANIFEST_NAME).stat().st_size + sum(
            int(entry["bytes"]) for entry in manifest["files"].values()
        )

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, model={self.model.name!r}, prompt_len={self.prompt_len}, "
            f"decode_steps={self.decode_steps}, query_start={self.query_start})"
        )

    def _error(self, message: str) -> TraceError:
        return TraceError(f"trace {self.path}: {message}")

    def _load(self, name: str) -> np.ndarray:
        try:
            # one header parse at a time: numpy parses .npy headers with ast.literal_eval,
            # which CPython 3.11 up to 3.11.7 can fail from several threads at once
            # ("SystemError: AST constructor recursion depth mismatch", cpython gh-106905);
            # the policy pass reads layers from a thread pool. mmap: only the header is read.
            with _NPY_HEADER_LOCK:
                return np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise self._error(f"{name} cannot be read ({_one_line(exc)})") from None

    def _check_layer(self, layer: int) -> None:
        if not is_int(layer) and not isinstance(layer, np.integer):
            raise self._error(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.model.n_layers:
            raise self._error(f"layer {layer} out of range (the trace has {self.model.n_layers})")

    def keys(self, layer: int) -> np.ndarray:
        """Post-RoPE keys of one layer: (n_kv_heads, n_positions, head_dim) float16 memmap."""
        self._check_layer(layer)
        return self._load(layer_file(layer, "keys"))

    def values(self, layer: int) -> np.ndarray:
        """Values of one layer: (n_kv_heads, n_positions, head_dim) float16 memmap."""
        self._check_layer(layer)
        return self._load(layer_file(layer, "values"))

    def queries(self, layer: int) -> np.ndarray:
        """Post-RoPE queries: (n_q_heads, n_positions - query_start, head_dim) float16 memmap.

        Index ``j`` along axis 1 is position ``query_start + j``.
        """
        self._check_layer(layer)
        return self._load(layer_file(layer, "queries"))

    def decode_queries(self, layer: int) -> np.ndarray:
        """Queries of the decode steps only: (n_q_heads, decode_steps, head_dim), a memmap view."""
        return self.queries(layer)[:, self.prompt_len - self.query_start :, :]

    def speculative_queries(self, layer: int) -> np.ndarray | None:
        """Layer ``layer``'s decode-step queries speculated from layer ``layer - 1``'s input:
        (n_q_heads, decode_steps, head_dim) float16 memmap, aligned with :meth:`decode_queries`.

        ``None`` for layer 0 (nothing precedes it) and for traces captured without them
        (:attr:`has_speculative_queries` is False; recapture to get them).
        """
        self._check_layer(layer)
        if layer == 0 or not self.has_speculative_queries:
            return None
        return self._load(layer_file(layer, SPEC_KIND))

    def tokens(self) -> np.ndarray:
        """Token ids of every position: (n_positions,) int32 memmap."""
        return self._load(TOKENS_NAME)

    def iter_files(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(file name, manifest entry) of every data file, in manifest order."""
        yield from self.manifest["files"].items()

    def verify(self) -> None:
        """Check every file's sha256 against the manifest and every key, value and query for
        NaN and infinity, in one read of the whole trace.

        Raises TraceError naming the first file whose checksum differs or that holds a
        non-finite value. :mod:`sim.trace.verified` remembers a passed verification, so a run
        verifies each trace once rather than on every use.
        """
        for name, entry in self.iter_files():
            try:
                actual, nonfinite = _scan_file(
                    self.path / name, None if name == TOKENS_NAME else self.manifest["dtype"]
                )
            except _HEADER_ERRORS as exc:
                raise self._error(f"{name} cannot be read ({_one_line(exc)})") from None
            if actual != entry.get("sha256"):
                raise self._error(
                    f"{name} checksum mismatch (manifest {str(entry.get('sha256'))[:12]}..., "
                    f"file {actual[:12]}...); the file is corrupt or was modified"
                )
            if nonfinite:
                raise self._error(
                    f"{name} holds {nonfinite} non-finite value(s) (NaN or infinity); keys, "
                    "values and queries must be finite"
                )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_trace(path: str | Path, verify: bool = False) -> Trace:
    """Open and validate a trace directory; cheap (manifest + .npy headers only).

    Checks: manifest present, parseable, complete and self-consistent; every expected file (by
    the model geometry) and every listed file exists; each header's dtype and shape match; each
    file's size equals header + data (catches truncation). ``verify=True`` also checks the
    sha256 of every file (a full read). Raises :class:`TraceError` (one line) on any problem.
    """
    path = Path(path)
    where = f"trace {path}"
    if not path.is_dir():
        raise TraceError(f"{where}: not a directory (no trace there)")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise TraceError(f"{where}: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{where}: {MANIFEST_NAME} is not valid JSON ({_one_line(exc)})") from None
    model = validate_manifest(manifest, where)
    _validate_files(path, manifest, model, where)
    trace = Trace(path, manifest, model)
    if verify:
        trace.verify()
    return trace


def validate_manifest(manifest: Any, where: str) -> ModelGeometry:
    """Check the manifest's keys, types and arithmetic; return the model geometry.

    ``where`` prefixes every one-line TraceError. Shared by :func:`open_trace` and
    :class:`sim.trace.writer.TraceWriter`, so a written trace is one the reader accepts.
    """
    bad = f"{where}: {MANIFEST_NAME}"
    if not isinstance(manifest, dict):
        raise TraceError(f"{bad} must hold a JSON object")
    missing = [key for key in _REQUIRED_TOP_KEYS if key not in manifest]
    if missing:
        raise TraceError(f"{bad} lacks key(s) {', '.join(missing)}")
    if manifest["format_version"] not in READABLE_FORMAT_VERSIONS:
        raise TraceError(
            f"{bad} has format_version {manifest['format_version']!r}; this kvsim reads "
            f"version(s) {', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
        )
    if manifest["dtype"] not in STORED_DTYPES:
        raise TraceError(
            f"{bad} has dtype {manifest['dtype']!r}; supported: "
            f"{', '.join(map(repr, STORED_DTYPES))}"
        )
    for key in ("prompt_len", "decode_steps", "n_positions", "query_start"):
        if not is_int(manifest[key]) or manifest[key] < 0:
            raise TraceError(f"{bad}: {key} must be an integer >= 0, got {manifest[key]!r}")
    prompt_len, decode_steps = manifest["prompt_len"], manifest["decode_steps"]
    if prompt_len < 1:
        raise TraceError(f"{bad}: prompt_len must be >= 1, got {prompt_len}")
    if manifest["n_positions"] != prompt_len + decode_steps:
        raise TraceError(
            f"{bad}: n_positions ({manifest['n_positions']}) != prompt_len ({prompt_len}) + "
            f"decode_steps ({decode_steps})"
        )
    if manifest["query_start"] > prompt_len:
        raise TraceError(
            f"{bad}: query_start ({manifest['query_start']}) > prompt_len ({prompt_len}); the "
            "decode queries would be missing"
        )
    model = manifest["model"]
    if not isinstance(model, dict):
        raise TraceError(f"{bad}: model must be an object")
    missing = [key for key in _REQUIRED_MODEL_KEYS if key not in model]
    if missing:
        raise TraceError(f"{bad}: model lacks key(s) {', '.join(missing)}")
    for key in (*_REQUIRED_MODEL_KEYS[1:], "params_per_layer", "hidden_size", "vocab_size"):
        if key in model and not is_int(model[key]):
            raise TraceError(f"{bad}: model.{key} must be an integer, got {model[key]!r}")
    try:
        geometry = ModelGeometry(
            name=str(model["name"]),
            n_layers=model["n_layers"],
            n_q_heads=model["n_q_heads"],
            n_kv_heads=model["n_kv_heads"],
            head_dim=model["head_dim"],
            params_per_layer=model.get("params_per_layer", 0) or 0,
            hidden_size=model.get("hidden_size", 0) or 0,
            vocab_size=model.get("vocab_size", 0) or 0,
        )
    except ValueError as exc:
        raise TraceError(f"{bad}: impossible model geometry ({_one_line(exc)})") from None
    if not isinstance(manifest["files"], dict):
        raise TraceError(f"{bad}: files must be an object")
    return geometry


def _validate_files(path: Path, manifest: dict[str, Any], model: ModelGeometry, where: str) -> None:
    """Check that the manifest lists exactly the expected files (the optional speculative
    queries: all or none) and each one's header and size."""
    listed: dict[str, Any] = manifest["files"]
    dtype = manifest["dtype"]
    required = expected_files(model, manifest["n_positions"], manifest["query_start"],
                              dtype=dtype)
    allowed = expected_files(
        model, manifest["n_positions"], manifest["query_start"], manifest["decode_steps"], dtype
    )
    speculative = speculative_names(allowed)
    present = [name for name in speculative if name in listed]
    if present and len(present) != len(speculative):
        missing = next(name for name in speculative if name not in listed)
        raise TraceError(
            f"{where}: {MANIFEST_NAME} lists {len(present)} of the {len(speculative)} "
            f"speculative-query files ({missing} is not listed); a trace holds all or none"
        )
    expected = allowed if present else required
    for name in required:
        if name not in listed:
            raise TraceError(
                f"{where}: {name} is not listed in {MANIFEST_NAME} (the manifest's files do not "
                f"match its model geometry: {model.n_layers} layers)"
            )
    for name in listed:
        if name not in allowed:
            raise TraceError(
                f"{where}: {name} is listed in {MANIFEST_NAME} but not expected for a model of "
                f"{model.n_layers} layers (layer count mismatch?)"
            )
    for name, (shape, dtype) in expected.items():
        entry = listed[name]
        if not isinstance(entry, dict) or not {"sha256", "bytes", "shape"} <= entry.keys():
            raise TraceError(
                f"{where}: {MANIFEST_NAME} entry for {name} needs sha256, bytes, shape"
            )
        if list(entry["shape"]) != list(shape):
            raise TraceError(
                f"{where}: {name} has shape {list(entry['shape'])} in {MANIFEST_NAME}, but the "
                f"model geometry and positions need {list(shape)}"
            )
        file_path = path / name
        if not file_path.is_file():
            raise TraceError(f"{where}: {name} is missing")
        try:
            header_shape, header_dtype, fortran, data_offset = _read_npy_header(file_path)
        except _HEADER_ERRORS as exc:
            raise TraceError(
                f"{where}: {name} has a corrupt .npy header ({_one_line(exc)})"
            ) from None
        if header_dtype != dtype:
            raise TraceError(f"{where}: {name} has dtype {header_dtype}, expected {dtype}")
        if header_shape != shape:
            raise TraceError(
                f"{where}: {name} has shape {list(header_shape)} in its header, expected "
                f"{list(shape)}"
            )
        if fortran:
            raise TraceError(f"{where}: {name} is Fortran-ordered; expected C order")
        expected_bytes = data_offset + math.prod(shape) * dtype.itemsize
        actual_bytes = file_path.stat().st_size
        if actual_bytes < expected_bytes:
            raise TraceError(
                f"{where}: {name} is truncated (expected {expected_bytes} bytes, found "
                f"{actual_bytes})"
            )
        if actual_bytes > expected_bytes:
            raise TraceError(
                f"{where}: {name} has trailing data (expected {expected_bytes} bytes, found "
                f"{actual_bytes})"
            )
        if entry["bytes"] != actual_bytes:
            raise TraceError(
                f"{where}: {name} has {actual_bytes} bytes but {MANIFEST_NAME} says "
                f"{entry['bytes']}"
            )
