"""DeepSeek-V2/V3 against transformers on tiny random configs: prefill logits, the latent (MLA) cache with
absorbed decode across paged blocks, batched greedy generation, the routers (V2 softmax greedy and
group-limited, V3 sigmoid with e_score_correction_bias in groups), config errors. The tiers and int8 runs are in
tests/tiers/test_deepseek_tiers.py, GGUF in tests/weights/test_gguf_deepseek.py."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from strata import LLM, SamplingParams
from strata.layers.attention import AttentionMetadata
from strata.layers.kv_cache import allocate_kv_caches, kv_bytes_per_token
from strata.models.registry import load_config
from strata.weights.loader import load_model
from tests.models.conftest import save_tiny_tokenizer
from tests.models.paged_decode import assert_cached_decode_equals_full

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 0.707,
        "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}
BASE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "max_position_embeddings": 512, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0}
V2, V3 = ("DeepseekV2Config", "DeepseekV2ForCausalLM"), ("DeepseekV3Config", "DeepseekV3ForCausalLM")
VARIANTS = {  # name: (config class, model class, overrides)
    "v2_greedy": (*V2, {"q_lora_rank": None, "topk_method": "greedy", "routed_scaling_factor": 1.5}),
    "v2_group_yarn": (*V2, {"q_lora_rank": 24, "topk_method": "group_limited_greedy", "n_group": 4,
                            "topk_group": 2, "rope_parameters": YARN}),
    "v3_yarn": (*V3, {"q_lora_rank": 24, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
                      "routed_scaling_factor": 2.5, "rope_parameters": YARN}),
    "v3_rotate_half": (*V3, {"q_lora_rank": None, "n_group": 2, "topk_group": 1, "norm_topk_prob": False,
                             "rope_interleave": False, "first_k_dense_replace": 2, "num_hidden_layers": 4}),
}
SEQ = 40


def build_hf(variant: str, path, dtype=torch.float32):
    cfg_cls, model_cls, extra = VARIANTS[variant]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # spread logits (no greedy ties) and a router bias that changes choices
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if p.ndim >= 2:
                p.normal_(0, 0.08)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def hf_deepseek(tmp_path_factory):
    cache = {}

    def get(variant: str):
        if variant not in cache:
            path = tmp_path_factory.mktemp(variant)
            cache[variant] = (build_hf(variant, path), str(path))
        return cache[variant]

    return get


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_logits_match_transformers(hf_deepseek, variant):
    hf, path = hf_deepseek(variant)
    ours = load_model(path, progress=False)
    ids = _ids(SEQ, 1)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()  # [T, V]
    got = ours(ids, torch.arange(SEQ), AttentionMetadata.no_cache([SEQ]))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["v2_group_yarn", "v3_rotate_half"])
def test_latent_cache_decode_equals_full_forward(hf_deepseek, variant):
    """Prefill then absorbed decode steps, the latents in scattered blocks of 4 slots of a one-row cache."""
    _, path = hf_deepseek(variant)
    model = load_model(path, progress=False)
    cfg = model.config
    specs = model.kv_cache_spec()
    latent_dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert {(s.k_heads, s.k_dim, s.v_heads) for s in specs} == {(1, latent_dim, 0)}
    caches = allocate_kv_caches(specs, 16 * 4, torch.float32)
    assert all(len(c) == 1 for c in caches)
    blocks = torch.tensor([11, 3, 7, 0, 14, 5, 9, 2, 12, 1])  # not in order: context gathered across blocks
    slots = (blocks[:, None] * 4 + torch.arange(4)).reshape(-1)
    assert_cached_decode_equals_full(model, _ids(SEQ, 2), caches, slots, prefill=9)


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


PROMPTS = [_ids(7, 3).tolist(), _ids(3, 4).tolist(), _ids(12, 5).tolist()]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.mark.parametrize("variant", ["v2_greedy", "v3_yarn"])
def test_batched_greedy_matches_transformers(hf_deepseek, variant):
    """Three sequences decoded together, 4-token blocks: each context spans up to 8 blocks."""
    hf, path = hf_deepseek(variant)
    llm = LLM(path, progress=False, block_size=4, max_num_seqs=3)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [_hf_greedy(hf, p, 20) for p in PROMPTS]


def test_latent_cache_is_smaller_than_per_head_keys_and_values(hf_deepseek):
    _, path = hf_deepseek("v3_yarn")
    model = load_model(path, progress=False)
    cfg = model.config
    latent = kv_bytes_per_token(model.kv_cache_spec(), torch.bfloat16)
    assert latent == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    per_head = cfg.num_hidden_layers * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 2
    assert latent < per_head
    llm = LLM(path, progress=False, block_size=4, kv_cache_memory=2 * latent * 4 * 10)  # float32 checkpoint
    assert llm.engine.block_manager.num_blocks == 10  # the engine sizes its blocks from the spec
    assert llm.engine.runner.kv_caches[0][0].shape == (40, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_counts_match_transformers(hf_deepseek, variant):
    hf, path = hf_deepseek(variant)
    assert load_config(path).param_counts()["total"] == sum(p.numel() for p in hf.parameters()) + sum(
        b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))


def test_router_bias_and_groups_change_the_choice(hf_deepseek):
    """The V3 router's bias and group limit are live: without them the experts chosen differ."""
    _, path = hf_deepseek("v3_yarn")
    block = load_model(path, progress=False).moe_blocks()[0]
    x = torch.randn(64, BASE["hidden_size"], generator=torch.Generator().manual_seed(0))
    _, ids = block.route(x)
    gate = block.gate
    logits = gate(x)
    plain = torch.topk(logits.sigmoid(), gate.top_k, dim=-1)[1]
    assert not torch.equal(ids.sort(-1).values, plain.sort(-1).values)
    groups = ids // (BASE["n_routed_experts"] // gate.n_group)  # [T, k]
    assert all(len(set(g)) <= gate.topk_group for g in groups.tolist())


def test_tensor_parallel_refused_in_one_line(hf_deepseek):
    from strata.distributed.tensor_parallel import check_supported
    from strata.errors import UnsupportedError

    _, path = hf_deepseek("v2_greedy")
    with pytest.raises(UnsupportedError, match="does not support DeepseekV2ForCausalLM"):
        check_supported(load_config(path), 2, path)


def test_router_bias_stays_float32_in_a_bfloat16_model(hf_deepseek):
    hf, path = hf_deepseek("v3_yarn")
    model = load_model(path, dtype="bfloat16", progress=False)
    gate = model.moe_blocks()[0].gate
    assert model.lm_head.weight.dtype == torch.bfloat16 and gate.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(gate.e_score_correction_bias, hf.model.layers[1].mlp.gate.e_score_correction_bias,
                               rtol=0, atol=0)


def test_bad_groups_and_missing_fields_are_one_line_errors(hf_deepseek):
    import json

    from strata.errors import ConfigError
    from strata.models.registry import config_from_dict

    _, path = hf_deepseek("v3_yarn")
    d = json.loads((Path(path) / "config.json").read_text())
    with pytest.raises(ConfigError, match="'n_group'/'topk_group'.*n_routed_experts=8.*3/2"):
        config_from_dict({**d, "n_group": 3})
    with pytest.raises(ConfigError, match="missing field 'kv_lora_rank'"):
        config_from_dict({k: v for k, v in d.items() if k != "kv_lora_rank"})
    with pytest.raises(ConfigError, match="'scoring_func' must be softmax or sigmoid"):
        config_from_dict({**d, "scoring_func": "relu"})
