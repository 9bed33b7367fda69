"""A quantized MoE GGUF under --memory-budget: its experts stay in the file's quantization (K-quant blocks, or
Q4_0 as int4-g32) in the expert store, and greedy decoding equals the resident run of the same file.

The files are tiny Qwen3-MoE and OLMoE models written the way llama.cpp lays out a GGUF (merged `[E, out, in]`
expert tensors). The `gguf` package has no K-quant quantizer, so the K-quant files are made of random valid
blocks, mixed per tensor as llama.cpp's Q4_K_M mixes q4_k and q6_k; with llama-cpp-python installed, a file
made by llama.cpp's own quantizer is checked too (`slow` marker).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from strata import LLM
from strata.engine.sampling_params import SamplingParams
from strata.layers.quant_linear import QuantLinear
from strata.quant.kquant import BLOCK_BYTES, GGUF_TYPES, random_blocks
from strata.tiers.store import ExpertStore
from strata.tiers.store_convert import checkpoint_facts, ensure_store
from strata.weights.gguf_cache import resolve_model_path
from tests.models.conftest import COMMON, save_random_hf
from tests.tiers.conftest import budget_for
from tests.weights.gguf_writer import write_gguf

pytestmark = pytest.mark.usefixtures("one_thread", "isolated")
PROMPTS = [[1, 5, 9, 33, 70, 4, 18], [1, 200, 3]]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
HIDDEN = INTER = 256  # K-quant rows are whole 256-weight super-blocks
LAYERS, EXPERTS = 3, 8
MOE = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_experts": EXPERTS, "num_experts_per_tok": 2}
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 64, "moe_intermediate_size": INTER,
                  "norm_topk_prob": True, "decoder_sparse_step": 1}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": INTER, "norm_topk_prob": False}),
}
GGUF_NAME = {v: k for k, v in GGUF_TYPES.items()}
_PROJ = re.compile(r"output|blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down)_exps)")


def _kquant_kind(name: str) -> str:
    """Q4_K_M's mix: q6_k for the output and for ffn_down of the first layer, q4_k elsewhere; q5_k for one
    layer's experts so every K-quant type reaches the store."""
    if name == "output.weight" or name.startswith("blk.0.ffn_down"):
        return "q6_k"
    return "q5_k" if name.startswith("blk.2.ffn_") else "q4_k"


def _hf_model(family: str, path: Path) -> None:
    cfg_cls, model_cls, extra = FAMILIES[family]
    save_random_hf(cfg_cls, model_cls, {**COMMON, **MOE, **extra}, path)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    cache: dict[tuple[str, str], tuple[Path, dict[str, str]]] = {}

    def get(family: str, quant: str) -> tuple[Path, dict[str, str]]:
        if (family, quant) in cache:
            return cache[(family, quant)]
        path = tmp_path_factory.mktemp(f"{family}-{quant}")
        _hf_model(family, path)
        kinds: dict[str, str] = {}

        def blocks(named):
            for i, (name, t) in enumerate(sorted(named.items())):
                if _PROJ.fullmatch(name.removesuffix(".weight")) and (quant == "Q4_K_M" or name == "output.weight"):
                    kind = kinds[name] = _kquant_kind(name)
                    rows = random_blocks(kind, t.size // t.shape[-1], t.shape[-1], seed=i, scale=3e-4)
                    named[name] = (rows.numpy().reshape(*t.shape[:-1], -1), GGUF_NAME[kind])  # [..., out, blocks]
            return named

        # Q4_0 as llama.cpp writes it: every matrix Q4_0 but the output, which is q6_k
        out = write_gguf(path, path / "m.gguf", qtype="F32" if quant == "Q4_K_M" else quant, tensors=blocks,
                         num_tokens=COMMON["vocab_size"])
        cache[(family, quant)] = out, kinds
        return cache[(family, quant)]

    return get


def generate(path: str, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, progress=False, dtype="float32", **kw)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)], llm


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0"])
def test_gguf_experts_offloaded_equal_resident(gguf_files, family, quant):
    gguf_path, _ = gguf_files(family, quant)
    ref, resident = generate(str(gguf_path))
    assert resident.engine.tiers is None
    folder = resolve_model_path(str(gguf_path), progress=False)
    for slots, prefetch in ((12, "lookahead"), (8, "hybrid"), (6, "none")):  # Q4_K_M: at least top-k per size
        out, llm = generate(str(gguf_path), memory_budget=budget_for(folder, slots), prefetch=prefetch)
        st = llm.engine.tier_stats()
        assert st["tiered"] and st["expert_misses"] > 0 and slots <= st["expert_cache_slots"] < LAYERS * EXPERTS
        assert out == ref, f"{family} {quant} at {slots} slots"
        expert = llm.engine.model.moe_blocks()[0].experts[0]
        assert isinstance(expert.gate_proj, QuantLinear) and expert.gate_proj.qweight.is_meta
        llm.engine.tiers.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_store_holds_the_file_blocks(gguf_files, family):
    """Each expert in the store is its three K-quant tensors byte for byte as in the GGUF (no float copy), and a
    cache slot is sized by them: an expert at 4.5-6.6 bits per weight, not a float32 or bf16 one."""
    from strata.weights.gguf_reader import GGUFFile

    gguf_path, kinds = gguf_files(family, "Q4_K_M")
    folder = resolve_model_path(str(gguf_path), progress=False)
    modules = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]["modules"]
    store = ExpertStore(ensure_store(folder, progress=False))
    g = GGUFFile(gguf_path)
    for layer, e in store.entries:
        entry = store.entry((layer, e))
        want = 0
        for proj, ffn in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            kind = kinds[f"blk.{layer}.{ffn}.weight"]
            assert modules[f"model.layers.{layer}.mlp.experts.{e}.{proj}"] == kind
            want += HIDDEN * BLOCK_BYTES[kind]  # [256 rows] x one super-block each
        assert sum(t.nbytes for t in entry.tensors) == want
        buf = torch.empty(store.nbytes((layer, e)), dtype=torch.uint8)
        store.read_into((layer, e), memoryview(buf.numpy()))
        views = store.views((layer, e), buf)
        blocks = g.tensors[f"blk.{layer}.ffn_up_exps.weight"].raw.data[e]  # [out, row bytes] of expert e
        assert torch.equal(views["up_proj.qweight"], torch.from_numpy(blocks.copy()))
    facts = checkpoint_facts(folder)
    assert facts.slot_bytes <= 4096 + 3 * HIDDEN * BLOCK_BYTES["q6_k"]
    store.close()


@pytest.mark.slow
def test_llamacpp_quantized_moe_offloaded_equals_resident(tmp_path):
    """A Qwen3-MoE GGUF quantized to Q4_K_M by llama.cpp's own quantizer (llama-cpp-python) runs under a budget
    token for token as resident: `pytest -m slow tests/tiers/test_gguf_experts.py`."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _hf_model("qwen3_moe", tmp_path)
    f32 = write_gguf(tmp_path, tmp_path / "f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp_path / "q.gguf").encode(), params) == 0
    gguf_path = str(tmp_path / "q.gguf")
    ref, _ = generate(gguf_path)
    folder = resolve_model_path(gguf_path, progress=False)
    formats = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]["modules"]
    assert {f for n, f in formats.items() if ".experts." in n} <= set(GGUF_TYPES.values())
    out, llm = generate(gguf_path, memory_budget=budget_for(folder, 5))
    assert llm.engine.tier_stats()["expert_misses"] > 0
    assert out == ref
    llm.engine.tiers.close()
