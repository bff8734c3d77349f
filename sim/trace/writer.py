"""Writing a trace directory (the layout of :mod:`sim.trace.format`) atomically: whole arrays
(:meth:`TraceWriter.write_layer`) or streamed block by block (:class:`ArrayStream`), the
manifest with every file's sha256 written last, the directory renamed into place on success.

The writer validates its manifest with the reader's own rules
(:func:`sim.trace.format.validate_manifest`), so it cannot produce a trace
:func:`sim.trace.format.open_trace` rejects.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from sim.errors import TraceError
from sim.trace import verified
from sim.trace.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPEC_KIND,
    STORED_DTYPE,
    TOKENS_NAME,
    expected_files,
    is_int,
    layer_file,
    sha256_file,
    speculative_names,
    validate_manifest,
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
                f"{self.dtype} (overflow beyond {np.finfo(self.dtype).max:g}?)"
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
    ``dtype``: the layer files' (``float16``, captures; ``float32``, a closed loop's own trace).
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
        dtype: str = STORED_DTYPE,
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
            if is_int(prompt_len) and is_int(decode_steps)
            else None,
            "query_start": query_start,
            "dtype": dtype,
            "text": dict(text),
            "capture": dict(capture),
            "files": {},
        }
        # validate up front with the same rules open_trace applies, so a writer can never
        # produce a trace the reader rejects
        self.geometry = validate_manifest(self.manifest, self._where)
        self.n_positions: int = self.manifest["n_positions"]
        self.query_start = query_start
        self._expected = expected_files(self.geometry, self.n_positions, query_start,
                                        dtype=dtype)
        self._allowed = expected_files(
            self.geometry, self.n_positions, query_start, self.manifest["decode_steps"], dtype
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
        speculative = speculative_names(self._allowed)
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
        # every file was checksummed from disk and every value checked finite as it was
        # written: the trace is verified (sim.trace.verified), and a run need not read it again
        verified.record(tmp, verified.fingerprint(tmp, list(self.manifest["files"])))
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
        if not (is_int(layer) or isinstance(layer, np.integer)) or not (
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
                    f"{dtype} (overflow beyond {np.finfo(dtype).max:g}?)"
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
        """Store one layer (float32 or float16 in; the writer's dtype on disk).

        ``keys``/``values``: (n_kv_heads, n_positions, head_dim); ``queries``:
        (n_q_heads, n_positions - query_start, head_dim); ``speculative_queries`` (optional,
        layers >= 1 only): (n_q_heads, decode_steps, head_dim). Raises TraceError on a shape
        mismatch or a value that overflows the dtype.
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
