"""llama.cpp block formats kept as in GGUF (K-quants q4_k, q5_k, q6_k; 32-weight q8_0, q4_1,
q5_0, q5_1): the torch reference
equals gguf's dequantization bit for bit, and the format table knows their sizes and refuses what they cannot do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strata.errors import UnsupportedError, WeightsError
from strata.layers.quant_linear import QuantLinear
from strata.quant import ggml_blocks, kquant
from strata.quant.format import QuantFormat, dequantize_weight, quantize_weight

gguf = pytest.importorskip("gguf")
GGUF_NAME = {v: k for k, v in {**kquant.GGUF_TYPES, **ggml_blocks.GGUF_TYPES}.items()}
BLOCK_BYTES = {**kquant.BLOCK_BYTES, **ggml_blocks.BLOCK_BYTES}
KINDS = list(BLOCK_BYTES)


def random_blocks(kind, rows, cols, seed, scale):
    return (kquant if kind in kquant.BLOCK_BYTES else ggml_blocks).random_blocks(kind, rows, cols, seed, scale)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1e-3, 60.0])  # small factors (fp16 subnormals among them) and large ones
def test_reference_equals_gguf_dequantize(kind, scale):
    raw = random_blocks(kind, 24, 768, seed=len(kind), scale=scale)
    ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[GGUF_NAME[kind]])  # [24, 768] float32
    ours = dequantize_weight({"qweight": raw}, kind, 24, 768)
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("kind", list(ggml_blocks.BLOCK_BYTES))
def test_reference_equals_gguf_on_quantized_floats(kind):
    """Blocks as gguf's own quantizer writes them (codes at both ends of the range, llama.cpp's d and m)."""
    x = np.random.default_rng(len(kind)).standard_normal((24, 768)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[GGUF_NAME[kind]]
    raw = gguf.quants.quantize(x, qtype)  # uint8 [24, 768 / 32 * B]
    ours = dequantize_weight({"qweight": torch.from_numpy(raw)}, kind, 24, 768)
    np.testing.assert_array_equal(ours.numpy(), gguf.quants.dequantize(raw, qtype))
    assert np.abs(ours.numpy() - x).max() < 0.5  # and they are the floats, quantized


@pytest.mark.parametrize("kind,bits", [("q4_k", 4.5), ("q5_k", 5.5), ("q6_k", 6.5625), ("q8_0", 8.5), ("q4_1", 5.0),
                                       ("q5_0", 5.5), ("q5_1", 6.0)])
def test_sizes_match_gguf(kind, bits):
    fmt = QuantFormat.parse(kind.upper())
    assert str(fmt) == kind and fmt.is_kquant == kind.endswith("_k") and fmt.blocks is not None
    per_row = 512 // (256 if fmt.is_kquant else 32)
    assert fmt.tensor_specs(10, 512) == {"qweight": ((10, per_row * BLOCK_BYTES[kind]), torch.uint8)}
    assert fmt.nbytes(10, 512) * 8 / (10 * 512) == bits
    assert BLOCK_BYTES[kind] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[GGUF_NAME[kind]]][1]


def test_refusals():
    with pytest.raises(UnsupportedError, match="group size"):
        QuantFormat.parse("q4_k-g64")
    with pytest.raises(UnsupportedError, match="does not quantize"):
        quantize_weight(torch.randn(4, 256), "q4_k")
    with pytest.raises(WeightsError, match="multiple of 256"):
        QuantLinear(300, 4, "q6_k")
    with pytest.raises(WeightsError, match="multiple of 32"):
        QuantLinear(48, 4, "q4_1")
    with pytest.raises(UnsupportedError, match="does not quantize"):
        quantize_weight(torch.randn(4, 64), "q8_0")
    with pytest.raises(WeightsError, match=r"qweight: expected \[4, 144\]"):
        dequantize_weight({"qweight": torch.zeros(4, 143, dtype=torch.uint8)}, "q4_k", 4, 256)
