"""Strata's own host costs on this machine (part of `strata probe`): what a kernel call and an expert matrix call of
the Python expert loop cost beyond their weight traffic.

Method: thin random models (the layer counts of TinyLlama-1.1B and OLMoE-1B-7B with widths cut to 128, so a step
reads a few MB of weights) are written to a temporary folder and run by the engine; the cost model prices the same
steps on the probed device with no per-call overhead, and the difference over the kernel calls it counts is the
overhead per call. The OLMoE twin decoded with and without the native MoE call gives the loop's cost per expert
matrix call; its prompt step gives the loop's cost per call in a prompt. `predict` uses these figures for the
machine they were measured on (the profile's `strata_host`); elsewhere it falls back to the figures in
`strata_fit.json`, measured on the development machine, and says so.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from strata.analysis.hardware import STRATA_HOST_KEYS

PREFILL = 128  # prompt tokens of the prefill measurement
TWINS = {
    "dense": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2048, "hidden_size": 128,
              "intermediate_size": 352, "num_hidden_layers": 22, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "moe": {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 2048, "hidden_size": 128,
            "intermediate_size": 64, "num_hidden_layers": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
            "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "clip_qkv": None},
}


def write_twin(cfg_dict: dict, folder: Path) -> Path:
    """config.json + model.safetensors with N(0, 0.02) bf16 weights (norms 1)."""
    from strata.models.registry import config_from_dict, model_class

    cfg = config_from_dict(cfg_dict)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_class(cfg)(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.ones(s, dtype=torch.bfloat16) if k.endswith("norm.weight")
               else (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg_dict))
    return folder


def time_twin(path: Path, decode: int, threads: int, native_moe: bool = True) -> dict:
    """Median decode step (ms) after a warm-up and the best of three PREFILL-token prompt steps (ms)."""
    from strata import LLM, SamplingParams
    from strata.layers.moe import SparseMoeBlock

    llm = LLM(str(path), progress=False, num_threads=threads, max_num_seqs=1, enable_prefix_caching=False)
    eng = llm.engine
    if not native_moe:
        for m in eng.model.modules():
            if isinstance(m, SparseMoeBlock):
                m.__dict__["_native"] = False  # SparseMoeBlock._native_experts: built once, False = none
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([list(range(10, 26))], greedy)
    llm.generate([list(range(100, 100 + PREFILL))], SamplingParams(temperature=0, max_tokens=1))
    prefills = []
    for i in range(3):  # a fresh prompt each time (no prefix cache): the prompt's step with its first token
        eng.add_request(list(range(200 + i, 200 + i + PREFILL)), SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        prefills.append(time.perf_counter() - t)
    eng.add_request(list(range(10, 26)), SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True))
    eng.step()
    steps = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
    return {"step_ms": statistics.median(steps) * 1e3, "prefill_ms": min(prefills) * 1e3}


def price_without_host_costs(shape, system, sc, prefill: bool = False) -> tuple[float, float, float]:
    """(seconds the cost model gives `sc`'s decode step, or its prompt with `prefill`, on `system` with no Strata
    host cost per call or per expert loop call; the step's kernel calls; the calls of its routed expert ops)."""
    from strata.analysis.efficiency import Efficiencies
    from strata.analysis.hardware import System
    from strata.analysis.operators import build_ops
    from strata.analysis.predict import predict

    bare = replace(system.device, strata_host={k: 0.0 for k in STRATA_HOST_KEYS})
    p = predict(shape, System(bare), sc, Efficiencies())
    step = p.prefill if prefill else p.decode
    calls = sum(s.launches for s in step.segments)
    n = sc.prompt if prefill else 1
    other = sum(op.launches for op in build_ops(shape, sc.prec, 1, n, 0 if prefill else sc.prompt) if not op.routed)
    return (p.ttft_s if prefill else p.tpot_s), calls, calls - other


def priced(name: str, device, looped: bool = False, prefill: bool = False) -> tuple[float, float, float]:
    """price_without_host_costs of a twin's decode step, or its PREFILL-token prompt, on `device`."""
    from strata.analysis.hardware import System
    from strata.analysis.placement import Scenario
    from strata.analysis.precision import Precisions
    from strata.analysis.shapes import shape_from_dict

    sc = Scenario(batch=1, prompt=PREFILL if prefill else 16, gen=64, engine="strata", offload="none",
                  prec=Precisions("bf16", activations="bf16", kv="bf16", head="bf16"))
    if looped:
        sc.offload, sc.cache_frac, sc.hit_rate = "experts", 1.0, 1.0
    return price_without_host_costs(shape_from_dict(TWINS[name], name=f"{name}-twin"), System(device), sc, prefill)


def probe_host(prof: dict, threads: int, decode: int = 48) -> dict:
    """Strata's host costs on this machine, priced against the device of probe profile `prof`."""
    from strata.analysis.hardware import device_from_dict

    device = device_from_dict("probe", prof)
    with tempfile.TemporaryDirectory(prefix="strata-probe-") as tmp:
        dense = write_twin(TWINS["dense"], Path(tmp) / "dense")
        moe = write_twin(TWINS["moe"], Path(tmp) / "moe")
        d = time_twin(dense, decode, threads)
        m = time_twin(moe, decode, threads)
        m_loop = time_twin(moe, decode, threads, native_moe=False)
    t0, calls, _ = priced("dense", device)
    overhead = max(d["step_ms"] - t0 * 1e3, 0.0) * 1e3 / calls
    _, _, n_native = priced("moe", device)
    _, _, n_loop = priced("moe", device, looped=True)
    # the loop's matrix calls replace the native calls (each at the per-call overhead); the rest of the step is equal
    loop = max(((m_loop["step_ms"] - m["step_ms"]) * 1e3 + n_native * overhead) / n_loop, 0.0)
    t0p, calls_p, n_pf = priced("moe", device, prefill=True)
    prefill_loop = max(((m["prefill_ms"] - t0p * 1e3) * 1e3 - (calls_p - n_pf) * overhead) / n_pf, 0.0)
    return {"overhead_us_per_call": round(overhead, 2), "loop_us_per_expert_call": round(loop, 2),
            "prefill_loop_us_per_expert_call": round(prefill_loop, 2), "threads": threads,
            "dense_step_ms": round(d["step_ms"], 3), "moe_step_ms": round(m["step_ms"], 3),
            "moe_loop_step_ms": round(m_loop["step_ms"], 3), "moe_prefill_ms": round(m["prefill_ms"], 3),
            "torch": torch.__version__}
