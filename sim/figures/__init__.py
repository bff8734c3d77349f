"""Paper-style figures and tables drawn from an experiment's results directory.

One module per figure; each registers a :class:`~sim.figures.base.Figure` subclass under the
name an experiment lists in ``figures:``. Figures read result files only (never the engine), so
``kvsim plot`` redraws them without rerunning anything. To add one: a module here with a
``@FIGURES.register("name")`` dataclass implementing ``draw``; :data:`FIGURES` imports every
module of this package on its first lookup (:class:`sim.registry.Registry`), so registering is
all it takes, and importing this package (e.g. for :class:`Results`) loads no figure.
"""

from sim.figures.base import FIGURES, Figure, Results, draw_figures

__all__ = ["FIGURES", "Figure", "Results", "draw_figures"]
