"""Test helper: random but valid K-quant blocks (any bytes are a valid block once its fp16 scales are finite)."""

from __future__ import annotations

import numpy as np

from strata.weights.kquant import BLOCK_BYTES, QK_K

_F16_AT = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # byte offsets of the fp16 d (and dmin)
GGUF_NAME = {"q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0, scale: float = 1e-3) -> np.ndarray:
    """uint8 [rows, cols / 256 * B] of random blocks whose fp16 factors lie in [-scale, scale]."""
    rng = np.random.default_rng(seed)
    nb = rows * cols // QK_K
    raw = rng.integers(0, 256, size=(nb, BLOCK_BYTES[kind]), dtype=np.uint8)
    for off in _F16_AT[kind]:
        d = rng.uniform(-scale, scale, nb).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)
