"""Memory the process keeps after a step's tensors are freed, bounded when a --memory-budget is set.

oneDNN, which runs torch's bfloat16 and float16 matmuls on CPU, keeps two caches keyed by shape: ideep's
computation cache (`LRU_CACHE_CAPACITY`, 1,024 entries by default) and oneDNN's primitive cache
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, 1,024). Each entry holds the primitive and its buffers (reordered
weights, scratch), and a MoE prefill meets a new shape for nearly every expert (its token count), so both
grow step after step and never shrink. Measured on a random bfloat16 Mixtral (4 layers, 8 experts, hidden
512) under a 600 MiB budget, 16 prompts of 1,000 tokens: RSS rose by 25-40 MiB a step to 792 MiB with the
defaults; with both caches capped it stays flat at 525 MiB (docs/tiers.md, "What the budget covers").

Both capacities are read by the libraries on their first matmul, so `bound_retention()` must run before the
model computes anything; a value the user set in the environment is kept.
"""

from __future__ import annotations

import os

# entries each cache may keep; the ideep cache needs at least one
CACHE_CAPACITIES = {"LRU_CACHE_CAPACITY": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


def bound_retention() -> dict[str, str]:
    """Caps oneDNN's shape-keyed caches for this process (call before the first matmul). Returns what is in
    effect, the user's own settings included."""
    for name, value in CACHE_CAPACITIES.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in CACHE_CAPACITIES}
