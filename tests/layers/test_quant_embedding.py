"""QuantEmbedding: lookups dequantize exactly the looked-up rows; a tied head reads the same buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strata.errors import WeightsError
from strata.layers.quant_embedding import QuantEmbedding, compute_dtype, swap_embedding
from strata.quant import ggml_blocks, kquant
from strata.quant.format import dequantize_weight, quantize_weight

VOCAB, HIDDEN = 300, 256


def _table(fmt: str) -> dict[str, torch.Tensor]:
    """Stored tensors of a [VOCAB, HIDDEN] table in `fmt`."""
    if fmt in ggml_blocks.BLOCK_BYTES:
        return {"qweight": ggml_blocks.random_blocks(fmt, VOCAB, HIDDEN, seed=1)}
    if fmt in ("q4_k", "q5_k", "q6_k"):
        return {"qweight": kquant.random_blocks(fmt, VOCAB, HIDDEN, seed=1)}
    return quantize_weight(torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1)), fmt)


def _embedding(fmt: str, dtype=torch.float32, scaled: bool = False) -> QuantEmbedding:
    e = QuantEmbedding(VOCAB, HIDDEN, fmt, dtype, scale_by_sqrt_dim=scaled)
    for suffix, t in _table(fmt).items():
        setattr(e, suffix, t)
    e.post_load()
    return e


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64-asym", "q8_0", "q4_1", "q5_0", "q5_1",
                                 "q4_k", "q6_k"])
def test_lookup_is_the_dequantized_table_row(fmt):
    e = _embedding(fmt)
    table = dequantize_weight(e._tensors(), e.fmt, VOCAB, HIDDEN)  # [V, H] float32
    ids = torch.tensor([[0, 5, 299], [7, 7, 1]])
    out = e(ids)  # [2, 3, H]
    assert out.shape == (2, 3, HIDDEN) and out.dtype == torch.float32
    assert torch.equal(out, table[ids])


def test_dtype_and_sqrt_dim_scale_as_gemma():
    e = _embedding("q8_0", torch.bfloat16, scaled=True)
    ref = nn.Embedding(VOCAB, HIDDEN).to(torch.bfloat16)
    ref.weight.data = dequantize_weight(e._tensors(), e.fmt, VOCAB, HIDDEN).to(torch.bfloat16)
    ids = torch.tensor([3, 4, 200])
    scale = torch.tensor(HIDDEN**0.5, dtype=torch.bfloat16)
    assert torch.equal(e(ids), ref(ids) * scale)


def test_tied_head_shares_the_buffers_and_matches_the_table():
    e = _embedding("q8_0")
    head = e.tied_head()
    assert head.qweight.data_ptr() == e.qweight.data_ptr()  # no copy of the table
    x = torch.randn(3, HIDDEN)
    table = dequantize_weight(e._tensors(), e.fmt, VOCAB, HIDDEN)
    torch.testing.assert_close(head(x), x @ table.T, atol=1e-4, rtol=1e-4)


def test_swap_and_compute_dtype():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    m = Outer().to(torch.bfloat16)
    assert compute_dtype(m) == torch.bfloat16
    swap_embedding(m, "int4-g32", torch.float32)
    assert isinstance(m.model.embed_tokens, QuantEmbedding) and compute_dtype(m) == torch.float32
    with pytest.raises(WeightsError, match="post_load called before"):
        QuantEmbedding(VOCAB, HIDDEN, "int8", device="meta").post_load()
    m.model.embed_tokens = nn.Linear(2, 2)
    with pytest.raises(WeightsError, match="expected nn.Embedding"):
        swap_embedding(m, "int8", torch.float32)
