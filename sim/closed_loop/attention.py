"""A policy inside the model's attention: the hook and the controller it consults.

:func:`register_policy_attention` registers :func:`policy_attention_forward` under
:data:`ATTN_IMPLEMENTATION` in transformers' ``AttentionInterface`` (the supported way to
replace a model's attention function) and ``AttentionMaskInterface`` (transformers' sdpa mask;
without that entry the masks are dropped). A model switched to it
(``model.set_attn_implementation(ATTN_IMPLEMENTATION)``) computes plain sdpa attention unless
a :class:`PolicyController` is active (:func:`policy_attention`); then, per forward pass:

* prefill (forwards of several query positions: the prompt in one pass, or in chunks of
  consecutive positions into the same cache, :func:`sim.closed_loop.driver.run_prompt`): full
  causal attention, as the model computes it; each global layer's post-RoPE prompt keys and
  queries are collected, and :meth:`PolicyController.end_prefill` builds each layer's online
  policy (:meth:`RetrievalPolicy.online_layer`) and prefills it with them;
* decode (one query position): each global layer's policy selects, per KV head, the stored
  positions its query heads attend (grouped-query attention: one selection per KV head);
  the layer attends those plus the current token only, then the policy appends the token's
  key. Sliding-window layers (Gemma 3's local layers) keep their window: the model's own mask
  and cache, untouched.

The restricted attention gathers each KV head's selected keys and values (the heads of one
step select equally many positions in every budgeted policy); selections of unequal sizes
fall back to a boolean mask over the whole context. Either way softmax runs over exactly the
selected positions and the current token (``tests/test_closed_loop.py`` compares with a
masked softmax written out by hand).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.policies.base import LayerContext, RetrievalPolicy
from sim.policies.online import OnlineLayer, Selection, online_layer

#: the name the policy attention is registered under (``attn_implementation=``)
ATTN_IMPLEMENTATION = "kvsim_policy"


@dataclass
class PolicyController:
    """One closed-loop run's policy state: an online layer per global attention layer.

    ``policy``: the retrieval policy (its online form); ``sliding``: per model layer its
    sliding window, ``None`` for a global layer (the policy's); ``capacity``: the most
    positions of the run (prompt + decode steps); ``seed``: layer ``l``'s random stream is
    ``default_rng([seed, l])``, the open-loop pass's. ``record``: keep every decode step's
    selections (``selections[step][layer]``) and every global layer's keys and queries (the
    run's own trace: :meth:`layer_context` hands a layer to the open-loop pass). ``hook_s``
    accumulates the time spent in the policy (select and append), for the overhead benchmark.
    """

    policy: RetrievalPolicy
    sliding: list[int | None]
    capacity: int
    seed: int = 0
    record: bool = False
    layers: dict[int, OnlineLayer] = field(default_factory=dict)
    selections: list[dict[int, Selection]] = field(default_factory=list)
    hook_s: float = 0.0
    decode_steps: int = 0
    #: per layer, the step's queries speculated from the previous layer's attention input
    #: (:func:`speculation_hooks`, for policies that need them)
    speculative: dict[int, np.ndarray] = field(default_factory=dict)
    previous_input: Any = None
    #: with ``record``: per global layer the prompt's and then each step's keys and queries
    recorded_keys: dict[int, list[np.ndarray]] = field(default_factory=dict)
    recorded_queries: dict[int, list[np.ndarray]] = field(default_factory=dict)
    #: score the selection against full attention in the loop (:mod:`sim.closed_loop.recall`)
    #: on decode steps ``0, k, 2k, ...`` (``k`` = ``recall_every``; 0: never): ``accuracy``
    #: holds the (step, layer, metrics) records, ``recall_s`` the time scoring took (not in
    #: ``hook_s``)
    recall_every: int = 0
    accuracy: list[tuple[int, int, dict[str, np.ndarray]]] = field(default_factory=list)
    recall_s: float = 0.0
    #: per global layer the prompt's keys and queries seen so far (chunks of a prefill not
    #: yet ended, :meth:`prefill_part`)
    parts: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = field(default_factory=dict)

    def is_global(self, layer: int) -> bool:
        return self.sliding[layer] is None

    def prefill(self, layer: int, keys: np.ndarray, queries: np.ndarray) -> None:
        """Build and prefill ``layer``'s online policy (keys (H_kv, P, d), queries
        (H_q, P, d))."""
        if layer in self.layers:
            raise ValueError(
                f"layer {layer} was prefilled already: the closed loop prefills once, then "
                "decodes one token per forward pass"
            )
        online = online_layer(self.policy, layer, keys.shape[0], self.capacity,
                              np.random.default_rng([self.seed, layer]))
        online.prefill(keys, queries)
        self.layers[layer] = online
        if self.record:
            self.recorded_keys[layer] = [keys.copy()]
            self.recorded_queries[layer] = [queries.copy()]

    def prefill_part(self, layer: int, start: int, keys: np.ndarray,
                     queries: np.ndarray) -> None:
        """Positions ``start ..`` of the prompt at ``layer`` (keys (H_kv, n, d), queries
        (H_q, n, d)), in order: a prefill's chunks, prefilled by :meth:`end_prefill`."""
        if start == 0 and layer not in self.layers and layer not in self.parts:
            self.parts[layer] = ([keys], [queries])
            return
        seen = self.parts.get(layer)
        if seen is None or sum(k.shape[1] for k in seen[0]) != start:
            raise ValueError(
                "the closed loop prefills the prompt (in one forward pass or in consecutive "
                "chunks), then decodes one token per pass"
            )
        seen[0].append(keys)
        seen[1].append(queries)

    def end_prefill(self) -> None:
        """Prefill each layer's online policy with the prompt's chunks (:meth:`prefill`)."""
        for layer in sorted(self.parts):
            keys, queries = self.parts.pop(layer)
            self.prefill(layer, keys[0] if len(keys) == 1 else np.concatenate(keys, axis=1),
                         queries[0] if len(queries) == 1 else np.concatenate(queries, axis=1))

    def select(self, layer: int, queries: np.ndarray, key: np.ndarray) -> Selection:
        """The step's selection at ``layer`` (queries (H_q, d), the new key (H_kv, d))."""
        online = self.layers.get(layer)
        if online is None:
            raise ValueError(f"layer {layer} decodes before any prefill (or before its end)")
        start = time.perf_counter()
        selection = online.select(queries, key, self.speculative.pop(layer, None))
        online.append(key)
        self.hook_s += time.perf_counter() - start
        if self.record:
            if layer == self.first_global():
                self.selections.append({})
            self.selections[-1][layer] = selection
            self.recorded_keys[layer].append(key[:, None].copy())
            self.recorded_queries[layer].append(queries[:, None].copy())
        if layer == self.first_global():
            self.decode_steps += 1
        return selection

    def layer_context(self, layer: int) -> LayerContext:
        """Global ``layer`` of the run as a trace layer (needs ``record``): its keys
        (H_kv, P + S, d), decode queries (H_q, S, d), every position's queries as stored
        queries, the layer's random stream; what the open-loop pass takes."""
        keys = np.concatenate(self.recorded_keys[layer], axis=1)
        queries = np.concatenate(self.recorded_queries[layer], axis=1)
        prompt = self.recorded_keys[layer][0].shape[1]
        return LayerContext(layer=layer, keys=keys, queries=queries[:, prompt:],
                            prompt_len=prompt, rng=np.random.default_rng([self.seed, layer]),
                            stored_queries=queries, query_start=0)

    def first_global(self) -> int:
        return self.sliding.index(None)

    def scores_step(self) -> bool:
        """Whether the current decode step (after its first global layer's select) is one
        :meth:`score` records."""
        return bool(self.recall_every) and (self.decode_steps - 1) % self.recall_every == 0

    def score(self, layer: int, queries: np.ndarray, keys: np.ndarray, values: np.ndarray,
              selection: Selection) -> None:
        """Record the current step's accuracy at ``layer``
        (:func:`sim.closed_loop.recall.step_accuracy`: queries (H_q, d), the layer's keys and
        values (H_kv, N, d) with the current token last)."""
        from sim.closed_loop.recall import step_accuracy

        start = time.perf_counter()
        self.accuracy.append((self.decode_steps - 1, layer,
                              step_accuracy(queries, keys, values, selection)))
        self.recall_s += time.perf_counter() - start


_ACTIVE: PolicyController | None = None


@contextmanager
def policy_attention(controller: PolicyController) -> Iterator[PolicyController]:
    """Run the block with ``controller`` deciding the attention of the registered function;
    one at a time per process (RuntimeError otherwise). On exit the function is plain sdpa
    again."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("a closed-loop policy is already active in this process")
    if None not in controller.sliding:
        raise ValueError("the model has no global attention layer for the policy")
    _ACTIVE = controller
    try:
        yield controller
    finally:
        _ACTIVE = None


def policy_attention_forward(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> tuple[Any, None]:
    """The registered attention function (signature of transformers' attention interface).

    ``query`` (B, H_q, T, d), ``key``/``value`` (B, H_kv, N, d): the layer's whole cache after
    the update, the new tokens last. Without an active controller, or on a sliding-window
    layer, or when the policy attends everything: transformers' own sdpa attention. Inside a
    capture's :func:`sim.trace.recording.recording` (a decode writing its own trace) every
    layer's queries and new keys and values are recorded first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sim.trace.recording import active_recorder

    controller = _ACTIVE
    layer = getattr(module, "layer_idx", None)
    recorder = active_recorder()
    if recorder is not None and layer is not None:
        recorder.record(layer, query, key, value)
    if controller is None or layer is None or not controller.is_global(layer):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("the closed loop runs one sequence at a time (batch 1)")
    n_new = query.shape[2]
    if n_new > 1 or layer not in controller.layers:
        # prefill (a chunk of it may be one position): full causal attention, the policy
        # takes the prompt
        start = key.shape[2] - n_new
        controller.prefill_part(layer, start, key[0, :, start:].float().numpy(),
                                query[0].float().numpy())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    stored = key.shape[2] - 1
    queries = query[0, :, 0].float().numpy()
    selection = controller.select(layer, queries, key[0, :, stored].float().numpy())
    if controller.scores_step():
        controller.score(layer, queries, key[0].float().numpy(), value[0].float().numpy(),
                         selection)
    if selection is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return restricted_attention(module, query, key, value, selection, kwargs.get("scaling"))


def restricted_attention(
    module: Any, query: Any, key: Any, value: Any, selection: list[np.ndarray],
    scaling: float | None,
) -> tuple[Any, None]:
    """One decode query's attention over each KV head's ``selection`` plus the current token
    (the last key), as transformers' attention returns it: ((B, 1, H_q, d), None)."""
    import torch

    n_kv, stored = key.shape[1], key.shape[2] - 1
    n_q = query.shape[1]
    group = n_q // n_kv
    sizes = {len(s) for s in selection}
    if len(sizes) == 1:
        # gather: (H_kv, k + 1) positions, the current token last
        index = np.empty((n_kv, sizes.pop() + 1), np.int64)
        for h, positions in enumerate(selection):
            index[h, :-1] = positions
        index[:, -1] = stored
        gather = torch.from_numpy(index)[None, :, :, None].expand(1, n_kv, index.shape[1],
                                                                 key.shape[3])
        keys = torch.gather(key, 2, gather)
        values = torch.gather(value, 2, gather.expand(1, n_kv, index.shape[1], value.shape[3]))
        packed = query.reshape(1, n_kv, group, query.shape[3])  # (1, H_kv, G, d)
        out = torch.nn.functional.scaled_dot_product_attention(
            packed, keys, values, scale=scaling
        )  # (1, H_kv, G, d)
    else:
        mask = np.zeros((n_kv, stored + 1), bool)
        for h, positions in enumerate(selection):
            mask[h, positions] = True
        mask[:, stored] = True
        allowed = torch.from_numpy(mask)[None, :, None, :]  # (1, H_kv, 1, N)
        packed = query.reshape(1, n_kv, group, query.shape[3])
        out = torch.nn.functional.scaled_dot_product_attention(
            packed, key, value, attn_mask=allowed, scale=scaling
        )
    out = out.reshape(1, n_q, 1, value.shape[3]).transpose(1, 2).contiguous()
    return out, None


@contextmanager
def speculation_hooks(controller: PolicyController, layers: Any) -> Iterator[None]:
    """For policies that select from speculated queries (InfiniGen,
    ``needs_speculative_queries``): a forward pre-hook on each decoder layer's attention
    projects the previous layer's attention input through this layer's query path and RoPE
    (:func:`sim.trace.recording.project_query`, as a capture records them) at every decode
    step, for the controller to hand to the layer's policy. Removed on exit."""
    from sim.trace.recording import project_query

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        layer = module.layer_idx
        if hidden.shape[1] == 1 and layer >= 1 and controller.previous_input is not None:
            query = project_query(module, controller.previous_input,
                                  kwargs["position_embeddings"])
            controller.speculative[layer] = query[0, :, 0].float().numpy()
        controller.previous_input = hidden

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def register_policy_attention() -> None:
    """Register :func:`policy_attention_forward` as :data:`ATTN_IMPLEMENTATION` in
    transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, policy_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def model_sliding_windows(model: Any) -> list[int | None]:
    """Per decoder layer its sliding window (``None``: global attention), from the config."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(text.num_hidden_layers)
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if not types or not window:
        return [None] * n_layers
    return [int(window) if t == "sliding_attention" else None for t in types]
