"""Where kvsim finds its presets and caches (the repository it is installed from, editable)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = Path(os.environ.get("KVSIM_CONFIGS", REPO_ROOT / "configs"))


def trace_cache_dir() -> Path:
    """Where captured traces (and assembled model files) are cached: ``$KVSIM_TRACE_CACHE``,
    else ``traces/cache`` in the repository (read when called, so a test or a notebook can set
    the variable late).

    Outside a source checkout (a non-editable install) it falls back to ~/.cache/kvsim/traces.
    """
    env = os.environ.get("KVSIM_TRACE_CACHE")
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "sim").is_dir():
        return REPO_ROOT / "traces" / "cache"
    return Path.home() / ".cache" / "kvsim" / "traces"
