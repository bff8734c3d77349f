"""KV-cache bookkeeping: byte geometry, flash layouts, DRAM cache and its replacement policies."""
