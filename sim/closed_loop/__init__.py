"""Closed loop: a policy decides, inside a real model, which KV entries each global attention
layer attends while the model decodes (issue 9), so a wrong selection changes the next hidden
state, query and token.

* :mod:`sim.closed_loop.attention`: the attention function registered in transformers'
  ``AttentionInterface`` and the per-run controller that drives each layer's online policy
  (:mod:`sim.policies.online`);
* :mod:`sim.closed_loop.perplexity`: the long-text perplexity task (teacher-forced).

torch and transformers are imported lazily: importing this package costs nothing.
"""
