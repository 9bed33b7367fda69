"""GPT-OSS against transformers on a tiny random config: prefill logits, paged decode of several sequences past
the sliding window, greedy generation (resident and with experts tiered under --memory-budget), and MXFP4
experts (quantized here following the OCP MX spec) against transformers on the same dequantized weights."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from strata.layers.attention import AttentionMetadata
from strata.weights.loader import load_model
from tests.models.conftest import save_tiny_tokenizer
from tests.models.paged_decode import assert_paged_decode_matches, paged_logits, random_ids

transformers = pytest.importorskip("transformers")

WINDOW = 8
CONFIG = dict(  # noqa: C408 (HF keyword names, as tests/models/conftest.py)
    vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
    swiglu_limit=1.0,  # low, so the tiny random experts reach both clamps
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 64, "rope_theta": 150000.0},
)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def build(path, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**CONFIG, **overrides})).float().eval()
    with torch.no_grad():  # spread logits and routing; sinks and biases large enough to matter
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 0.15 if "experts" in name else 0.08)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return model


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., out, in] float -> (blocks uint8 [.., out, in/32, 16], scales uint8 [.., out, in/32]) per the OCP MX
    spec: shared exponent floor(log2(amax)) - 2 (e2m1's largest exponent), codes rounded to the nearest e2m1."""
    g = w.float().reshape(*w.shape[:-1], -1, 32)  # [.., out, in/32, 32]
    amax = g.abs().amax(-1, keepdim=True).clamp_min(2.0**-126)
    exp = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)  # [.., 1]
    codes = (g / torch.exp2(exp)).clamp(-6, 6)
    idx = (codes[..., None] - E2M1).abs().argmin(-1).to(torch.uint8)  # nearest value (ties: the lower code)
    blocks = idx[..., 0::2] | (idx[..., 1::2] << 4)  # element 2j in the low nibble
    return blocks.contiguous(), (exp[..., 0] + 127).to(torch.uint8)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    codes = torch.stack((blocks & 15, blocks >> 4), -1).flatten(-2).long()  # [.., out, in/32, 32]
    w = E2M1[codes] * torch.exp2(scales.float() - 127)[..., None]
    return w.flatten(-2)  # [.., out, in]


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    return build(path), str(path)


def to_mxfp4(hf, path: Path) -> None:
    """Rewrites the checkpoint at `path` with MXFP4 experts, as gpt-oss ships; `hf` gets the dequantized values."""
    state = load_file(path / "model.safetensors")
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4_quantize(state.pop(name).transpose(1, 2))  # [E, out, in] as the checkpoints
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            hf.get_parameter(name).copy_(mxfp4_dequantize(blocks, scales).transpose(1, 2))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                  "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    """(transformers model with the dequantized experts, folder of the MXFP4 checkpoint)."""
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    hf = build(path, seed=1)
    to_mxfp4(hf, path)
    return hf, str(path)


def _ids(n: int, seed: int) -> torch.Tensor:
    return random_ids(CONFIG["vocab_size"], n, seed)


def _greedy_ref(hf, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        return hf.generate(prompt[None], max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                           min_new_tokens=n)[0, len(prompt):].tolist()


@pytest.mark.parametrize("which", ["gpt_oss", "gpt_oss_mxfp4"])
def test_prefill_logits_match_transformers(request, which):
    hf, path = request.getfixturevalue(which)
    ours = load_model(path, progress=False)
    if which == "gpt_oss_mxfp4":  # experts kept as 4-bit codes, no float copy
        expert = ours.model.layers[0].mlp.experts[0]
        assert expert.gate_up_proj_blocks.dtype == torch.uint8 and not hasattr(expert, "gate_up_proj")
    ids = _ids(40, 1)  # 5x the window
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]  # [T, V]
    got = ours(ids, torch.arange(40), AttentionMetadata.no_cache([40]))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_paged_batched_decode_past_window_matches_transformers(gpt_oss):
    hf, path = gpt_oss
    model = load_model(path, progress=False)
    assert [s.sliding_window for s in model.kv_cache_spec()] == [WINDOW, None, WINDOW, None]
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [WINDOW, None, WINDOW, None]
    assert_paged_decode_matches(model, hf, CONFIG["vocab_size"])  # 8 blocks per sequence, 3 sequences per step


@pytest.mark.parametrize("which", ["gpt_oss", "gpt_oss_mxfp4"])
def test_greedy_generation_matches_transformers(request, which):
    from strata import LLM, SamplingParams

    hf, path = request.getfixturevalue(which)
    prompts = [_ids(n, 5 + n) for n in (7, 12)]
    llm = LLM(path, progress=False, block_size=4)
    outs = llm.generate([p.tolist() for p in prompts], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [_greedy_ref(hf, p, 24) for p in prompts]


@pytest.mark.parametrize("which", ["gpt_oss", "gpt_oss_mxfp4"])
def test_tiered_experts_equal_resident(request, which, tmp_path, monkeypatch):
    from strata import LLM, SamplingParams
    from strata.tiers import runtime
    from tests.tiers.conftest import budget_for

    _, path = request.getfixturevalue(which)
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "current_rss", lambda: 0)  # the budget below is an exact slot count
    prompts = [_ids(n, 20 + n).tolist() for n in (6, 9)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(path, progress=False, dtype="float32").generate(prompts, greedy)]
    llm = LLM(path, progress=False, dtype="float32", memory_budget=budget_for(path, 5))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == ref
    st = llm.engine.tier_stats()
    assert st["tiered"] and st["expert_cache_slots"] == 5 and st["disk_bytes_read"] > 0
    llm.engine.tiers.close()


def test_norm_rounds_as_transformers_in_bf16():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm as HFNorm

    from strata.models.gpt_oss import GptOssRMSNorm

    x, res = torch.randn(2, 5, 64).bfloat16(), torch.randn(2, 5, 64).bfloat16()
    hf, ours = HFNorm(64, 1e-5), GptOssRMSNorm(64, 1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(64).bfloat16().float())  # float32 in transformers, bf16 values as shipped
        ours.weight = torch.nn.Parameter(hf.weight.bfloat16())
    torch.testing.assert_close(ours(x), hf(x), atol=0, rtol=0)
    out, stream = ours(x, res)
    torch.testing.assert_close(out, hf(x + res), atol=0, rtol=0)
    assert torch.equal(stream, x + res)


def test_param_counts_match_transformers(gpt_oss):
    from strata.models.registry import load_config

    hf, path = gpt_oss
    counts = load_config(path).param_counts()
    assert counts["total"] == sum(p.numel() for p in hf.parameters())
    assert counts["experts"] == sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)


def test_mxfp4_format_dequantizes_as_the_spec():
    from strata.quant.format import QuantFormat, dequantize_weight

    w = torch.randn(6, 64) * torch.logspace(-3, 2, 6)[:, None]  # rows of very different magnitudes
    blocks, scales = mxfp4_quantize(w)
    got = dequantize_weight({"qweight": blocks.view(6, 32), "scales": scales}, QuantFormat.parse("mxfp4"), 6, 64)
    torch.testing.assert_close(got, mxfp4_dequantize(blocks, scales), atol=0, rtol=0)
    assert ((got - w).abs() <= w.view(6, 2, 32).abs().amax(-1).repeat_interleave(32, 1) / 4 + 1e-12).all()


@pytest.mark.parametrize("which", ["gpt_oss", "gpt_oss_mxfp4"])
def test_bf16_decode_agrees_with_float32(request, which):
    """bf16 runs the native paths (the MXFP4 GEMV at decode); the same tokens stay on top."""
    _, path = request.getfixturevalue(which)
    seqs = [_ids(24, 9), _ids(24, 10)]
    ref = paged_logits(load_model(path, progress=False), seqs, [6, 9])
    half = paged_logits(load_model(path, dtype="bfloat16", progress=False), seqs, [6, 9], dtype=torch.bfloat16)
    for a, b in zip(ref, half):
        assert (a.argmax(-1) == b.float().argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("mxfp4", [False, True])
def test_gguf_from_llama_cpp_converter_matches_transformers(tmp_path, mxfp4):
    """llama.cpp's converter splits gate_up_proj into gate and up (MXFP4 experts repacked as GGUF MXFP4 blocks)
    and fixes the SwiGLU limit at 7: such a checkpoint converts back exactly."""
    from strata import LLM, SamplingParams
    from strata.weights.gguf_convert import convert_gguf
    from tests.models.llama_cpp_convert import convert_to_gguf

    hf = build(tmp_path / "hf", seed=4, swiglu_limit=7.0)
    if mxfp4:
        to_mxfp4(hf, tmp_path / "hf")
    gguf_file = convert_to_gguf(tmp_path / "hf", tmp_path / "tiny.gguf")
    ours = load_model(str(convert_gguf(gguf_file, tmp_path / "back")), progress=False)
    ids = _ids(30, 6)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(ours(ids, torch.arange(30), AttentionMetadata.no_cache([30])), ref, atol=1e-4, rtol=1e-4)
    prompt = ids[:9]
    got = LLM(str(gguf_file), progress=False).generate([prompt.tolist()], SamplingParams(temperature=0, max_tokens=16,
                                                                                         ignore_eos=True))
    assert got[0].outputs[0].token_ids == _greedy_ref(hf, prompt, 16)


def test_tensor_parallel_is_refused_in_one_line(gpt_oss):
    from strata.distributed.tensor_parallel import check_supported
    from strata.errors import UnsupportedError
    from strata.models.registry import load_config

    _, path = gpt_oss
    with pytest.raises(UnsupportedError, match="does not support"):
        check_supported(load_config(path), 2, path)
