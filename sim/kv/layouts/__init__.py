"""Flash layouts: where each KV entry of one (layer, KV head) lives in its flash region.

The interface and registry are in :mod:`~sim.kv.layouts.base`, one module per layout beside it.
Importing this package loads no layout: :data:`LAYOUTS` imports every module here on its first
lookup (:class:`sim.registry.Registry`).
"""

from sim.kv.layouts.base import LAYOUTS, FlashLayout, engine_layout_spec, shared_slot_table

__all__ = ["LAYOUTS", "FlashLayout", "engine_layout_spec", "shared_slot_table"]
