"""Experiment configs: the YAML a user writes, validated into a typed tree.

Every problem (YAML syntax, unknown key, wrong type, impossible value, unknown policy, layout or
replacement name, missing trace, budget larger than the context) becomes a :class:`ConfigError`
whose single line names the file and the key. Nothing is run or written before the whole config
has been validated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from sim.errors import ConfigError
from sim.hardware.device import DEFAULT_PRESET
from sim.model import KV_DTYPE_BYTES, ModelGeometry
from sim.paths import CONFIGS_DIR
from sim.validation import STRICT_CONFIG
from sim.yaml_input import read_yaml

_STRICT = STRICT_CONFIG

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
#: the largest byte size a config may give (1 PiB): a thousand times any phone's DRAM, and
#: small enough that byte counts stay exact in float64 and far from int64 overflow
MAX_SIZE_BYTES = 2**50


def parse_size_bytes(value: str) -> int:
    """A size string -> bytes: ``"64MiB"``, ``"1.5 GB"``, ``"300000B"`` or ``"300000"``
    (units: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB; case-insensitive). At most
    :data:`MAX_SIZE_BYTES`; raises ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"expected a size string like 64MiB, got {value!r}")
    match = re.fullmatch(r"\s*([0-9]{1,20}(?:\.[0-9]{1,20})?|\.[0-9]{1,20})\s*([A-Za-z]*)\s*",
                         value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot read {value!r} as a size (use e.g. 64MiB, 1GB or 300000B)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size > MAX_SIZE_BYTES:
        raise ValueError(f"{value!r} is more than {MAX_SIZE_BYTES // 2**40} TiB")
    return size


class CaptureSpec(BaseModel):
    """Which real trace to use: captured on demand from these settings and cached (the fields
    of :class:`sim.trace.capture.CaptureSettings`, which also checks their combinations:
    temperature/top_p only with ``sampling: sample``, sampling only with ``mode: generate``,
    prompt_len + decode_steps within the model's context)."""

    model_config = _STRICT
    model: str = "smollm2-135m"
    text: str = "pydoc"
    prompt_len: int = Field(2048, ge=1)
    decode_steps: int = Field(128, ge=1)
    queries: Literal["all", "decode"] = "all"
    seed: int = Field(0, ge=0)
    mode: Literal["generate", "teacher_forced"] = "generate"
    sampling: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, ge=1, allow_inf_nan=False)
    prefill_chunk: int | None = Field(None, ge=1)


class TraceSpec(BaseModel):
    """Either ``path`` (an existing trace directory) or ``capture`` settings.

    ``decode_from``: replay the trace from this position on (a split point, see
    :func:`sim.trace.split.split_trace`): positions ``[0, decode_from)`` are the prompt,
    ``[decode_from, n_positions)`` the decode steps, teacher-forced with the stored queries.
    The trace must store those queries (``queries: all``, or a split at or after its
    ``query_start``) and ``1 <= decode_from < n_positions``; checked before anything runs.
    ``null`` (the default): the trace's own prompt length.
    """

    model_config = _STRICT
    path: str | None = None
    capture: CaptureSpec | None = None
    decode_from: int | None = None

    def model_post_init(self, _context: Any) -> None:
        if (self.path is None) == (self.capture is None):
            raise ValueError("give exactly one of 'path' or 'capture'")


def kv_size_bytes(value: float | str, n_positions: int, bytes_per_token: int) -> int:
    """A DRAM size as configured (validated by :class:`CacheSpec`): a size string (``"64MiB"``)
    in bytes, or a number in (0, 1] as a fraction of the full KV cache (``n_positions`` tokens
    of ``bytes_per_token``)."""
    if isinstance(value, str):
        return parse_size_bytes(value)
    return int(value * n_positions * bytes_per_token)


class CacheSpec(BaseModel):
    """DRAM cache for KV entries, sized one of two ways.

    ``capacity``: a number is a fraction in (0, 1] of the full KV cache of the simulated model at
    the trace's final length; bytes are a size string (``"64MiB"``, ``"300000B"``: see
    :func:`parse_size_bytes`), so a byte count cannot be mistaken for a fraction or the
    reverse (``1.5`` is an error, not 1.5 bytes); ``null`` takes the device preset's
    ``dram.kv_budget_bytes``. The capacity is split evenly across layers (one cache per layer;
    a layer attended wholly from DRAM has none, and its share goes unused).
    ``dram_total``: the same units, for the run's *total* DRAM (cache, index, buffers, window,
    dense layers; see :mod:`sim.footprint`): each run's capacity is resolved from its policy
    pass so that its total never exceeds this and equals it where the rest peaks, for equal-DRAM
    comparisons. Give at most one of the two.
    """

    model_config = _STRICT
    replacement: str | dict[str, Any] = "lru"
    capacity: float | str | None = None
    dram_total: float | str | None = None

    @field_validator("capacity", "dram_total", mode="before")
    @classmethod
    def _size_valid(cls, value: Any) -> float | str | None:
        if value is None:
            return value
        if isinstance(value, str):
            if parse_size_bytes(value) <= 0:
                raise ValueError("must be > 0 bytes")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a fraction in (0, 1] or a size string like 64MiB")
        if not math.isfinite(value) or not 0 < value <= 1:
            raise ValueError(
                f"a number is a fraction of the full KV cache, in (0, 1]; got {value} (write "
                'bytes as a size string, e.g. "64MiB" or "300000B")'
            )
        return float(value)

    def model_post_init(self, _context: Any) -> None:
        if self.capacity is not None and self.dram_total is not None:
            raise ValueError("give either capacity or dram_total, not both")


class PipelineSpec(BaseModel):
    """DynaKV's pipelined virtualisation (technique 3), as engine switches (all off = the plain
    sequence: QKV projection, scoring, reads, attention).

    ``stream_index``: the policy's index (cluster representatives) stays on flash and is read
    at the start of each layer, overlapping the Q projection; scoring waits for it. DRAM then
    holds one layer's index instead of every layer's.
    ``overlap_transfer``: KV reads start when scoring starts (clusters are fetched as they are
    ranked) and overlap the scoring and the K/V projection, which then runs after scoring.
    ``swap_layers``: per-layer cache swapping ("bounds resident cache memory to about one
    layer"; the paper gives no mechanism, so kvsim models this one). Each layer's cache keeps
    its capacity (``cache.capacity / n_layers``) but lives in a contiguous swap area on flash
    between its turns:

    * swap-in: the layer's image (its resident entries, ``resident * entry_bytes``) is read
      back in sequential commands of at most ``max_io_bytes``, issued when the previous layer
      starts (one layer ahead, overlapping that layer's compute; layer 0 of step ``s + 1`` when
      the last layer of step ``s`` starts; layer 0 of the first step, or every layer of a
      one-layer model, at the step's start). The layer's cache lookup waits for it (counted in
      ``io_wait_us``); in the flash FIFO it is ahead of the reads issued after it.
    * swap-out: after the layer's attention and append, the entries that became resident
      during the layer (misses loaded from flash, the appended token) are written to the swap
      area in sequential commands, issued and not awaited (like appends); entries still
      resident from before are clean and cost nothing, evicted ones are dropped.
    * the swap area is one extent per layer (appended, compacted: no fragmentation modelled).
    * full-attention layers hold their whole KV in DRAM and are not swapped.
    * DRAM for caches is then the largest (current image + incoming image) pair during a step,
      instead of the sum over layers; layouts' write buffers stay resident.

    Step columns ``swap_read_bytes`` / ``swap_write_bytes`` count the bytes those commands move
    (whole pages, like ``read_bytes``).
    """

    model_config = _STRICT
    stream_index: bool = False
    overlap_transfer: bool = False
    swap_layers: bool = False


class RecordSpec(BaseModel):
    """Extra per-run records some figures need (all off by default; device-independent).

    ``cluster_layer`` / ``cluster_kv_head``: for policies with groups, save that head's cluster
    labels at each of ``cluster_steps`` (decode steps; -1 = right after prefill) as
    ``cluster_labels.parquet`` with its keys' 2-D PCA as ``cluster_keys.parquet`` (Fig. 4), and
    its co-retrieval matrix, if the policy measured one, as ``coretrieval.npy`` (Fig. 7);
    ``cluster_record.json`` holds the trace and policy facts needed to read them.
    ``update_horizon``: if > 0, ``update_retrieval.csv`` holds, over every layer and head, the
    probability that a just-updated cluster is retrieved within t = 1..horizon steps (Table 2).
    """

    model_config = _STRICT
    cluster_layer: int | None = Field(default=None, ge=0)
    cluster_kv_head: int = Field(default=0, ge=0)
    cluster_steps: list[int] = Field(default_factory=list)
    update_horizon: int = Field(default=0, ge=0, le=64)

    @field_validator("cluster_steps")
    @classmethod
    def _steps_valid(cls, value: list[int]) -> list[int]:
        if any(step < -1 for step in value):
            raise ValueError("steps must be >= -1 (-1: right after prefill)")
        return value


class RecordIoSpec(BaseModel):
    """``record_io:``: record the run's flash schedule (every command the SimPy replay submits
    to the flash, with its byte address, and each batch's simulated issue and completion time)
    on sampled decode steps, for ``kvsim replay`` to execute on real storage
    (:mod:`sim.replay.io_record` writes it, :mod:`sim.io_replay` replays it).

    ``every``: record decode steps ``0, every, 2 * every, ...``; ``steps``: at most this many
    of them (the first; ``null``: all). Recording changes no simulated number.
    """

    model_config = _STRICT
    every: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1)


class ClosedLoopSpec(BaseModel):
    """``closed_loop:``: run each policy inside a real model (:mod:`sim.closed_loop`) instead of
    replaying a trace. Every global attention layer attends only the policy's selection plus
    the current token (sliding-window layers keep their window); full attention is run on the
    same input as the reference.

    ``task``: ``perplexity`` (teacher-forced: the text's first ``prompt_len`` tokens are the
    prompt, the next ``tokens`` are fed one per step and scored; mean NLL per ``bucket``
    positions), ``agreement`` (greedy decoding of ``tokens`` after the prompt: tokens before
    the first divergence from full attention, share of matching positions), ``generation``
    (agreement over a long greedy decode, per ``bucket`` positions, with the policy's attention
    recall in the loop on decode steps ``0, k, 2k, ...`` for ``k`` = ``recall_every`` and the
    full-attention model's NLL of both generated texts; :mod:`sim.closed_loop.generation`) or
    ``needle`` (:mod:`sim.closed_loop.needle`: one fact per entry of ``depths`` hidden at that
    depth of a ``context_len``-token context cut from the text, one question at a time, exact
    match of the greedy answer; ``prompt_len`` and ``tokens`` do not apply).
    ``model``: a model kvsim loads (:data:`sim.trace.models.MODELS`); ``text``: a kvsim text
    source (:mod:`sim.trace.sources`). ``prompt_len + tokens`` (needle: the context, a question
    and its answer) must fit the model's context and, for ``perplexity``, the tokenised text.
    ``save_trace``: each run also writes the trace of its own decode (kvsim's trace format,
    float32: every layer's queries, keys and values under the policy, the tokens fed) and its
    per-step selections: ``true`` into its run directory (``trace/``, ``selections.parquet``),
    or a directory path: the trace to ``<path>/<run_id>/`` (the selections stay in the run
    directory). ``kvsim run`` replays such a trace like any other (``trace: {path: ...}``).
    """

    model_config = _STRICT
    task: Literal["perplexity", "agreement", "generation", "needle"]
    model: str = "smollm2-135m"
    text: str = "pydoc"
    prompt_len: int = Field(512, ge=2)
    tokens: int = Field(256, ge=1)
    #: positions per bucket (``perplexity`` and ``generation`` only; default 64)
    bucket: int | None = Field(None, ge=1)
    #: score the selection in the loop on every k-th decode step (``generation`` only;
    #: default 8, as the long-decoding experiments' ``accuracy_every``)
    recall_every: int | None = Field(None, ge=1)
    #: write each run's own trace and selections: ``true`` (its run directory) or a directory
    save_trace: bool | str = False
    #: tokens of the context the facts are hidden in (``needle`` only; default 2048)
    context_len: int | None = Field(None, ge=2)
    #: where each fact starts, as a fraction of the context, one fact each, distinct
    #: (``needle`` only; default 0.1, 0.3, 0.5, 0.7, 0.9)
    depths: list[float] | None = Field(None, min_length=1)

    @field_validator("depths")
    @classmethod
    def _depths_valid(cls, value: list[float] | None) -> list[float] | None:
        for depth in value or ():
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"a needle depth must be in [0, 1], got {depth}")
        if value is not None and len(set(value)) < len(value):
            raise ValueError(f"needle depths must be distinct, got {value}")
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.bucket is not None and self.task not in ("perplexity", "generation"):
            raise ValueError("bucket applies only to tasks perplexity and generation")
        if self.recall_every is not None and self.task != "generation":
            raise ValueError("recall_every applies only to task generation")
        given = self.model_fields_set
        if self.task == "needle":
            for key in ("prompt_len", "tokens"):
                if key in given:
                    raise ValueError(f"{key} applies to tasks perplexity, agreement and "
                                     "generation (the needle task's context is context_len)")
        else:
            for key in ("context_len", "depths"):
                if key in given:
                    raise ValueError(f"{key} applies only to task needle")


class SweepSpec(BaseModel):
    """Axes over config keys by dotted path (see :mod:`sim.sweep`): ``grid`` axes combine as a
    product, ``zip`` axes (equal lengths) advance together."""

    model_config = _STRICT
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)


class ExperimentConfig(BaseModel):
    """One experiment: a trace, a device, a simulated model geometry, the policies to compare,
    and optionally a ``sweep`` over any of these keys (:mod:`sim.sweep`) and the ``figures`` that
    ``kvsim plot`` draws from the results (:mod:`sim.figures`)."""

    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = Field(0, ge=0)
    #: the trace the policies are replayed on; an experiment gives this or ``closed_loop``
    trace: TraceSpec | None = None
    #: run each policy inside the real model instead (:class:`ClosedLoopSpec`)
    closed_loop: ClosedLoopSpec | None = None
    #: accuracy (exact attention, the costly part of long decodes) on decode steps 0, k, 2k, ...
    #: only; selections and the replay still cover every step. See sim.metrics.accuracy.
    accuracy_every: int = Field(1, ge=1)
    device: str | dict[str, Any] = DEFAULT_PRESET
    model: str | None = None
    kv_dtype: Literal[tuple(KV_DTYPE_BYTES)] = "fp16"  # type: ignore[valid-type]
    cache: CacheSpec = CacheSpec()
    pipeline: PipelineSpec = PipelineSpec()
    #: at most 256 entries (each is one run per sweep point; see sim.sweep.MAX_POINTS)
    policies: list[dict[str, Any]] = Field(min_length=1, max_length=256)
    record: RecordSpec = RecordSpec()
    #: the run's flash schedule on sampled decode steps, for ``kvsim replay`` (off: null)
    record_io: RecordIoSpec | None = None
    sweep: SweepSpec | None = None
    output: str | None = None
    plot: bool = True
    figures: list[str | dict[str, Any]] = Field(default_factory=list)

    def layout_problem(self) -> str | None:
        """Why the experiment's top-level blocks do not fit together (one line naming the key),
        or ``None``: exactly one of ``trace`` and ``closed_loop``; the trace replay's own
        settings not beside ``closed_loop``."""
        if self.trace is None and self.closed_loop is None:
            return "trace: missing (give a trace: to replay, or a closed_loop: block)"
        if self.trace is not None and self.closed_loop is not None:
            return "closed_loop: give either trace: or closed_loop:, not both"
        if self.closed_loop is not None:
            for key in ("record_io", "model", "cache", "pipeline", "record",
                        "accuracy_every", "device"):
                if key in self.model_fields_set:
                    hint = " (the model is closed_loop.model)" if key == "model" else ""
                    return f"{key}: applies to trace replays, not to closed_loop{hint}"
        return None


MODELS_DIR = CONFIGS_DIR / "models"


def model_names() -> list[str]:
    """Names of the simulated model geometries (``model:`` of an experiment)."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def load_model_geometry(name_or_path: str, where: str = "model") -> ModelGeometry:
    """A simulated model geometry from ``configs/models/<name>.yaml`` or a YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODELS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = model_names()
        raise ConfigError(f"{where}: unknown model {name_or_path!r}; valid: {', '.join(known)}")
    data = read_yaml(path)
    try:
        return ModelGeometry(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
