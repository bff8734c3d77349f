"""kvsim: a discrete-event simulator of KV-cache retrieval from phone flash.

Data flow (one direction only)::

    text + model --capture--> Trace (manifest + lazy arrays)   sim.trace
    Trace --policy (per layer)--> Selections                   sim.policies, sim.policy_pass
    Selections + Trace --> recall, top-k recall, error         sim.metrics.accuracy
    Selections --cache--> misses --layout--> commands          sim.kv
    commands --Device (SimPy)--> timings                       sim.hardware, sim.replay
    timings + accuracy --> records --> summary --> plots       sim.metrics.records, sim.figures

Simulated time is in microseconds everywhere (names end in ``_us``); sizes in bytes (``_bytes``).
"""

__version__ = "0.1.0"
