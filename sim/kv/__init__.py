"""KV-cache bookkeeping: flash layouts (:mod:`sim.kv.layouts`), the DRAM cache
(:mod:`sim.kv.cache`) and its replacement policies (:mod:`sim.kv.replacement`), I/O plans."""
