"""Quantized checkpoints over two ranks: int8 (one scale per row) under tensor parallel and int4-g32 under
expert parallel give the greedy output of one process; a group that would straddle two ranks is refused."""

import pytest

from strata.distributed.launcher import shutdown
from strata.errors import UnsupportedError
from strata.layers.quant_linear import QuantLinear
from strata.weights.quantize_checkpoint import quantize_checkpoint
from tests.distributed.conftest import greedy, make_engine
from tests.models.conftest import build_hf


def _quantized(tmp_path, family: str, fmt: str):
    build_hf(family, tmp_path / "f")
    return quantize_checkpoint(tmp_path / "f", tmp_path / "q", fmt, progress=False)


def _two_ranks_equal_one(path, **knobs):
    want = greedy(make_engine(path, 1))
    engine = make_engine(path, 2, **knobs)
    try:
        o_proj = engine.model.model.layers[0].self_attn.o_proj
        cfg = engine.model.config
        assert cfg.num_attention_heads == 2 and o_proj.in_features == 2 * cfg.head_dim  # rank 0's half of 4 heads
        assert isinstance(o_proj, QuantLinear)  # still quantized
        got = greedy(engine)
    finally:
        shutdown(engine.model)
    assert got == want and all(len(t) == 10 for t in got)


def test_int8_tensor_parallel_equals_one_process(tmp_path):
    _two_ranks_equal_one(_quantized(tmp_path, "qwen3", "int8"))


def test_int4_expert_parallel_equals_one_process(tmp_path):
    _two_ranks_equal_one(_quantized(tmp_path, "mixtral", "int4-g32"), enable_expert_parallel=True)


def test_a_group_split_across_ranks_is_refused(tmp_path):
    path = _quantized(tmp_path, "qwen3", "int4-g32")  # down_proj: 96 input columns, 48 per rank
    with pytest.raises(UnsupportedError, match=r"'model.layers.0.mlp.down_proj' \(int4-g32\) splits into 48 input "
                                               r"columns per rank, not a multiple of its 32-weight groups"):
        make_engine(path, 2)
