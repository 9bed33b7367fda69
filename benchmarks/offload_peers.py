"""The peers of benchmarks/offload.py, each run as a child process (inside its memory cgroup when there is one):
transformers + accelerate disk offload, and llama.cpp (llama-cpp-python, mmap) on a GGUF of the same weights.

Both report decode tok/s, their peak RSS and the bytes they made the kernel read from storage during decode
(/proc/self/io read_bytes: page faults of an mmap and O_DIRECT reads both count), so their I/O bound is
computed the same way as Strata's.
"""

from __future__ import annotations

import resource
import time


def proc_read_bytes() -> int:
    """Bytes this process (all threads) caused to be read from storage so far (/proc/self/io read_bytes)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def run_transformers(path: str, budget: int, prompt: list[int], decode: int, threads: int, offload: str,
                     time_cap_s: float) -> dict:
    """device_map="auto" with max_memory={"cpu": budget} and an offload folder; a manual greedy loop with the
    KV cache so prefill and each decode step are timed apart. Stops after `decode` tokens or `time_cap_s`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": budget}, offload_folder=offload).eval()
    load_s = time.perf_counter() - t
    placement: dict[str, int] = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        placement[str(dev)] = placement.get(str(dev), 0) + 1
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        t1 = time.perf_counter()
        r0, n = proc_read_bytes(), 0
        while n < decode - 1 and time.perf_counter() - t1 < time_cap_s:
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            n += 1
        t2 = time.perf_counter()
    return {"load_s": load_s, "prefill_s": t1 - t0, "decode_tok_s": n / (t2 - t1), "decode_tokens": n,
            "proc_read_bytes_per_token": (proc_read_bytes() - r0) / max(n, 1), "budget_bytes": budget,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device_map_modules": placement}


def run_llamacpp(gguf: str, prompt: list[int], decode: int, threads: int, budget: int | None,
                 repack: bool = True) -> dict:
    """bench_llamacpp (its own grandchild, which inherits this process's cgroup), no warm-up: cold start.
    repack=False keeps quantized weights in the file mapping (see peers/llamacpp.py _load)."""
    from benchmarks.peers.llamacpp import bench_llamacpp

    r = bench_llamacpp(gguf, prompt, decode - 1, threads, warmup=False, repack=repack)
    return {"load_s": r["load_s"], "prefill_s": len(prompt) / r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
            "decode_tokens": decode - 1, "proc_read_bytes_per_token": r.get("decode_read_bytes", 0) / (decode - 1),
            "budget_bytes": budget, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
