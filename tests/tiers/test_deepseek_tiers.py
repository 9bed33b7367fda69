"""DeepSeek-V3 in the tiers: routed experts offloaded under --memory-budget give the resident run's greedy
tokens while the shared experts stay resident; an int8 checkpoint from `strata quantize` runs resident and
offloaded alike, its latent-attention output projection and shared experts quantized too."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from strata import LLM
from strata.cli import main
from strata.engine.sampling_params import SamplingParams
from strata.layers.attention import AttentionMetadata
from strata.layers.quant_linear import QuantLinear
from strata.weights.loader import load_model
from tests.models.test_deepseek import build_hf
from tests.tiers.conftest import budget_for

pytestmark = pytest.mark.usefixtures("one_thread", "isolated")
PROMPTS = [[1, 5, 9, 33, 70], [1, 200, 3, 17, 250, 8, 90]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek-v3")
    build_hf("v3_yarn", path)
    return str(path)


def generate(path: str, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, progress=False, dtype="float32", block_size=4, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)], llm


@pytest.mark.parametrize("slots,prefetch", [(4, "none"), (6, "lookahead")])
def test_offloaded_equals_resident(checkpoint, slots, prefetch):
    ref, _ = generate(checkpoint)
    out, llm = generate(checkpoint, memory_budget=budget_for(checkpoint, slots), prefetch=prefetch)
    assert out == ref
    st = llm.engine.tier_stats()
    assert st["tiered"] and st["expert_cache_slots"] == slots and st["expert_misses"] > 0
    for block in llm.engine.model.moe_blocks():
        assert block.experts[0].gate_proj.weight.is_meta  # routed: in the store
        assert not block.shared_experts.gate_proj.weight.is_meta  # shared: resident
        assert not block.gate.e_score_correction_bias.is_meta
    llm.engine.tiers.close()


def test_int8_checkpoint_resident_and_offloaded(checkpoint, tmp_path):
    out_path = str(tmp_path / "int8")
    assert main(["quantize", "--format", "int8", "--method", "rtn", "--no-progress", checkpoint, out_path]) == 0
    model = load_model(out_path, dtype="float32", progress=False)
    block = model.moe_blocks()[0]
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)
    assert isinstance(block.shared_experts.down_proj, QuantLinear) and isinstance(block.experts[0].up_proj,
                                                                                  QuantLinear)
    ids = torch.tensor(PROMPTS[1])
    meta = AttentionMetadata.no_cache([len(ids)])
    got = model(ids, torch.arange(len(ids)), meta)
    ref = load_model(checkpoint, dtype="float32", progress=False)(ids, torch.arange(len(ids)), meta)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # int8 rounding, not a different model
    resident, _ = generate(out_path)
    offloaded, llm = generate(out_path, memory_budget=budget_for(out_path, 5))
    assert offloaded == resident
    llm.engine.tiers.close()
