"""KV-retrieval policies: one module each, registered by name in :data:`POLICIES`.

A YAML policy spec ``{type: token_topk, budget: 1024}`` builds ``POLICIES.create(spec)``.
"""

from __future__ import annotations

from sim.registry import Registry

from .base import RetrievalPolicy

POLICIES: Registry[RetrievalPolicy] = Registry("policy")

# Imported for their registration side effect; they need POLICIES defined above.
from . import (  # noqa: E402, F401
    clusterkv,
    dynakv,
    full,
    h2o,
    infinigen,
    oracle,
    pqcache,
    quest,
    static_clusters,
    streaming_llm,
    token_topk,
)
