"""Capture attention traces from a real model on CPU: deterministic, atomic, cached.

:class:`CaptureSettings` is everything that determines a trace's arrays (and its cache key);
:func:`capture` writes one trace, :func:`get_or_capture` reuses a cached one when it is valid.

How: the model is loaded with transformers from a GGUF file shipped in a PyPI package
(:mod:`sim.trace.models`) with a recording attention function that records the post-RoPE
queries, the new key/value slice and the speculative queries of every layer and then calls the
stock sdpa attention, so the model computes exactly what it computes without us
(:mod:`sim.trace.recording`). The prompt (the first ``prompt_len`` tokens
of the tokenised text, no chat template, the tokenizer's own special-token behaviour) runs as
one prefill pass (or passes of ``prefill_chunk`` positions) with ``logits_to_keep=1``
(full-vocabulary logits for every position would take GBs), then ``decode_steps`` steps under
``torch.inference_mode()``, each token chosen greedily or by seeded sampling (``mode:
generate``, :mod:`sim.trace.decoding`); or every position is read from the text in chunked
prefill passes (``mode: teacher_forced``). Decoding never stops early (EOS is just another
token). The KV cache is allocated once (:func:`sim.trace.recording.make_cache`) and the records
stream to the trace files (:class:`sim.trace.recording.Recorder`,
:class:`sim.trace.writer.TraceWriter`), so neither per-step copies nor memory grow with the
trace.

Decode step ``s`` feeds the token at position ``prompt_len + s`` (the one chosen after the
previous step, or the text's), so the trace holds ``prompt_len + decode_steps`` positions.

torch and transformers are imported lazily: importing this module costs nothing, and a missing
``capture`` extra surfaces as one-line CaptureError.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.atomic import unwritable
from sim.errors import CaptureError, TraceError
from sim.paths import trace_cache_dir
from sim.progress import progress as progress_bar
from sim.trace.decoding import SAMPLINGS, NextToken, degeneration
from sim.trace.format import FORMAT_VERSION, SPEC_KIND, Trace, open_trace
from sim.trace.models import (
    MODELS,
    LoadedModel,
    ModelSpec,
    import_capture_deps,
    load_model,
    model_manifest,
)
from sim.trace.recording import Recorder, make_cache, recording
from sim.trace.sources import TextSource, load_text, source_name
from sim.trace.writer import TraceWriter

# Bump when a capture change alters the arrays produced for the same settings, so cached traces
# under the old key are not reused.
# 2: speculative queries (layer l's decode queries from layer l-1's attention input).
CAPTURE_VERSION = 2
# Tokens tokenised beyond prompt_len so the cut never falls near a token whose split could
# depend on text past the character prefix we tokenised.
_TOKENIZE_MARGIN = 64
_CHARS_PER_TOKEN_GUESS = 8


MODES = ("generate", "teacher_forced")
#: positions per forward pass of a chunked prefill (teacher-forced mode's default): bounds the
#: attention mask and scores of one pass to chunk x positions whatever the trace length.
DEFAULT_PREFILL_CHUNK = 512
# the settings added after capture_version 2, with the defaults that reproduce the earlier
# captures: left out of the cache key and the recorded settings at these values, so existing
# greedy traces keep their keys and are still found in the cache
_LATER_DEFAULTS: dict[str, Any] = {
    "mode": "generate",
    "sampling": "greedy",
    "temperature": 1.0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "prefill_chunk": None,
}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CaptureSettings:
    """Everything that determines a captured trace's arrays.

    ``queries``: ``"all"`` stores the query of every position (query_start = 0), ``"decode"``
    only those of the decode steps (query_start = prompt_len, ~40% of the size at long prompts).

    ``mode``: ``"generate"`` (prefill the prompt, then ``decode_steps`` tokens chosen by the
    model, one forward pass each) or ``"teacher_forced"`` (read ``prompt_len + decode_steps``
    tokens of the text in chunked prefill passes; the positions after the prompt are decode
    steps whose tokens come from the text and whose queries, keys and values are the model's
    own at those positions -- the cheap way to long traces, prefill being far faster than decode).

    ``sampling`` (generate mode): ``"greedy"`` (argmax, the default) or ``"sample"`` (draw from
    softmax(logits / ``temperature``) restricted to the ``top_p`` nucleus, with a
    ``torch.Generator`` seeded with ``seed``: same settings and seed, same tokens).
    ``repetition_penalty`` (>= 1, CTRL's penalty as in transformers) applies to greedy and sampled
    decoding over every token so far, prompt included. ``prefill_chunk``: positions per prefill
    pass; ``None`` = the whole prompt in one pass (generate) or 512 (teacher_forced).
    """

    model: str = "smollm2-135m"
    text: str = "pydoc"
    prompt_len: int = 2048
    decode_steps: int = 128
    queries: str = "all"
    seed: int = 0
    mode: str = "generate"
    sampling: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        # 1 and 1.0 are the same setting: one spelling, so one cache key
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    def as_dict(self) -> dict[str, Any]:
        """The settings as recorded in a manifest: every field, except the later ones (mode,
        sampling, ...) while they hold the defaults that reproduce earlier captures."""
        return {
            name: value
            for name, value in asdict(self).items()
            if not (name in _LATER_DEFAULTS and value == _LATER_DEFAULTS[name])
        }

    def key(self) -> str:
        """Stable directory name, e.g. ``smollm2-135m_pydoc_p2048_d128_1a2b3c4d``
        (``..._d8192_tf_...`` teacher-forced, ``..._d1024_sample_...`` sampled).

        The hash covers every setting (the later ones only when not at their defaults, so
        greedy keys are those of earlier versions) plus the format and capture versions.
        """
        payload = json.dumps(
            {**self.as_dict(), "format": FORMAT_VERSION, "capture": CAPTURE_VERSION},
            sort_keys=True,
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
        text = source_name(self.text)
        tags = "".join(
            f"_{tag}"
            for tag, on in (
                ("tf", self.mode == "teacher_forced"),
                ("sample", self.sampling == "sample"),
            )
            if on
        )
        return f"{self.model}_{text}_p{self.prompt_len}_d{self.decode_steps}{tags}_{digest}"

    @property
    def query_start(self) -> int:
        return 0 if self.queries == "all" else self.prompt_len

    @property
    def n_positions(self) -> int:
        return self.prompt_len + self.decode_steps

    def chunk_positions(self) -> int:
        """Positions per prefill pass actually used."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        return self.prompt_len if self.mode == "generate" else DEFAULT_PREFILL_CHUNK

    def validate(self) -> ModelSpec:
        """Check the settings without loading anything heavy; return the model spec.

        Raises CaptureError (one line naming the setting and its limit).
        """
        spec = MODELS.get(self.model) if isinstance(self.model, str) else None
        if spec is None:
            raise CaptureError(f"unknown model {self.model!r}; valid: {', '.join(MODELS)}")
        for name in ("prompt_len", "decode_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise CaptureError(f"{name} must be an integer, got {value!r}")
        if self.prompt_len < 1:
            raise CaptureError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.decode_steps < 1:
            raise CaptureError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if self.seed < 0:
            raise CaptureError(f"seed must be >= 0, got {self.seed}")
        n_positions = self.prompt_len + self.decode_steps
        if n_positions > spec.max_positions:
            raise CaptureError(
                f"prompt_len + decode_steps = {n_positions} exceeds {self.model}'s "
                f"{spec.max_positions} positions"
            )
        if self.queries not in ("all", "decode"):
            raise CaptureError(f"queries must be 'all' or 'decode', got {self.queries!r}")
        if self.mode not in MODES:
            raise CaptureError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.sampling not in SAMPLINGS:
            raise CaptureError(
                f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}"
            )
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not _is_real(getattr(self, name)):
                raise CaptureError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise CaptureError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CaptureError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty >= 1:
            raise CaptureError(f"repetition_penalty must be >= 1, got {self.repetition_penalty}")
        if self.sampling == "greedy":
            for name in ("temperature", "top_p"):
                if getattr(self, name) != 1.0:
                    raise CaptureError(
                        f"{name} = {getattr(self, name)} applies only with sampling: sample "
                        "(greedy decoding takes the argmax)"
                    )
        if self.mode == "teacher_forced":
            changed = [
                name
                for name in ("sampling", "repetition_penalty")
                if getattr(self, name) != _LATER_DEFAULTS[name]
            ]
            if changed:
                raise CaptureError(
                    f"{changed[0]} applies only to mode: generate (teacher_forced reads the "
                    "text's tokens)"
                )
        if self.prefill_chunk is not None and (
            not isinstance(self.prefill_chunk, int)
            or isinstance(self.prefill_chunk, bool)
            or self.prefill_chunk < 1
        ):
            raise CaptureError(f"prefill_chunk must be an integer >= 1, got {self.prefill_chunk!r}")
        source_name(self.text)  # unknown text names fail here, before the model loads
        return spec


def _tokenize_prefix(
    tokenizer: Any, text: TextSource, n_tokens: int, mode: str = "generate"
) -> tuple[list[int], bool]:
    """The first ``n_tokens`` ids of the tokenised text, tokenising only a character prefix.

    Returns (ids, bos_added). Raises CaptureError if the whole text is too short (never repeats).
    """
    n_chars = (n_tokens + _TOKENIZE_MARGIN) * _CHARS_PER_TOKEN_GUESS
    while True:
        chunk = text.text[:n_chars]
        ids = tokenizer(chunk, add_special_tokens=True)["input_ids"]
        if len(ids) >= n_tokens + _TOKENIZE_MARGIN or n_chars >= len(text.text):
            break
        n_chars *= 2
    if len(ids) < n_tokens:
        if mode == "teacher_forced":
            raise CaptureError(
                f"text {text.source!r} has only {len(ids)} tokens, mode teacher_forced needs "
                f"prompt_len + decode_steps = {n_tokens}; use fewer positions or a longer text"
            )
        raise CaptureError(
            f"text {text.source!r} has only {len(ids)} tokens, the prompt needs {n_tokens}; "
            "use a shorter --prompt-len or a longer text"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    return list(ids[:n_tokens]), bos is not None and ids[0] == bos


def _limit_heap_growth() -> None:
    """Make glibc serve allocations >= 1 MiB with mmap, so freed KV-cache tensors go back to the OS.

    DynamicCache grows every layer's key/value tensors by one position per decode step (a new,
    slightly larger allocation each time). Under glibc's default dynamic mmap threshold those
    land on the heap and fragment it: at 8K positions peak RSS climbed from 2.2 GB to 8 GB over
    256 steps. A fixed threshold keeps it at ~2 GB for the same (bit-identical) result. The
    setting is process-wide and stays; elsewhere (not glibc) this is a no-op.
    """
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def _versions() -> dict[str, str]:
    from sim import __version__

    out = {"python": platform.python_version(), "kvsim": __version__}
    for dist in ("numpy", "torch", "transformers", "gguf", "accelerate", "tokenizers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _tokens_needed(settings: CaptureSettings) -> int:
    return settings.n_positions if settings.mode == "teacher_forced" else settings.prompt_len


class _Rate:
    """Decode throughput and time left for the progress bar's postfix, over the last ~2 s."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.marks: list[tuple[float, int]] = []

    def postfix(self, done: int) -> str:
        now = time.perf_counter()
        self.marks.append((now, done))
        while len(self.marks) > 2 and now - self.marks[1][0] > 2.0:
            self.marks.pop(0)
        (t0, d0) = self.marks[0]
        if now <= t0 or done <= d0:
            return ""
        rate = (done - d0) / (now - t0)
        left_s = (self.total - done) / rate
        return f"{rate:.1f} tok/s, ~{left_s / 60:.1f} min left"


def capture(
    settings: CaptureSettings,
    out_dir: Path | str,
    progress: bool = True,
    *,
    overwrite: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """Capture one trace into exactly ``out_dir`` (written atomically) and return the path.

    Deterministic: the same settings (and software versions, thread count) give identical
    arrays. Raises CaptureError for bad settings, a missing extra or model package, a too-short
    text, or an existing ``out_dir`` without ``overwrite=True``; nothing is written then.
    ``cache_dir`` is where assembled model files are kept (default
    :func:`sim.paths.trace_cache_dir`).

    The arrays stream to the trace's files as they are produced (see
    :class:`sim.trace.recording.Recorder`); the KV cache is allocated once for the whole capture
    (:func:`sim.trace.recording.make_cache`).
    """
    spec = settings.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CaptureError(f"trace {out_dir} already exists (remove it or pass overwrite=True)")
    # the trace is written beside out_dir, then renamed: check that it can be before loading the
    # model (seconds to minutes)
    problem = unwritable(out_dir.parent) or unwritable(out_dir, margin=len(".partial-") + 10)
    if problem is not None:
        raise CaptureError(f"cannot write trace {out_dir}: {problem}")
    text = load_text(settings.text)
    torch, _ = import_capture_deps()

    loaded = load_model(spec.name, cache_dir, progress)
    model_info = model_manifest(loaded)
    prompt_len, decode_steps = settings.prompt_len, settings.decode_steps
    n_positions = settings.n_positions
    if n_positions > model_info["max_positions"]:
        raise CaptureError(
            f"prompt_len + decode_steps = {n_positions} exceeds {spec.name}'s "
            f"{model_info['max_positions']} positions"
        )
    ids, bos_added = _tokenize_prefix(
        loaded.tokenizer, text, _tokens_needed(settings), settings.mode
    )
    teacher_forced = settings.mode == "teacher_forced"
    chunk = settings.chunk_positions()

    _limit_heap_growth()
    start_s = time.perf_counter()
    torch.manual_seed(settings.seed)
    n_layers = model_info["n_layers"]
    layers = loaded.model.model.layers
    next_token: NextToken | None = None
    if not teacher_forced:
        next_token = NextToken(
            torch,
            n_positions,
            sampling=settings.sampling,
            temperature=settings.temperature,
            top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            seed=settings.seed,
        )
    capture_info: dict[str, Any] = {"seed": settings.seed, "settings": settings.as_dict()}
    bar = progress_bar(n_positions, f"capture {settings.key()}", "tok", enabled=progress)
    rate = _Rate(decode_steps)  # the decode loop reports steps done, not positions
    with TraceWriter(
        out_dir, model_info, prompt_len, decode_steps, settings.query_start,
        text.describe(), capture_info, overwrite=overwrite,
    ) as writer:  # fmt: skip
        streams = {
            (layer, kind): writer.stream(layer, kind)
            for layer in range(n_layers)
            for kind in ("keys", "values", "queries", SPEC_KIND)
            if kind != SPEC_KIND or layer >= 1
        }
        recorder = Recorder(streams, settings.query_start, prompt_len)
        tokens = list(ids)
        prefill_end = n_positions if teacher_forced else prompt_len
        prefill_s = 0.0
        try:
            with recording(recorder, layers), torch.inference_mode():
                cache = make_cache(loaded.model.config, n_positions)
                out = None
                for begin in range(0, prefill_end, chunk):
                    end = min(begin + chunk, prefill_end)
                    recorder.position = begin
                    bar.set_postfix_str(f"prefill {begin}-{end}")
                    out = loaded.model(
                        input_ids=torch.tensor([ids[begin:end]], dtype=torch.long),
                        cache=cache, use_cache=True, logits_to_keep=1,
                    )  # fmt: skip
                    bar.update(end - begin)
                recorder.flush()
                prefill_s = time.perf_counter() - start_s
                if next_token is not None:
                    assert out is not None  # prefill_end >= prompt_len >= 1: a chunk ran
                    next_token.append(ids)
                    next_id = next_token(out.logits)
                    for step in range(decode_steps):
                        tokens.append(next_id)
                        next_token.append([next_id])
                        recorder.position = prompt_len + step
                        out = loaded.model(
                            input_ids=torch.tensor([[next_id]], dtype=torch.long),
                            cache=cache, use_cache=True, logits_to_keep=1,
                        )  # fmt: skip
                        next_id = next_token(out.logits)
                        bar.update(1)
                        if step % 8 == 7:
                            bar.set_postfix_str(rate.postfix(step + 1))
                    recorder.flush()
        finally:
            bar.close()
        forward_s = time.perf_counter() - start_s
        generated = tokens[prompt_len:]
        writer.write_tokens(np.asarray(tokens, dtype=np.int32))
        capture_info.update(_capture_info(settings, loaded, ids, bos_added, generated, torch))
        if next_token is not None:
            capture_info["decode"]["next_token_after_last_step"] = next_id
        capture_info.update(
            {
                "model_load_s": round(loaded.load_s, 3),
                "prefill_s": round(prefill_s, 3),
                "forward_s": round(forward_s, 3),
                "decode_tokens_per_s": round(decode_steps / (forward_s - prefill_s), 3)
                if not teacher_forced and forward_s > prefill_s
                else None,
                "wall_time_s": round(time.perf_counter() - start_s + loaded.load_s, 3),
            }
        )
        # the writer keeps its own copy of the capture dict; the manifest is written on exit
        writer.manifest["capture"] = dict(capture_info)
    return out_dir


def _capture_info(
    settings: CaptureSettings,
    loaded: LoadedModel,
    ids: list[int],
    bos_added: bool,
    generated: list[int],
    torch: Any,
) -> dict[str, Any]:
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    teacher_forced = settings.mode == "teacher_forced"
    chunk = settings.chunk_positions()
    if teacher_forced:
        how = (
            f"teacher-forced: {settings.n_positions} text tokens read in prefill passes of "
            f"{chunk} positions; positions >= prompt_len are decode steps with the text's tokens"
        )
        choice = "the text's tokens"
    else:
        prefill = (
            "single-pass prefill"
            if chunk >= settings.prompt_len
            else (f"prefill in passes of {chunk} positions")
        )
        choice = (
            "greedy"
            if settings.sampling == "greedy"
            else (
                f"sampled (temperature {settings.temperature}, top_p {settings.top_p}, "
                f"torch.Generator seeded with {settings.seed})"
            )
        )
        how = f"{prefill} (logits_to_keep=1), {choice} decode"
    return {
        "key": settings.key(),
        "capture_version": CAPTURE_VERSION,
        "mode": settings.mode,
        "method": f"transformers GGUF float32, {how}; KV cache preallocated once for every "
        "full-attention layer (views of the filled part), sliding layers transformers' "
        "DynamicSlidingWindowLayer; sdpa attention; q/k post-RoPE; speculative queries of layer "
        "l >= 1 = layer l's q_proj (+ q_norm) and RoPE applied to layer l-1's attention input",
        "tokenizer": {
            "add_special_tokens": True,
            "bos_added": bos_added,
            "first_token_id": int(ids[0]),
            "chat_template": False,
        },
        "decode": {
            "greedy": not teacher_forced and settings.sampling == "greedy",
            "source": choice,
            "sampling": {
                "method": "teacher_forced" if teacher_forced else settings.sampling,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "repetition_penalty": settings.repetition_penalty,
                "seed": settings.seed,
            },
            "stops_at_eos": False,
            "eos_token_id": eos,
            "eos_generated": int(sum(1 for t in generated if t == eos)),
            "degeneration": degeneration(generated),
        },
        "prefill_chunk": chunk,
        "software": _versions(),
        "torch_threads": int(torch.get_num_threads()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "platform": platform.platform(),
    }


def _cached_trace_matches(path: Path, settings: CaptureSettings) -> Trace | None:
    """The cached trace at ``path`` if it opens cleanly and was captured with these settings."""
    try:
        trace = open_trace(path)
    except TraceError as exc:
        print(f"kvsim: ignoring invalid cached trace ({exc})", file=sys.stderr)
        return None
    recorded = trace.manifest.get("capture", {}).get("settings")
    if recorded != settings.as_dict():
        print(f"kvsim: cached trace {path} has other settings; recapturing", file=sys.stderr)
        return None
    # a file: text may have changed since; the built-ins change only with the Python version
    if trace.manifest.get("text", {}).get("sha256") != load_text(settings.text).sha256:
        print(f"kvsim: the text of cached trace {path} changed; recapturing", file=sys.stderr)
        return None
    return trace


def get_or_capture(
    settings: CaptureSettings, cache_dir: Path | str | None = None, progress: bool = True
) -> Path:
    """Return ``cache_dir / settings.key()``, capturing it first unless a valid copy is cached.

    A cached trace is reused when it opens cleanly (cheap validation), was captured with the
    same settings and on a text with the same sha256; otherwise it is recaptured and replaced.
    ``cache_dir`` defaults to :func:`sim.paths.trace_cache_dir`.
    """
    settings.validate()
    cache_dir = Path(cache_dir) if cache_dir is not None else trace_cache_dir()
    path = cache_dir / settings.key()
    if path.exists() and _cached_trace_matches(path, settings) is not None:
        return path
    try:
        return capture(settings, path, progress, overwrite=path.exists(), cache_dir=cache_dir)
    except TraceError:
        # another process may have finished the same capture first; use it if it is valid
        if path.exists() and _cached_trace_matches(path, settings) is not None:
            return path
        raise
