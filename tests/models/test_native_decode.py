"""The one-call native decode (models/native_decode.py, cpu_decoder.c) against the per-op path it replaces:\ngreedy tokens must be identical."""

import pytest
import torch

from strata import LLM, SamplingParams
from strata.cli import main
from strata.layers.linear import bf16_lib
from strata.layers.moe import NATIVE_MAX_TOKENS
from strata.layers.moe_native import take_counts
from strata.models import native_decode

needs_native = pytest.mark.skipif(bf16_lib() is None, reason="native kernels unavailable on this machine")
PROMPTS = [[5, 17, 99, 3, 42, 8], [7, 7, 120, 64]]


def _greedy(path, monkeypatch, native: bool, max_num_seqs: int = 1, prompts=PROMPTS, dtype: str = "bfloat16",
            logprobs: bool = False):
    calls = []
    if native:
        real = native_decode.NativeDecoder.__call__
        monkeypatch.setattr(native_decode.NativeDecoder, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    else:
        monkeypatch.setattr(native_decode.NativeDecoder, "build", classmethod(lambda cls, *a: None))
    llm = LLM(str(path), dtype=dtype, max_num_seqs=max_num_seqs, progress=False, num_threads=1)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               logprobs=1 if logprobs else None))
    monkeypatch.undo()
    if logprobs:  # each token's own logprob
        return ([o.outputs[0].token_ids for o in out], len(calls),
                torch.tensor([[e["logprob"] for e in o.outputs[0].logprobs] for o in out]))
    return [o.outputs[0].token_ids for o in out], len(calls)


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    from tests.models.conftest import build_hf

    path = tmp_path_factory.mktemp("llama_bf16")
    build_hf("llama", path, dtype=torch.bfloat16)
    return path


@needs_native
def test_bf16_llama_same_tokens_as_per_op_path(llama_bf16, monkeypatch):
    native, calls = _greedy(llama_bf16, monkeypatch, native=True)
    assert calls == 2 * 23  # every decode step after the first token took the native path
    reference, _ = _greedy(llama_bf16, monkeypatch, native=False)
    assert native == reference


@needs_native
def test_quantized_llama_same_tokens_as_per_op_path(llama_bf16, tmp_path, monkeypatch):
    dst = tmp_path / "q"
    assert main(["quantize", "--format", "int4-g32", "--method", "rtn", "--no-progress", str(llama_bf16), str(dst)]) == 0
    native, calls = _greedy(dst, monkeypatch, native=True)
    assert calls > 0
    reference, _ = _greedy(dst, monkeypatch, native=False)
    assert native == reference


@needs_native
@pytest.mark.parametrize("fmt", [None, "int4-g32"])
def test_several_sequences_in_one_call(llama_bf16, tmp_path, monkeypatch, fmt):
    """Three sequences decoding together (continuous batching) take the native path as one call per step, with
    the same tokens as the per-op path at the same batch."""
    path = llama_bf16
    if fmt:
        path = tmp_path / "q"
        assert main(["quantize", "--format", fmt, "--method", "rtn", "--no-progress", str(llama_bf16), str(path)]) == 0
    prompts = [*PROMPTS, [9, 10, 11]]
    native, calls = _greedy(path, monkeypatch, native=True, max_num_seqs=4, prompts=prompts)
    assert 0 < calls < 3 * 23  # batched steps: fewer calls than tokens
    reference, _ = _greedy(path, monkeypatch, native=False, max_num_seqs=4, prompts=prompts)
    assert native == reference


@needs_native
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral", "qwen3"])
def test_moe_and_qk_norm_families_same_tokens(family, tmp_path, monkeypatch):
    """Qwen3-MoE (per-head q/k norm, dense and MoE layers), OLMoE (whole-projection q/k norm, clip_qkv),
    Mixtral (fp32 routing weights), Qwen3 (dense, per-head norm): routing and norms in C give the same tokens."""
    from tests.models.conftest import build_hf

    build_hf(family, tmp_path, dtype=torch.bfloat16)
    native, calls = _greedy(tmp_path, monkeypatch, native=True)
    assert calls == 2 * (23 if family == "qwen3" else 24)  # every decode step; a MoE model's prompts too
    reference, _ = _greedy(tmp_path, monkeypatch, native=False)
    assert native == reference


@needs_native
def test_small_moe_model_runs_long_prompts_in_one_call(tmp_path, monkeypatch):
    """A small MoE model takes prompts past NATIVE_MAX_TOKENS rows in one native call (PROMPT_WORK), with the
    per-op path's tokens; a large one keeps NATIVE_MAX_TOKENS."""
    from tests.models.conftest import build_hf

    build_hf("qwen3_moe", tmp_path, dtype=torch.bfloat16)
    prompts = [[(7 * i) % 97 + 3 for i in range(150)], [(5 * i) % 89 + 3 for i in range(90)]]
    native, calls = _greedy(tmp_path, monkeypatch, native=True, prompts=prompts)
    assert calls == 2 * 24  # each prompt's step too
    reference, _ = _greedy(tmp_path, monkeypatch, native=False, prompts=prompts)
    assert native == reference
    moe = native_decode._Moe(num_experts=64, top_k=8, inter=1024)  # OLMoE's blocks, hidden 2048, 16 layers
    cfg = type("Cfg", (), {"hidden_size": 2048, "head_dim": 128, "num_attention_heads": 16,
                           "num_key_value_heads": 16, "intermediate_size": 1024})
    assert native_decode.PROMPT_WORK // native_decode._macs_per_token(cfg, [moe] * 16, 16) < NATIVE_MAX_TOKENS


@needs_native
def test_moe_decodes_several_sequences_in_one_call(tmp_path, monkeypatch):
    """A MoE model decodes a whole continuous batch per native call, its experts grouped by expert (fewer expert
    runs than token-expert assignments), each sequence with the tokens it gets alone."""
    from tests.models.conftest import build_hf

    build_hf("qwen3_moe", tmp_path, dtype=torch.bfloat16)
    prompts = [*PROMPTS, [9, 10, 11], [300, 2, 77, 5, 6]]
    take_counts()
    native, calls = _greedy(tmp_path, monkeypatch, native=True, max_num_seqs=4, prompts=prompts)
    counts = take_counts()
    assert 0 < calls < 4 * 23
    assert counts["expert_runs"] < counts["assignments"]
    alone = [_greedy(tmp_path, monkeypatch, native=True, prompts=[p])[0][0] for p in prompts]
    assert native == alone


@needs_native
def test_models_outside_the_plain_structure_keep_the_per_op_path(tmp_path, monkeypatch):
    from tests.models.conftest import build_hf

    build_hf("mistral", tmp_path / "mistral", dtype=torch.bfloat16)  # sliding window
    _, calls = _greedy(tmp_path / "mistral", monkeypatch, native=True)
    assert calls == 0
    build_hf("qwen2_moe", tmp_path / "qwen2_moe", dtype=torch.bfloat16)  # q/k/v biases, shared experts
    _, calls = _greedy(tmp_path / "qwen2_moe", monkeypatch, native=True)
    assert calls == 0


@needs_native
def test_decoder_is_rebuilt_for_new_caches_even_at_a_reused_address(llama_bf16):
    from strata.weights.loader import load_model

    model = load_model(str(llama_bf16), progress=False)
    cfg = model.config

    def caches():
        shape = (8, cfg.num_key_value_heads, cfg.head_dim)
        return [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
                for _ in range(cfg.num_hidden_layers)]

    first = caches()
    dec = native_decode.NativeDecoder.build(model, first)
    assert dec is not None and dec.serves(first)
    # same layer-0 key cache (what an address check compared) but new tensors behind the other pointers:
    # the old decoder would write into the freed ones
    second = [first[0]] + caches()[1:]
    assert not dec.serves(second)
    del first
    assert not dec.serves(caches())  # freed caches never match, wherever new ones land


@needs_native
@pytest.mark.parametrize("k", [3, 7])
def test_speculative_verification_runs_in_one_native_call(llama_bf16, monkeypatch, k):
    """A verification (1 + k rows of one sequence) goes through the native decoder, each row a sequence of its
    own whose context ends at its position; greedy tokens equal plain decoding's."""
    rows = []
    real = native_decode.NativeDecoder.__call__
    monkeypatch.setattr(native_decode.NativeDecoder, "__call__",
                        lambda self, x, *a: rows.append(x.shape[0]) or real(self, x, *a))
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 2}
    llm = LLM(str(llama_bf16), dtype="bfloat16", max_num_seqs=1, progress=False, num_threads=1,
              speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [p * 3 for p in PROMPTS]  # repeated text: drafts from prompt lookup
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    monkeypatch.undo()
    assert max(rows) == k + 1 and llm.engine.spec.num_drafts > 0
    plain, _ = _greedy(llama_bf16, monkeypatch, native=True, prompts=prompts)
    assert out == plain


@needs_native
def test_mixed_kinds_within_qkv_and_gate_up_run_apart(llama_bf16, tmp_path, monkeypatch):
    """q/k/v (and gate/up) of different formats cannot fuse, as in llama.cpp's Q4_K_M (attn_v in another type):
    the native decoder runs them as separate GEMVs, with the per-op path's tokens, one and several sequences."""
    import json

    from safetensors.torch import load_file, save_file

    for fmt in ("int4-g32", "int8"):
        assert main(["quantize", "--format", fmt, "--method", "rtn", "--no-progress", str(llama_bf16),
                     str(tmp_path / fmt)]) == 0
    path = tmp_path / "int4-g32"
    tensors, int8 = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "int8" / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    modules = cfg["quantization_config"]["modules"]
    for name in list(modules):
        if name.endswith(("v_proj", "up_proj")):
            modules[name] = "int8"
            for k in [k for k in tensors if k.startswith(name + ".")]:
                del tensors[k]
            tensors.update({k: v for k, v in int8.items() if k.startswith(name + ".")})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    for seqs, prompts in ((1, PROMPTS), (4, [*PROMPTS, [9, 10, 11]])):
        native, calls = _greedy(path, monkeypatch, native=True, max_num_seqs=seqs, prompts=prompts)
        assert calls > 0
        reference, _ = _greedy(path, monkeypatch, native=False, max_num_seqs=seqs, prompts=prompts)
        assert native == reference


@needs_native
def test_prompt_through_one_call_as_close_to_transformers_as_the_per_op_path(tmp_path, monkeypatch):
    """A bf16 prompt's logprobs from the one-call forward against float32 transformers: no further off than the
    per-op path's (SDPA and torch ops in bf16)."""
    from strata.config import EngineConfig
    from strata.engine.llm_engine import LLMEngine
    from tests.models.conftest import build_hf

    hf = build_hf("qwen3_moe", tmp_path)
    prompt = [(7 * i) % 97 + 3 for i in range(120)]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [T, V]
    target = torch.tensor(prompt[1:])

    def error(native: bool) -> float:
        calls = []
        real = native_decode.NativeDecoder.__call__
        monkeypatch.setattr(native_decode.NativeDecoder, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
        if not native:
            monkeypatch.setattr(native_decode.NativeDecoder, "build", classmethod(lambda cls, *a: None))
        engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="bfloat16", num_threads=1), progress=False)
        engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, ignore_eos=True))
        out = []
        while engine.has_unfinished_requests():
            out += engine.step()
        monkeypatch.undo()
        assert len(calls) == (1 if native else 0)
        got = torch.tensor([e["logprob"] for e in out[-1].prompt_logprobs[1:]])  # [T - 1]
        return float((got - ref[torch.arange(len(prompt) - 1), target]).abs().max())

    native, per_op = error(True), error(False)
    assert native <= 1.5 * per_op + 0.02, (native, per_op)


@needs_native
@pytest.mark.parametrize("family,qtype", [("llama", "Q4_1"), ("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen3", "Q5_0"),
                                          ("qwen3_moe", "Q8_0"), ("olmoe", "Q4_0")])
def test_float32_gguf_decodes_in_one_call(family, qtype, tmp_path, monkeypatch):
    """A GGUF file at its default float32 (decode_layers_f32): GGUF's blocks through their float32 GEMV, Q4_0
    (int4-g32) on activations rounded to bf16, Qwen3's per-head q/k norms, MoE blocks (float32 router, experts
    grouped in moe_decode_batch_f32; OLMoE's whole-projection norms and clip); one and four sequences give the per-op
    path's greedy tokens, their logprobs within float32 rounding (norms, rotary, attention and routers sum in another
    order)."""
    from tests.weights.conftest import build
    from tests.weights.gguf_writer import write_gguf

    build(family, tmp_path / "hf")
    path = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", qtype=qtype)
    for seqs, prompts in ((1, PROMPTS), (4, [*PROMPTS, [9, 10, 11]])):
        native, calls, lp = _greedy(path, monkeypatch, native=True, max_num_seqs=seqs, prompts=prompts,
                                    dtype="float32", logprobs=True)
        assert calls > 0
        reference, _, lp_ref = _greedy(path, monkeypatch, native=False, max_num_seqs=seqs, prompts=prompts,
                                       dtype="float32", logprobs=True)
        assert native == reference
        assert (lp - lp_ref).abs().max() < 1e-4
