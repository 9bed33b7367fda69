"""The bundled Shakespeare MoE: transformers loads it and computes the same logits; routing is learned."""

import os

import pytest
import torch

from strata.engine.llm_engine import BUNDLED_MODEL
from strata.layers.attention import AttentionMetadata
from strata.weights.loader import load_model

transformers = pytest.importorskip("transformers")
DRAFT = os.path.join(os.path.dirname(BUNDLED_MODEL), "shakespeare-draft")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BUNDLED_MODEL, "config.json")),
                                reason="bundled model not present")

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun."


@pytest.mark.parametrize("path", [BUNDLED_MODEL, DRAFT], ids=["moe", "draft"])
def test_same_logits_as_transformers(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(tok(TEXT)["input_ids"])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    ours = load_model(path, dtype="float32", progress=False)
    got = ours(ids, torch.arange(len(ids)), AttentionMetadata.no_cache([len(ids)]))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    from strata.tokenizer import Tokenizer

    assert Tokenizer(path).encode(TEXT) == ids.tolist()


def test_routing_is_learned_not_uniform():
    """Each layer's router spreads tokens over experts but prefers different ones for different tokens."""
    from strata import LLM

    llm = LLM(BUNDLED_MODEL, progress=False, dtype="float32")
    blocks = llm.engine.model.moe_blocks()
    seen = {b.layer_idx: [] for b in blocks}

    def record(block, x, weights, ids):
        seen[block.layer_idx].append(ids.reshape(-1))

    for b in blocks:
        b.router_hooks.append(record)
    try:
        llm.generate([TEXT], llm.default_sampling_params(temperature=0, max_tokens=8))
    finally:
        for b in blocks:
            b.router_hooks.clear()
    for layer, chunks in seen.items():
        counts = torch.bincount(torch.cat(chunks), minlength=blocks[0].num_experts).float()
        share = counts / counts.sum()
        assert (counts > 0).sum() >= blocks[0].num_experts // 2, f"layer {layer}: routing collapsed"
        assert share.max() < 0.6, f"layer {layer}: one expert takes {share.max():.0%}"
