"""Paper-style figures and tables drawn from an experiment's results directory.

One module per figure; each registers a :class:`~sim.figures.base.Figure` subclass under the
name an experiment lists in ``figures:``. Figures read result files only (never the engine), so
``kvsim plot`` redraws them without rerunning anything. To add one: a module here with a
``@FIGURES.register("name")`` dataclass implementing ``draw``; every module of this package is
imported below, so registering is all it takes.
"""

import importlib
import pkgutil

from sim.figures.base import FIGURES, Figure, Results, draw_figures

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FIGURES", "Figure", "Results", "draw_figures"]
