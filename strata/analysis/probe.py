"""`strata probe`: measure this machine's ceilings and write them as a hardware profile (class cpu-measured).

Memory bandwidth: torch sums rotating over more than 256 MiB (so caches cannot serve it), 1 thread and all.
Disk: O_DIRECT reads of a temporary file by read size (buffered fallback, noted). GEMV (M=1, weights
rotated) and GEMM (M=256) per precision with torch, and Strata's own decode GEMV per weight format
(`gemv_strata_<fmt>_gbs`: the cost model streams Strata's weights at these rates on a probed machine). Quick mode uses tiny sizes for tests.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from strata.fileio import write_json_atomic

DEFAULT_PATH = Path.home() / ".cache" / "strata" / "hardware.json"


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def memory_bandwidth(total_mib: int, threads: int) -> float:
    """GB/s of fp32 reads, summing chunks in turn over `total_mib` MiB."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunks = [torch.ones(total_mib * (1 << 20) // 4 // 4) for _ in range(4)]  # 4 x total/4 MiB
        def run():
            for c in chunks:
                c.sum()
        run()
        t = _best(run, 3)
        return total_mib * (1 << 20) / t / 1e9
    finally:
        torch.set_num_threads(old)


def disk_bandwidth(file_mib: int, sizes_kib: list[int], directory: str | None = None) -> dict:
    """Read bandwidth by read size from a temp file; O_DIRECT where the filesystem allows it."""
    out: dict = {"by_read_kib": {}, "direct": True}
    fd, path = tempfile.mkstemp(prefix="strata-probe-", dir=directory)
    try:
        block = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(file_mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        size = file_mib << 20
        try:
            rfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            rfd, out["direct"] = os.open(path, os.O_RDONLY), False
        if not out["direct"] or not hasattr(os, "O_DIRECT"):
            out["direct"] = False
            out["note"] = "O_DIRECT unavailable: buffered reads (page cache may inflate them)"
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            for kib in sizes_kib:
                n = kib << 10
                buf = mmap.mmap(-1, n)  # page-aligned, as O_DIRECT needs
                t = time.perf_counter()
                read = 0
                for off in range(0, size - n + 1, n):
                    read += os.preadv(rfd, [buf], off)
                dt = time.perf_counter() - t
                out["by_read_kib"][str(kib)] = read / dt / 1e9 if dt > 0 else 0.0
                buf.close()
        except OSError as e:  # e.g. EINVAL on filesystems without O_DIRECT support
            out["direct"] = False
            out["note"] = f"O_DIRECT read failed ({e.strerror}); no disk figure"
        finally:
            os.close(rfd)
    finally:
        os.unlink(path)
    return out


def gemv_gemm(k: int, n: int, copies: int, m_big: int) -> dict:
    """Weight-streaming GEMV GB/s and GEMM TFLOP/s per precision."""
    res: dict = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
        x1 = torch.randn(1, k).to(dtype)
        xb = torch.randn(m_big, k).to(dtype)
        def gemv(ws=ws, x1=x1):
            for w in ws:
                F.linear(x1, w)
        gemv()
        t = _best(gemv, 3)
        res[f"gemv_{name}_gbs"] = copies * n * k * ws[0].element_size() / t / 1e9
        F.linear(xb, ws[0])
        t = _best(lambda xb=xb, w=ws[0]: F.linear(xb, w), 3)
        res[f"gemm_{name}_tflops"] = 2 * m_big * n * k / t / 1e12
        res[f"gemm_{name}_m{m_big}_gbs"] = n * k * ws[0].element_size() / t / 1e9
        if name == "bf16":  # a few-row matmul over rotating weights: the rate a prompt's expert calls stream at
            x16 = torch.randn(16, k).to(dtype)
            def gemm16(ws=ws, x16=x16):
                for w in ws:
                    F.linear(x16, w)
            gemm16()
            res["gemm_bf16_m16_gbs"] = copies * n * k * 2 / _best(gemm16, 3) / 1e9
    if hasattr(torch, "_weight_int8pack_mm"):
        wq = [torch.randint(-127, 127, (n, k), dtype=torch.int8) for _ in range(copies)]
        scale = torch.ones(n, dtype=torch.bfloat16)
        x1 = torch.randn(1, k, dtype=torch.bfloat16)
        try:
            def gemv8():
                for w in wq:
                    torch._weight_int8pack_mm(x1, w, scale)
            gemv8()
            res["gemv_int8_gbs"] = copies * n * k / _best(gemv8, 3) / 1e9
        except RuntimeError:
            pass
    res.update(strata_kernels(k, n, copies))
    return res


def strata_bf16_gemv_gbs(k: int, n: int, copies: int) -> float:
    """GB/s of Strata's bf16 decode GEMV over `copies` n x k weights in turn (more than the caches hold)."""
    from strata.layers.linear import linear

    x1 = torch.randn(1, k, dtype=torch.bfloat16)
    ws = [torch.randn(n, k).to(torch.bfloat16) for _ in range(copies)]
    def run16():
        for w in ws:
            linear(x1, w)
    run16()
    return copies * n * k * 2 / _best(run16, 3) / 1e9


def strata_kernels(k: int, n: int, copies: int) -> dict:
    """Strata's own kernels per weight format: decode GEMV GB/s and the expand pass of the quantized prefill
    (`strata_expand`). The cost model prices Strata's weights at these."""
    from strata.layers.quant_linear import QuantLinear

    res: dict = {"gemv_strata_bf16_gbs": strata_bf16_gemv_gbs(k, n, copies)}
    x1 = torch.randn(1, k, dtype=torch.bfloat16)
    lin = torch.nn.Linear(k, n, bias=False)
    for fmt in ("int8", "int4-g64", "fp8"):
        first = QuantLinear.from_float(lin, fmt)
        layers = [first]
        for _ in range(copies - 1):
            q = QuantLinear(k, n, fmt)
            for name, t in first._tensors().items():
                setattr(q, name, t.clone())
            q.post_load()
            layers.append(q)
        def runq(layers=layers):
            for q in layers:
                q(x1)
        runq()
        res[f"gemv_strata_{fmt}_gbs"] = copies * first.fmt.nbytes(n, k) / _best(runq, 3) / 1e9
    res.update(strata_expand(min(k, 2048)))
    return res


def strata_expand(d: int) -> dict:
    """G weights/s of the expand pass of Strata's quantized prefill (quant_native.dequantize_rows, the pass
    QuantLinear runs before its bf16 GEMM), per format, on a d x d matrix whose bf16 tile stays in cache (8 MiB at
    d = 2048). A tile that outgrows the cache costs its memory traffic on top (the cost model adds it from llc_mb)."""
    from strata.layers import quant_native
    from strata.layers.quant_linear import QuantLinear

    res: dict = {}
    lin = torch.nn.Linear(d, d, bias=False)
    lib = quant_native.native_lib()
    if lib is None:
        return res
    for fmt in ("int8", "int4-g64", "fp8"):
        q = QuantLinear.from_float(lin, fmt)
        kp = q.fmt.padded_in(d)
        buf = torch.empty(d, kp, dtype=torch.bfloat16)

        def expand(q=q, buf=buf):
            quant_native.dequantize_rows(lib, q.fmt.kind, q._k, 0, d, q.fmt.group_size, buf)

        expand()
        res[f"dequant_strata_{fmt}_gelem_s"] = d * d / _best(expand, 9) / 1e9
    return res


def llc_mb() -> float:
    """Last-level cache of CPU 0 in MiB (Linux sysfs), 0 where unknown."""
    best = 0.0
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            size = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(size[-1:], 1 / 2**20)
        best = max(best, float(size.rstrip("KMG") or 0) * mult)
    return best


def run_probe(quick: bool = False, directory: str | None = None, engine: bool = True) -> dict:
    threads = torch.get_num_threads()
    mem_mib = 16 if quick else 512
    prof: dict = {"key": "probe", "name": f"this machine ({os.cpu_count()} CPUs, probed)", "class": "cpu-measured",
                  "aliases": [], "source": "strata probe" + (" --quick" if quick else ""),
                  "memory_gb": psutil.virtual_memory().total / 1e9, "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    bw1 = memory_bandwidth(mem_mib, 1)
    bwn = memory_bandwidth(mem_mib, threads)
    disk = disk_bandwidth(4 if quick else 256, [256, 1024] if quick else [256, 1024, 4096, 16384], directory)
    m_big = 16 if quick else 256
    mm = gemv_gemm(256 if quick else 4096, 256 if quick else 4096, 2 if quick else 12, m_big)
    prof["bandwidth_by_threads_gbs"] = {"1": bw1, str(threads): bwn}
    prof["bandwidth_gbs"] = max(bwn, mm.get("gemv_bf16_gbs", 0.0))
    prof["peak_tflops"] = {"fp32": mm["gemm_fp32_tflops"], "fp16": mm["gemm_bf16_tflops"],
                           "int8": mm["gemm_bf16_tflops"]}
    prof["kernels"] = mm
    # share of the bandwidth a bf16 matmul streams weights at, by activation rows (cost model: Device.gemm_eff)
    prof["gemm_eff"] = {str(m): min(mm[f"gemm_bf16_m{m}_gbs"] / prof["bandwidth_gbs"], 1.0)
                        for m in sorted({16, m_big}) if m > 1 and f"gemm_bf16_m{m}_gbs" in mm}
    by = {int(k): v for k, v in disk["by_read_kib"].items() if v > 0}
    if by:
        big = max(by)
        seq = by[big] * 1e9
        small = min(by)
        # fit latency from the smallest read: t = lat + size/seq
        lat = max((small << 10) / (by[small] * 1e9) - (small << 10) / seq, 0.0)
        prof["flash"] = {"bw_gbs": seq / 1e9, "latency_us": lat * 1e6, "size_gb": psutil.disk_usage("/").total / 1e9,
                         "direct_io": disk["direct"], "by_read_kib": disk["by_read_kib"]}
    if disk.get("note"):
        prof["disk_note"] = disk["note"]
    prof["threads"] = threads
    prof["llc_mb"] = llc_mb()
    prof["power_w"], prof["idle_w"] = 0.0, 0.0
    if engine:  # Strata's own host costs per call on this machine (host_probe.py), priced on the figures above
        from strata.analysis.host_probe import probe_host

        prof["strata_host"] = probe_host(prof, threads, decode=8 if quick else 48)
    return prof


def write_profile(prof: dict, path: str | os.PathLike) -> str:
    path = write_json_atomic(path, prof, indent=1)
    return str(path)
