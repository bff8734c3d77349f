"""Replacement policies of the DRAM cache (:class:`sim.kv.cache.LayerCache`): the interface and
registry in :mod:`~sim.kv.replacement.base`, one module per policy (or family) beside it.

Importing this package loads no policy: :data:`REPLACEMENTS` imports every module here on its
first lookup (:class:`sim.registry.Registry`).
"""

from sim.kv.replacement.base import REPLACEMENTS, ReplacementPolicy

__all__ = ["REPLACEMENTS", "ReplacementPolicy"]
