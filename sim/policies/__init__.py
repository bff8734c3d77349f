"""KV-retrieval policies: one module each, registered by name in :data:`POLICIES`.

A YAML policy spec ``{type: token_topk, budget: 1024}`` builds ``POLICIES.create(spec)``. The
registry finds its members itself (:class:`sim.registry.Registry`): every module of this package
is imported on the first lookup, so a new policy is one module here with a
``@POLICIES.register("name")`` dataclass; importing this package loads none of them.
"""

from __future__ import annotations

from sim.registry import Registry

from .base import RetrievalPolicy

POLICIES: Registry[RetrievalPolicy] = Registry("policy", package=__name__)

__all__ = ["POLICIES"]
