"""KV-cache bookkeeping: flash layouts, I/O plans, the DRAM cache and its replacement policies."""

# DynaKV's continuity-centric layouts (intra_inter, dual_head) live in their own module and
# register into sim.kv.layout.LAYOUTS on import; importing them here (the package runs before any
# of its modules) registers them whichever module a caller imports first.
from sim.kv import layout, layouts_dynakv  # noqa: F401
