"""RotaryEmbedding's cos/sin table: the rows it gathers equal the per-position computation bit for bit, as the
table grows, for every dtype and rope type."""

import pytest
import torch

from strata.config import ModelConfig
from strata.layers.rotary import RotaryEmbedding


def _config(rope_scaling=None, head_dim=64) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=32, hidden_size=128,
                       intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=head_dim, rope_scaling=rope_scaling, max_position_embeddings=4096)


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_table_rows_equal_the_computation(rope_scaling, dtype):
    rope = RotaryEmbedding(_config(rope_scaling))
    gen = torch.Generator().manual_seed(0)
    # small positions first, then ones past the table: it grows (twice the size, or what is needed) and keeps
    # giving the computed values
    for high in (8, 300, 301, 5000, 20000):
        for size in (1, 3, 16, 57):
            positions = torch.randint(0, high, (size,), generator=gen)
            cos, sin = rope(positions, dtype)
            ref_cos, ref_sin = rope.compute(positions, dtype)
            assert cos.shape == sin.shape == (size, 1, 64) and cos.dtype == dtype
            assert torch.equal(cos[:, 0], ref_cos) and torch.equal(sin[:, 0], ref_sin)
            assert cos.is_contiguous() and sin.is_contiguous()
    assert rope._tables[dtype][0].shape[0] >= 20000


def test_empty_positions():
    cos, sin = RotaryEmbedding(_config())(torch.zeros(0, dtype=torch.long), torch.bfloat16)
    assert cos.shape == sin.shape == (0, 1, 64)


def test_compute_is_the_rope_formula():
    """compute() (the table's source) against the textbook formula in float64: cos(p * theta^(-2i/D))."""
    rope = RotaryEmbedding(_config(head_dim=8))
    positions = torch.tensor([0, 1, 7, 100, 2047])
    cos, sin = rope.compute(positions, torch.float32)
    i = torch.arange(4, dtype=torch.float64)
    angles = positions.double()[:, None] * 10000.0 ** (-2 * i / 8)  # [T, D/2]
    assert torch.allclose(cos.double(), torch.cat((angles.cos(), angles.cos()), -1), atol=1e-5)
    assert torch.allclose(sin.double(), torch.cat((angles.sin(), angles.sin()), -1), atol=1e-5)
