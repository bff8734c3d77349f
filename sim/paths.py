"""Where kvsim finds its presets and caches (the repository it is installed from, editable)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = Path(os.environ.get("KVSIM_CONFIGS", REPO_ROOT / "configs"))
TRACE_CACHE_DIR = Path(os.environ.get("KVSIM_TRACE_CACHE", REPO_ROOT / "traces" / "cache"))
