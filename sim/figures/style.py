"""The one style of every kvsim figure, and the only module that sets matplotlib up.

Colour-blind-safe Okabe-Ito palette (Okabe & Ito, "Color Universal Design", 2008), markers to
tell series apart in greyscale, small fonts sized for a paper column (3.4 in) or page (7 in),
units on every axis; each figure is written as vector PDF plus PNG, atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # headless by default; notebooks keep their inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sim.atomic import atomic_write  # noqa: E402

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
COLUMN_IN = 3.4  # one paper column, inches
PAGE_IN = 7.0


def apply_style() -> None:
    """The shared rcParams: small fonts for a paper column, no top/right spines."""
    plt.rcParams.update(
        {
            "figure.dpi": 150,
            "font.size": 8,
            "axes.titlesize": 8,
            "axes.labelsize": 8,
            "legend.fontsize": 7,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf, each via a temporary file renamed into place."""
    written = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        with atomic_write(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight")
        written.append(path)
    plt.close(fig)
    return written
