"""The replay: a policy pass's selections stepped through a SimPy model of the phone.

For every decode step and every layer of the simulated model:

``dense (QKV projection) -> index scoring -> cache lookup -> flash reads -> attention over the
selected entries -> append the new token's K/V (written to flash, not awaited) -> dense (output
projection + MLP)``, and after the last layer, once per token, the final norm and the LM head
(:func:`sim.hardware.compute.lm_head_us`; none for a target without a vocabulary).

Reads of a policy whose selection does not need the current query are issued at the start of
the layer and overlap the QKV projection and scoring; otherwise they start after scoring. A
policy selecting one layer ahead (``selection_lead_layers = 1``, InfiniGen) scores layer
``l + 1``'s index and issues its reads during layer ``l``, right after its QKV projection
(layer 0 selects for itself first). The time the layer waits for its reads is the ``io_wait``
stall. Writes are not awaited but share the flash queue, units and link with later reads.

With ``pipeline.swap_layers`` each layer's cache lives on flash between its turns: its
image is read back while the previous layer runs, its lookup waits for it, and the entries
it gained are written back after it (see :class:`sim.config.PipelineSpec`).

What is simulated at prefill: nothing is timed. The prompt's K/V are on flash, laid out by the
layout; the DRAM cache starts empty (cold).

Sliding-window layers (Gemma 3's local layers; see :mod:`sim.policy_pass`) attend
``min(w, P + s + 1)`` entries per KV head from DRAM (a ring buffer of ``w`` entries per KV head,
counted in ``dram_bytes``): no index, no cache, no flash reads or writes, nothing to swap. An
eviction policy's kept set (H2O, StreamingLLM: ``LayerSelection.kept_in_dram``) is attended the
same way. What a policy or a layout holds in DRAM outside the cache is attended from there
(:mod:`sim.replay.held`); the DRAM footprint and its parts are defined in :mod:`sim.footprint`.

Where each phase lives:

- :mod:`sim.replay.setup`: :class:`SimSetup` (what the caller gives besides the pass) and
  ``PreparedRun``, built once before the decode: sizes, the simulated layers and KV heads
  mapped to the trace's, each layer's cache, layouts (the prompt placed), slot table, index
  vectors, relabel events and ``ReadTiming``;
- :mod:`sim.replay.compute`: the CPU's time per layer (the dense time split around attention,
  scoring, attention) and the LM head's;
- :mod:`sim.replay.held`: the positions DRAM holds outside the cache;
- :mod:`sim.replay.flash_io`: cache lookups, flash reads and writes, streamed indexes, swaps,
  and what they add to a step's records;
- :mod:`sim.replay.process`: :class:`Replay`, the decode process, layer by layer, ending each
  step's record with its latency and DRAM footprint;
- :mod:`sim.replay.result`: :func:`simulate`, which runs a replay and assembles its records
  into a :class:`sim.outputs.SimResult`;
- :mod:`sim.replay.io_record`: with ``record_io``, the flash schedule of sampled steps (each
  batch's commands with their byte addresses and simulated times), which ``kvsim replay``
  (:mod:`sim.io_replay`, real storage and wall-clock time, unlike this package) executes.
"""

from __future__ import annotations

from sim.replay.process import Replay
from sim.replay.result import simulate
from sim.replay.setup import SimSetup

__all__ = ["Replay", "SimSetup", "simulate"]
