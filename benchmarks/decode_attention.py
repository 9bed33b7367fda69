"""One decode query per head over a KV cache: torch SDPA vs Strata's grouped matmuls (strata.layers.attention),
and, over a paged cache (context scattered over cache slots), the torch path's gather + grouped matmuls vs the
native kernel reading through the slot table (cpu_decode_attention.c).

    .venv/bin/python benchmarks/decode_attention.py [--keys 160] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from strata.layers import attention
from strata.layers.attention import AttentionMetadata, _decode_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=160)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = torch.randn(args.q_heads, args.head_dim, dtype=torch.bfloat16)
    k = torch.randn(args.kv_heads, args.keys, args.head_dim, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    num_slots = 4 * args.keys
    k_cache = torch.randn(num_slots, args.kv_heads, args.head_dim, dtype=torch.bfloat16)  # [S, Hkv, D]
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(0))[: args.keys]
    meta = AttentionMetadata([0], [1], [args.keys], slots[-1:], [slots])

    def torch_paged():  # what paged_attention does without the native kernel
        kk = k_cache.index_select(0, slots).transpose(0, 1)  # [Hkv, K, D]
        vv = v_cache.index_select(0, slots).transpose(0, 1)
        return _decode_attention(q, kk, vv)

    cases = {
        "sdpa": lambda: F.scaled_dot_product_attention(q[None, :, None], k[None], v[None], enable_gqa=True),
        "strata": lambda: _decode_attention(q, k, v),
        "torch paged": torch_paged,
    }
    if attention.native_lib() is not None:
        cases["native paged"] = lambda: attention._native_decode(q[None], k_cache, v_cache, meta)
        ref = torch_paged()[0].float()
        print(f"native vs torch paged: max |difference| {(cases['native paged']()[0].float() - ref).abs().max():.4f}")
    diff = (cases["sdpa"]()[0, :, 0].float() - cases["strata"]()[0].float()).abs().max().item()
    for _ in range(2):  # two rounds back to back: the spread shows the machine's noise
        for name, fn in cases.items():
            for _ in range(20):
                fn()
            t = time.perf_counter()
            for _ in range(args.calls):
                fn()
            print(f"{name:12s} {(time.perf_counter() - t) / args.calls * 1e6:8.1f} us/call")
    print(f"max |difference| {diff:.4f} (bf16)")


if __name__ == "__main__":
    main()
