"""On-disk trace format: one directory per trace, lazily memory-mapped, validated on open.

Layout of a trace directory (format_version 2; version 1 traces, without the optional
speculative queries, still open)::

    manifest.json                 what the trace is (model, positions, text, capture, checksums)
    tokens.npy                    int32   (n_positions,)
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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from sim.errors import TraceError
from sim.model import ModelGeometry

FORMAT_VERSION = 2
#: versions :func:`open_trace` accepts (1: no speculative queries).
READABLE_FORMAT_VERSIONS = (1, 2)
STORED_DTYPE = "float16"
MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.npy"
_KV_DTYPE = np.dtype("<f2")
_TOKEN_DTYPE = np.dtype("<i4")
_HASH_CHUNK_BYTES = 1 << 20

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
    geometry: ModelGeometry, n_positions: int, query_start: int, speculative_steps: int = 0
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every file a trace of this shape must hold: name -> (shape, dtype), canonical order.

    ``speculative_steps > 0`` adds the optional speculative-query files of layers ``1 ..``
    (shape ``(n_q_heads, speculative_steps, head_dim)``, after each layer's queries).
    """
    kv_shape = (geometry.n_kv_heads, n_positions, geometry.head_dim)
    q_shape = (geometry.n_q_heads, n_positions - query_start, geometry.head_dim)
    spec_shape = (geometry.n_q_heads, speculative_steps, geometry.head_dim)
    files: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        TOKENS_NAME: ((n_positions,), _TOKEN_DTYPE)
    }
    for layer in range(geometry.n_layers):
        files[layer_file(layer, "keys")] = (kv_shape, _KV_DTYPE)
        files[layer_file(layer, "values")] = (kv_shape, _KV_DTYPE)
        files[layer_file(layer, "queries")] = (q_shape, _KV_DTYPE)
        if speculative_steps and layer >= 1:
            files[layer_file(layer, SPEC_KIND)] = (spec_shape, _KV_DTYPE)
    return files


def _speculative_names(files: dict[str, Any]) -> list[str]:
    return [name for name in files if name.endswith(f".{SPEC_KIND}.npy")]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset in bytes) from an .npy header; reads ~128 bytes.

    Raises ValueError/OSError on a malformed header; the caller turns them into TraceError.
    """
    with open(path, "rb") as f:
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
        self.has_speculative_queries = bool(_speculative_names(manifest["files"]))
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
            return np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise self._error(f"{name} cannot be read ({_one_line(exc)})") from None

    def _check_layer(self, layer: int) -> None:
        if not _is_int(layer) and not isinstance(layer, np.integer):
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
        """Check every file's sha256 against the manifest (reads the whole trace once).

        Raises TraceError naming the first file whose checksum differs.
        """
        for name, entry in self.iter_files():
            try:
                actual = sha256_file(self.path / name)
            except OSError as exc:
                raise self._error(f"{name} cannot be read ({_one_line(exc)})") from None
            if actual != entry.get("sha256"):
                raise self._error(
                    f"{name} checksum mismatch (manifest {str(entry.get('sha256'))[:12]}..., "
                    f"file {actual[:12]}...); the file is corrupt or was modified"
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
    model = _validate_manifest(manifest, where)
    _validate_files(path, manifest, model, where)
    trace = Trace(path, manifest, model)
    if verify:
        trace.verify()
    return trace


def _validate_manifest(manifest: Any, where: str) -> ModelGeometry:
    """Check the manifest's keys, types and arithmetic; return the model geometry."""
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
    if manifest["dtype"] != STORED_DTYPE:
        raise TraceError(
            f"{bad} has dtype {manifest['dtype']!r}; only {STORED_DTYPE!r} is supported"
        )
    for key in ("prompt_len", "decode_steps", "n_positions", "query_start"):
        if not _is_int(manifest[key]) or manifest[key] < 0:
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
        if key in model and not _is_int(model[key]):
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
    required = expected_files(model, manifest["n_positions"], manifest["query_start"])
    allowed = expected_files(
        model, manifest["n_positions"], manifest["query_start"], manifest["decode_steps"]
    )
    speculative = _speculative_names(allowed)
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
        except (OSError, ValueError, SyntaxError) as exc:
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


class ArrayStream:
    """One ``.npy`` file of a :class:`TraceWriter`, filled block by block along axis 1 (the
    positions) instead of from one array in RAM.

    The file is created at its full size once (header + a sparse data area) and each
    :meth:`write` stores one block of positions straight into it with ``os.pwrite``, one
    contiguous run per row (head): the data is ``(rows, n_positions, cols)`` in C order, so
    position ``p`` of row ``h`` is at byte ``data_offset + ((h * n_positions) + p) * cols *
    itemsize``. Nothing but the file descriptor and a one-byte-per-position "written" mask is
    kept, so memory does not grow with the trace. Every position must be written exactly once
    before the writer finishes (checked); values are converted to the file's dtype and checked
    finite block by block, as :meth:`TraceWriter.write_layer` checks whole arrays.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
        if len(shape) != 3:
            raise ValueError(f"ArrayStream needs a 3-D shape, got {shape}")
        self.path, self.shape, self.dtype, self._where = path, shape, dtype, where
        self._written = np.zeros(shape[1], dtype=bool)
        with open(path, "wb") as f:
            npy_format.write_array_header_1_0(
                f, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": shape}
            )  # fmt: skip
            self.data_offset = f.tell()
            f.truncate(self.data_offset + math.prod(shape) * dtype.itemsize)
        self._fd: int | None = os.open(path, os.O_WRONLY)

    @property
    def complete(self) -> bool:
        """Every position has been written."""
        return bool(self._written.all())

    def write(self, start: int, block: np.ndarray) -> None:
        """Store ``block`` (rows, n, cols) as positions ``[start, start + n)``."""
        if self._fd is None:
            raise TraceError(f"{self._where}: {self.path.name} is already closed")
        rows, n_positions, cols = self.shape
        block = np.asarray(block)
        if block.ndim != 3 or block.shape[0] != rows or block.shape[2] != cols:
            raise TraceError(
                f"{self._where}: {self.path.name} block has shape {list(block.shape)}, expected "
                f"[{rows}, n, {cols}]"
            )
        n = block.shape[1]
        if not (0 <= start and start + n <= n_positions):
            raise TraceError(
                f"{self._where}: {self.path.name} block [{start}, {start + n}) is outside "
                f"[0, {n_positions})"
            )
        if self._written[start : start + n].any():
            raise TraceError(
                f"{self._where}: {self.path.name} positions [{start}, {start + n}) overlap "
                "positions already written"
            )
        with np.errstate(over="ignore"):
            stored = np.ascontiguousarray(block, dtype=self.dtype)
        if not np.isfinite(stored).all():
            raise TraceError(
                f"{self._where}: {self.path.name} has non-finite values after conversion to "
                f"{STORED_DTYPE} (overflow beyond 65504?)"
            )
        row_bytes = n_positions * cols * self.dtype.itemsize
        first = self.data_offset + start * cols * self.dtype.itemsize
        for row in range(rows):
            data = stored[row].tobytes()
            offset = first + row * row_bytes
            while data:  # pwrite may write less than asked
                done = os.pwrite(self._fd, data, offset)
                data, offset = data[done:], offset + done
        self._written[start : start + n] = True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TraceWriter:
    """Writes a trace atomically: into a hidden temp dir next to ``path``, renamed on success.

    Use as a context manager::

        with TraceWriter(path, model, prompt_len, decode_steps, query_start, text, capture) as w:
            w.write_tokens(tokens)
            for layer in range(n_layers):
                w.write_layer(layer, keys, values, queries)  # + speculative_queries (l >= 1)

    Long captures stream instead: ``w.stream(layer, kind)`` returns an :class:`ArrayStream`
    that takes the positions block by block (``stream.write(start, block)``), so no layer is
    ever held whole in RAM; the checksums are computed from the files at the end.

    On a clean exit every layer and the tokens must have been written (the optional speculative
    queries for every layer >= 1 or for none); the manifest (with
    sha256, bytes and shape of every file) is written last and the directory renamed to
    ``path``. On any exception the temp dir is removed and nothing appears at ``path``.
    ``model`` holds at least name, n_layers, n_q_heads, n_kv_heads, head_dim (and should hold
    params_per_layer, source, rope_theta, sliding_window); ``text`` and ``capture`` are stored
    as given (``capture["created"]`` is filled in if absent). An existing ``path`` is an error
    unless ``overwrite=True`` (then it is replaced only once the new trace is complete).
    """

    def __init__(
        self,
        path: str | Path,
        model: dict[str, Any],
        prompt_len: int,
        decode_steps: int,
        query_start: int,
        text: dict[str, Any],
        capture: dict[str, Any],
        *,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self._where = f"trace {self.path}"
        self.model = dict(model)
        self.manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "prompt_len": prompt_len,
            "decode_steps": decode_steps,
            "n_positions": prompt_len + decode_steps
            if _is_int(prompt_len) and _is_int(decode_steps)
            else None,
            "query_start": query_start,
            "dtype": STORED_DTYPE,
            "text": dict(text),
            "capture": dict(capture),
            "files": {},
        }
        # validate up front with the same rules open_trace applies, so a writer can never
        # produce a trace the reader rejects
        self.geometry = _validate_manifest(self.manifest, self._where)
        self.n_positions: int = self.manifest["n_positions"]
        self.query_start = query_start
        self._expected = expected_files(self.geometry, self.n_positions, query_start)
        self._allowed = expected_files(
            self.geometry, self.n_positions, query_start, self.manifest["decode_steps"]
        )
        self._overwrite = overwrite
        self._tmp: Path | None = None
        self._streams: dict[str, ArrayStream] = {}

    def __enter__(self) -> TraceWriter:
        if self.path.exists() and not self._overwrite:
            raise TraceError(f"{self._where}: already exists (pass overwrite=True to replace it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f".{self.path.name}.partial-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tmp = self._tmp
        self._tmp = None
        if tmp is None:
            return
        try:
            for stream in self._streams.values():
                stream.close()
            if exc_type is None:
                self._finish_streams()
                self._finish(tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _finish(self, tmp: Path) -> None:
        missing = [name for name in self._expected if name not in self.manifest["files"]]
        if missing:
            raise TraceError(
                f"{self._where}: {missing[0]} was never written ({len(missing)} file(s) missing); "
                "nothing was saved"
            )
        written = self.manifest["files"]
        speculative = _speculative_names(self._allowed)
        done = [name for name in speculative if name in written]
        if done and len(done) != len(speculative):
            absent = next(name for name in speculative if name not in written)
            raise TraceError(
                f"{self._where}: {absent} was never written (speculative queries are stored for "
                "every layer >= 1 or for none); nothing was saved"
            )
        # keep the files dict in canonical order (tokens, then layer by layer)
        self.manifest["files"] = {
            name: written[name] for name in self._allowed if name in written
        }
        self.manifest["capture"].setdefault(
            "created", datetime.now(timezone.utc).isoformat(timespec="seconds")
        )
        (tmp / MANIFEST_NAME).write_text(
            json.dumps(self.manifest, indent=2) + "\n", encoding="utf-8"
        )
        old: Path | None = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
        try:
            os.rename(tmp, self.path)
        except OSError as exc:
            # another writer finished the same path first (a concurrent capture)
            raise TraceError(
                f"{self._where}: cannot move the new trace in place ({exc.strerror})"
            ) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def stream(self, layer: int, kind: str) -> ArrayStream:
        """An :class:`ArrayStream` for one layer file (``kind``: ``keys``, ``values``,
        ``queries`` or ``spec_queries``), to be filled block by block along the positions axis
        (for queries, index ``j`` is position ``query_start + j``; for speculative queries, ``s``
        is decode step ``s``). Each file is either streamed or written whole, once."""
        if self._tmp is None:
            raise RuntimeError("TraceWriter must be used as a context manager (with ...:)")
        self._check_layer(layer)
        name = layer_file(layer, kind)
        if name not in self._allowed:
            raise TraceError(f"{self._where}: no file {name} in a trace of this shape")
        if name in self._streams or name in self.manifest["files"]:
            raise TraceError(f"{self._where}: {name} is already being written")
        shape, dtype = self._allowed[name]
        self._streams[name] = ArrayStream(self._tmp / name, shape, dtype, self._where)
        return self._streams[name]

    def _finish_streams(self) -> None:
        """Check every stream is complete; record its checksum like a file written whole."""
        for name, stream in self._streams.items():
            if not stream.complete:
                missing = int((~stream._written).sum())
                raise TraceError(
                    f"{self._where}: {name} has {missing} position(s) never written; nothing "
                    "was saved"
                )
            self.manifest["files"][name] = {
                "sha256": sha256_file(stream.path),
                "bytes": stream.path.stat().st_size,
                "shape": list(stream.shape),
            }

    def _check_layer(self, layer: int) -> None:
        if not (_is_int(layer) or isinstance(layer, np.integer)) or not (
            0 <= layer < self.geometry.n_layers
        ):
            raise TraceError(
                f"{self._where}: layer {layer!r} out of range [0, {self.geometry.n_layers})"
            )

    def _save(self, name: str, array: np.ndarray) -> None:
        if self._tmp is None:
            raise RuntimeError("TraceWriter must be used as a context manager (with ...:)")
        if name in self._streams:
            raise TraceError(f"{self._where}: {name} is being streamed; it cannot be saved whole")
        shape, dtype = self._allowed[name]
        if array.shape != shape:
            raise TraceError(
                f"{self._where}: {name} has shape {list(array.shape)}, expected {list(shape)}"
            )
        if dtype.kind == "f":
            with np.errstate(over="ignore"):
                stored = np.ascontiguousarray(array, dtype=dtype)
            if not np.isfinite(stored).all():
                raise TraceError(
                    f"{self._where}: {name} has non-finite values after conversion to "
                    f"{STORED_DTYPE} (overflow beyond 65504?)"
                )
        else:
            if not np.issubdtype(array.dtype, np.integer):
                raise TraceError(f"{self._where}: {name} must hold integers, got {array.dtype}")
            stored = np.ascontiguousarray(array, dtype=dtype)
        file_path = self._tmp / name
        np.save(file_path, stored, allow_pickle=False)
        self.manifest["files"][name] = {
            "sha256": sha256_file(file_path),
            "bytes": file_path.stat().st_size,
            "shape": list(shape),
        }

    def write_layer(
        self,
        layer: int,
        keys: np.ndarray,
        values: np.ndarray,
        queries: np.ndarray,
        speculative_queries: np.ndarray | None = None,
    ) -> None:
        """Store one layer (float32 or float16 in; float16 on disk).

        ``keys``/``values``: (n_kv_heads, n_positions, head_dim); ``queries``:
        (n_q_heads, n_positions - query_start, head_dim); ``speculative_queries`` (optional,
        layers >= 1 only): (n_q_heads, decode_steps, head_dim). Raises TraceError on a shape
        mismatch or a value that overflows float16.
        """
        self._check_layer(layer)
        self._save(layer_file(layer, "keys"), np.asarray(keys))
        self._save(layer_file(layer, "values"), np.asarray(values))
        self._save(layer_file(layer, "queries"), np.asarray(queries))
        if speculative_queries is not None:
            if layer == 0:
                raise TraceError(
                    f"{self._where}: layer 0 has no speculative queries (nothing precedes it)"
                )
            self._save(layer_file(layer, SPEC_KIND), np.asarray(speculative_queries))

    def write_tokens(self, tokens: np.ndarray) -> None:
        """Store the token ids of every position: (n_positions,) integers, int32 on disk."""
        self._save(TOKENS_NAME, np.asarray(tokens))


# --------------------------------------------------------------------------------------------
# Read side: a trace replayed from an earlier split point (``trace.decode_from``)
# --------------------------------------------------------------------------------------------


class SplitTrace(Trace):
    """A read-only view of a :class:`Trace` whose decode starts at position ``decode_from``.

    Positions ``[0, decode_from)`` are the prompt and ``[decode_from, n_positions)`` the decode
    steps, whose queries are the stored queries of those positions: teacher-forced decoding of
    the stored tokens, exactly what the trace's own model attended at those positions (the
    stored keys, values and queries are the model's, whatever the capture called prompt). So a
    trace captured with a long prompt and ``queries: all`` replays as a short prompt plus a
    long decode without recapture (DynaKV, arXiv 2511.07427, §5: 1K-16K generated tokens).

    Attributes as :class:`Trace`, with ``prompt_len = decode_from`` and ``decode_steps =
    n_positions - decode_from``; ``decode_from``; ``source_prompt_len``, the prompt length
    the trace was captured with. Nothing is copied: every array is the stored memmap (or a
    view of it). Speculative queries (InfiniGen) exist only for the captured decode steps, so
    :meth:`speculative_queries` returns them sliced to the new decode steps when ``decode_from
    >= source_prompt_len`` and ``None`` before that (:attr:`speculative_gap` then says why).
    """

    def __init__(self, trace: Trace, decode_from: int) -> None:
        super().__init__(trace.path, trace.manifest, trace.model)
        self.decode_from = decode_from
        self.source_prompt_len: int = trace.manifest["prompt_len"]
        self.prompt_len = decode_from
        self.decode_steps = trace.n_positions - decode_from
        self.speculative_gap: str | None = None
        if self.has_speculative_queries and decode_from < self.source_prompt_len:
            self.speculative_gap = (
                f"trace {self.path.name} stores speculative queries for its captured decode "
                f"steps only (positions >= {self.source_prompt_len}), not from decode_from "
                f"{decode_from}; split at {self.source_prompt_len} or later"
            )

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", decode_from={self.decode_from})"

    def speculative_queries(self, layer: int) -> np.ndarray | None:
        """As :meth:`Trace.speculative_queries`, aligned with this view's decode steps;
        ``None`` also when the split lies before the captured prompt's end."""
        spec = super().speculative_queries(layer)
        if spec is None or self.speculative_gap is not None:
            return None
        return spec[:, self.decode_from - self.source_prompt_len :, :]


def check_decode_from(
    decode_from: object, n_positions: int, query_start: int, where: str = "decode_from"
) -> str | None:
    """Why ``decode_from`` cannot split a trace of ``n_positions`` positions whose queries are
    stored from ``query_start`` on (``None``: it can). The conditions of :func:`split_trace`,
    shared with config validation, which checks them before anything runs."""
    if not (_is_int(decode_from) or isinstance(decode_from, np.integer)):
        return f"{where} must be an integer, got {decode_from!r}"
    split = int(decode_from)  # type: ignore[call-overload]  # an int or numpy integer, checked
    if not 1 <= split < n_positions:
        return (
            f"{where} {decode_from} is out of range: the trace has {n_positions} positions, so "
            f"1 <= {where} <= {n_positions - 1}"
        )
    if query_start > split:
        return (
            f"{where} {decode_from} needs the queries of positions >= {decode_from}, but the "
            f"trace stores them from position {query_start} on (capture with queries: all)"
        )
    return None


def split_trace(trace: Trace, decode_from: int) -> SplitTrace:
    """``trace`` replayed from position ``decode_from`` (see :class:`SplitTrace`).

    Raises :class:`TraceError` (one line) if ``decode_from`` is not an integer in
    ``[1, n_positions)`` or the trace lacks the queries of the positions it would decode
    (``query_start > decode_from``). A split of a split splits the underlying trace.
    """
    base = trace
    problem = check_decode_from(decode_from, base.n_positions, base.query_start)
    if problem is not None:
        raise TraceError(f"trace {base.path}: {problem}")
    if isinstance(base, SplitTrace):
        base = Trace(base.path, base.manifest, base.model)
    return SplitTrace(base, int(decode_from))
