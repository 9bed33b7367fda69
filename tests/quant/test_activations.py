"""The int8 activation quantizer that the VNNI kernels follow: blocks of 32, scale max|x| / 127, ties to even."""

from __future__ import annotations

import torch

from strata.quant.activations import ACT_BLOCK, fake_quantize_rows, quantize_rows


def test_codes_scales_and_padding():
    x = torch.randn(3, 70) * torch.tensor([1.0, 100.0, 1e-3]).view(3, 1)
    q, d = quantize_rows(x)
    assert q.shape == (3, 96) and d.shape == (3, 3) and q.dtype == torch.int8
    blocks = q.view(3, 3, ACT_BLOCK).int()
    assert blocks.abs().max() <= 127 and (blocks.abs().amax(dim=-1) == 127).all()  # the largest value maps to 127
    assert (q[:, 70:] == 0).all()  # padding
    err = (fake_quantize_rows(x) - x).abs().view(3, -1)
    bound = _per_value(d, 70)
    assert (err <= bound / 2 * (1 + 1e-6)).all()  # rounding to the nearest code


def _per_value(d: torch.Tensor, k: int) -> torch.Tensor:
    return d.repeat_interleave(ACT_BLOCK, dim=1)[:, :k]


def test_zero_block_and_ties_to_even():
    x = torch.zeros(1, 64)
    x[0, 32] = 127.0  # scale 1: codes are the values rounded, ties to even
    x[0, 33:36] = torch.tensor([2.5, -0.5, 1.5])
    q, d = quantize_rows(x)
    assert d[0, 0] == 0 and (q[0, :32] == 0).all()
    assert q[0, 32:36].tolist() == [127, 2, 0, 2]
