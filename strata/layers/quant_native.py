"""Builds, caches and calls the SIMD kernels in quant_cpu*.c and cpu_*.c (ctypes, no torch headers).

The kernels are written with AVX-512 (BF16, and VNNI where present) intrinsics; on a CPU with AVX2, FMA and
F16C but no AVX-512 the same sources build through quant_cpu_avx2.h, which gives those intrinsics on 256-bit
registers. The library is compiled once per machine with the system C compiler (one process per source file,
side by side; seconds with AVX-512, about a minute on two cores for AVX2) into $STRATA_CACHE_DIR or
~/.cache/strata, named by a hash of the sources and flags, written to a temporary file and renamed.
`native_lib()` returns None when the CPU has neither instruction set, no compiler is found, the build fails,
or STRATA_NATIVE=0; callers then use the torch paths in quant_linear.py, which are always correct.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch  # loaded first so the library binds to torch's OpenMP runtime
from tqdm import tqdm

from strata.errors import UnsupportedError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / n for n in (
    "quant_cpu_gemv8.c", "quant_cpu_gemv4.c", "quant_cpu_gemv16.c", "quant_cpu_gemv16_avx2.c", "quant_cpu_dequant.c", "quant_cpu_kquant.c",
    "quant_cpu_mxfp4.c",
    "quant_cpu_q32.c", "quant_cpu_q32_avx2.c", "quant_cpu_q32x16_avx2.c", "quant_cpu_a8.c", "quant_cpu_gemm.c",
    "cpu_decode_attention.c", "cpu_decode_attention_avx2.c",
    "cpu_norm.c", "cpu_rotary.c", "cpu_moe.c", "cpu_decoder.c", "cpu_argmax.c", "cpu_sample.c",
    "cpu_decode_inputs.c")]
HEADER = HERE / "quant_cpu.h"
AVX2_HEADER = HERE / "quant_cpu_avx2.h"  # the AVX-512 intrinsics the kernels use, on AVX2
ABI = 16  # must match strata_qk_abi() in quant_cpu_dequant.c
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c",
          "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "f16c"}
# Without AVX-512 the same sources build on AVX2 through quant_cpu_avx2.h (quant_cpu_a8.c's int8-activation kernels
# need VNNI: a8_supported() is 0 there)
AVX2_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-Wno-psabi", "-fopenmp", "-shared", "-fPIC"]
AVX2_CPU_FLAGS = {"avx2", "fma", "f16c"}
VNNI_FLAG = "avx512_vnni"  # when present, the int8-activation kernels (quant_cpu_a8.c) are compiled in
COMPILE_TIMEOUT_S = 300  # one source file (the AVX2 build of the largest takes about 15 s)
KQUANT_KINDS = {"q4_k": 0, "q5_k": 1, "q6_k": 2}  # the `kind` argument of gemv_kq / dequant_kq
# Format family -> the WK_* code of quant_cpu.h: the `kind` argument of gemm_dq and of the MoE kernels (cpu_moe.c)
WEIGHT_KINDS = {"bf16": 0, "int8": 1, "fp8": 2, "int8-nested": 3, "int4": 4, "q4_k": 5, "q5_k": 6, "q6_k": 7,
                "q8_0": 8, "q4_1": 9, "q5_0": 10, "q5_1": 11}
BLOCK32_KINDS = {"q8_0": 0, "q4_1": 1, "q5_0": 2, "q5_1": 3}  # the `kind` argument of gemv_qb / dequant_qb


def avx2_own_gemv(kind: str, group_size: int | None, in_features: int) -> bool:
    """Whether the AVX2 build runs this format's GEMV on a kernel of its own rather than the translated AVX-512 one
    (the C entry points check the same): GGUF's blocks and K-quants, int4 with groups of a multiple of 32 and int8
    with rows of a multiple of 32 (quant_cpu_q32x16_avx2.c, int16 activations), fp8 with rows of a multiple of 16
    (quant_cpu_gemv16_avx2.c). All of them keep the weights exact."""
    if kind in BLOCK32_KINDS or kind in KQUANT_KINDS:
        return True
    if kind == "int4":
        return group_size is not None and group_size % 32 == 0
    return kind == "int8" and in_features % 32 == 0 or kind == "fp8" and in_features % 16 == 0

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "gemv_int8": [_P, _I, _I, _P, _I, _P, _P, _P],
    "gemv_fp8": [_P, _I, _I, _P, _I, _P, _P, _P],
    "gemv_nested": [_P, _I, _I, _P, _I, _I, _P, _P, _P],
    "gemv_int4": [_P, _I, _I, _P, _I, _I, _P, _P, _P, _P],
    "gemv_bf16": [_P, _I, _I, _P, _I, _P, _P, _I],
    "gemv_kq": [_I, _P, _I, _I, _P, _I, _P, _P],
    "dequant_kq": [_I, _P, _I, _I, _I, _P],
    "gemv_mxfp4": [_P, _I, _I, _P, _I, _P, _P, _P],
    "dequant_mxfp4": [_P, _I, _P, _I, _I, _P],
    "gemv_qb": [_I, _P, _I, _I, _P, _I, _P, _P],
    "dequant_qb": [_I, _P, _I, _I, _I, _P],
    "gemv_qb_f32": [_I, _P, _I, _I, _P, _I, _P, _P],
    "gemm_dq": [_I, _P, _I, _I, _P, _P, _P, _I, _I, _P, _P],
    "gemm_a8": [_I, _P, _I, _I, _I, _P, _P, _P, _I, _I, _P, _P, _I],
    "dequant_qb_f32": [_I, _P, _I, _I, _I, _P],
    "dequant_int8": [_P, _I, _P, _I, _I, _P],
    "dequant_fp8": [_P, _I, _P, _I, _I, _P],
    "dequant_nested": [_P, _I, _I, _P, _I, _I, _P],
    "dequant_int4": [_P, _I, _I, _P, _P, _I, _I, _P],
    "dequant_int4_f32": [_P, _I, _I, _P, _P, _I, _I, _P],
    "decode_attention_bf16": [_P, _I, _I, _I, _I, _P, _P, _P, _P, ctypes.c_float, _P],
    "decode_attention_f32": [_P, _I, _I, _I, _I, _P, _P, _P, _P, ctypes.c_float, _P],
    "rms_norm_bf16": [_P, _P, _P, _I, _I, ctypes.c_float, _P, _P],
    "argmax_rows_f32": [_P, _I, _I, _I, _P],
    "select_rows_f32": [_P, _I, _I, _I, _P, ctypes.c_float],
    "draw_rows_f32": [_P, _I, _I, _P, _P],
    "softmax_rows_f32": [_P, _I, _I, _P, _P],
    "rope_bf16": [_P, _I, _I, _I, _I, _P, _P, _P],
    "moe_decode_batch": [_I, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P],
    "moe_decode_batch_f32": [_I, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P],
    "moe_take_counts": [_P],
    "decode_slots": [_P, _P, _I, _I, _P, _P, _P, _P],
    "decode_logits_bf16": [_P, _P, _P, _I, _I, ctypes.c_float, _P, _I, _P, _P],
    "decode_layers": [_P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float, ctypes.c_float, _P, _P, _P, _P, _P, _P],
    "decode_layers_f32": [_P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float, ctypes.c_float, _P, _P, _P, _P, _P, _P],
}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_supported() -> bool:
    return isa() is not None


def isa() -> str | None:
    """The instruction set the kernels build for here: "avx512" (with BF16), "avx2", or None (torch paths)."""
    if os.environ.get("STRATA_ISA") == "avx2" and AVX2_CPU_FLAGS <= cpu_flags():  # the AVX2 build on any CPU
        return "avx2"
    if CPU_FLAGS <= cpu_flags():
        return "avx512"
    return "avx2" if AVX2_CPU_FLAGS <= cpu_flags() else None


STALE_BUILD_S = 7 * 86400  # a build of other sources older than this is removed


def cache_dir() -> Path:
    root = os.environ.get("STRATA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "strata")
    return Path(root)


def compile_library(stem: str, sources: list[Path], cc: str, flags: list[str], libs: list[str] = ()) -> Path:
    """`stem-HASH.so` in cache_dir() built from `sources` (the hash covers them and the command), compiled
    once into a temporary file then renamed. Builds of other sources untouched for STALE_BUILD_S are removed:
    a younger one may belong to another checkout or process that is loading it now."""
    text = b"".join(p.read_bytes() for p in sources)
    digest = hashlib.sha256(text + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        _compile_and_link(cc, flags, [p for p in sources if p.suffix == ".c"], tmp, libs)
        os.replace(tmp, target)
        now = time.time()
        for stale in target.parent.glob(f"{stem}-*.so"):  # builds of other sources
            try:
                if stale != target and now - stale.stat().st_mtime > STALE_BUILD_S:
                    stale.unlink()
            except FileNotFoundError:  # removed by another process meanwhile
                pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _compile_and_link(cc: str, flags: list[str], c_files: list[Path], out: str, libs) -> None:
    """One object per source, compiled side by side on the machine's cores, then linked into `out`."""
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as objs, tqdm(
            total=len(c_files), desc="building native kernels", unit="file",
            disable=len(c_files) < 4 or not log.isEnabledFor(logging.WARNING)) as bar:
        compile_flags = [f for f in flags if f != "-shared"]

        def one(i_src):
            i, src = i_src
            obj = os.path.join(objs, f"{i}-{src.stem}.o")
            subprocess.run([cc, *compile_flags, "-c", str(src), "-o", obj], check=True, capture_output=True,
                           timeout=COMPILE_TIMEOUT_S)
            bar.update(1)
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(one, enumerate(c_files)))
        subprocess.run([cc, *flags, *objects, "-o", out, *libs], check=True, capture_output=True,
                       timeout=COMPILE_TIMEOUT_S)


def find_compiler() -> str | None:
    """$CC, else gcc or cc on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build(cc: str) -> Path:
    if isa() == "avx2":
        return compile_library("quant_cpu_avx2", [HEADER, AVX2_HEADER, *SOURCES], cc, AVX2_CFLAGS, ["-lm"])
    flags = CFLAGS + (["-mavx512vnni"] if VNNI_FLAG in cpu_flags() else [])
    return compile_library("quant_cpu", [HEADER, *SOURCES], cc, flags, ["-lm"])


@lru_cache(maxsize=1)
def native_lib() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (reason logged once) when it cannot be used here."""
    if os.environ.get("STRATA_NATIVE", "1") == "0":
        return None
    if not cpu_supported():
        log.info("quantized kernels: CPU lacks AVX2, FMA and F16C, using torch paths")
        return None
    cc = find_compiler()
    if cc is None:
        log.warning("quantized kernels: no C compiler found, using slower torch paths")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("quantized kernels: build failed (%s %s), using slower torch paths", e, detail[-500:])
        return None
    if lib.strata_qk_abi() != ABI:
        log.warning("quantized kernels: ABI mismatch, using slower torch paths")
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.a8_supported.restype = ctypes.c_int64
    lib.select_rows_f32.restype = lib.draw_rows_f32.restype = lib.argmax_rows_f32.restype = ctypes.c_int64
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class FormatKernels:
    """The C functions of one format family. `weight_args(tensors, group_size)` gives the arguments its weight
    adds between the row count (N for gemv, K for dequant) and the tail (bias, y / n0, n1, out)."""

    gemv: str
    dequant: str
    weight_args: Callable[[dict[str, torch.Tensor], int | None], tuple]
    lead: tuple = ()  # arguments before all others (the K-quant kernels take their block type first)


# Format family (QuantFormat.kind) -> its kernels. A family without an entry is refused, never guessed.
KERNELS: dict[str, FormatKernels] = {
    "int8": FormatKernels("gemv_int8", "dequant_int8", lambda w, g: (_ptr(w["scales"]),)),
    "fp8": FormatKernels("gemv_fp8", "dequant_fp8", lambda w, g: (_ptr(w["scales"]),)),
    "int8-nested": FormatKernels("gemv_nested", "dequant_nested", lambda w, g: (g, _ptr(w["scales"]))),
    "int4": FormatKernels("gemv_int4", "dequant_int4",
                          lambda w, g: (g, _ptr(w["scales"]), _ptr(w.get("zeros")))),
    **{kind: FormatKernels("gemv_kq", "dequant_kq", lambda w, g: (), (code,)) for kind, code in KQUANT_KINDS.items()},
    "mxfp4": FormatKernels("gemv_mxfp4", "dequant_mxfp4", lambda w, g: (_ptr(w["scales"]),)),
    **{kind: FormatKernels("gemv_qb", "dequant_qb", lambda w, g: (), (code,)) for kind, code in BLOCK32_KINDS.items()},
}


def kernels_for(kind: str) -> FormatKernels:
    kernels = KERNELS.get(kind)
    if kernels is None:
        raise UnsupportedError(f"quantized format family {kind!r}: no native kernel (known: {', '.join(KERNELS)})")
    return kernels


def gemv(lib: ctypes.CDLL, kind: str, x: torch.Tensor, w: dict[str, torch.Tensor], out_features: int,
         group_size: int | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x bf16 [M, K'] contiguous (K' = padded in_features for grouped kinds) -> bf16 [M, out_features].

    `w` holds the on-disk tensors, contiguous, with fp32 per-channel scales; `bias` is fp32 or None.
    """
    kernels = kernels_for(kind)
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.bfloat16)
    getattr(lib, kernels.gemv)(*kernels.lead, _ptr(x), m, k, _ptr(w["qweight"]), out_features,
                               *kernels.weight_args(w, group_size), _ptr(bias), _ptr(y))
    return y


def gemv_call(lib: ctypes.CDLL, kind: str, w: dict[str, torch.Tensor], in_features: int, out_features: int,
              group_size: int | None, bias: torch.Tensor | None) -> Callable[[int, int, int], None]:
    """`gemv` with the weight pointers bound once: f(x_ptr, rows, y_ptr) for a contiguous bf16 x [rows, K]
    (K = in_features, no padding needed) into y bf16 [rows, out_features]. The tensors of `w` and `bias` must
    outlive f (QuantLinear keeps them in `_k`); saves the per-call argument work at decode."""
    kernels = kernels_for(kind)
    fn, lead, args = getattr(lib, kernels.gemv), kernels.lead, kernels.weight_args(w, group_size)
    q, b, n, k = _ptr(w["qweight"]), _ptr(bias), out_features, in_features
    return lambda x, m, y: fn(*lead, x, m, k, q, n, *args, b, y)


def dequantize_rows(lib: ctypes.CDLL, kind: str, w: dict[str, torch.Tensor], n0: int, n1: int,
                    group_size: int | None, out: torch.Tensor) -> torch.Tensor:
    """Rows [n0, n1) of the weight -> `out` bf16 [n1 - n0, K'], scales applied."""
    kernels = kernels_for(kind)
    getattr(lib, kernels.dequant)(*kernels.lead, _ptr(w["qweight"]), out.shape[1], *kernels.weight_args(w, group_size),
                                  n0, n1, _ptr(out))
    return out


def gemv_f32(lib: ctypes.CDLL, kind: str, x: torch.Tensor, w: dict[str, torch.Tensor], out_features: int,
             bias: torch.Tensor | None) -> torch.Tensor:
    """BLOCK32_KINDS only: x float32 [M, K] contiguous -> float32 [M, out_features], at about 2^-16 of float32
    arithmetic (each x split into two bf16 halves; quant_cpu_q32.c)."""
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.float32)
    lib.gemv_qb_f32(BLOCK32_KINDS[kind], _ptr(x), m, k, _ptr(w["qweight"]), out_features, _ptr(bias), _ptr(y))
    return y


# the kinds dequantize_rows_f32 takes: exact float32 weights for the float32 tiles of CPUs without AVX-512 BF16
F32_DEQUANT_KINDS = frozenset({*BLOCK32_KINDS, "int4"})


def dequantize_rows_f32(lib: ctypes.CDLL, kind: str, w: dict[str, torch.Tensor], n0: int, n1: int,
                        out: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """F32_DEQUANT_KINDS only: rows [n0, n1) of the weight -> `out` float32 [n1 - n0, K'], exactly the reference
    (int4: K' the padded row width, group_size its groups)."""
    if kind == "int4":
        lib.dequant_int4_f32(_ptr(w["qweight"]), out.shape[1], group_size, _ptr(w["scales"]), _ptr(w.get("zeros")),
                             n0, n1, _ptr(out))
        return out
    lib.dequant_qb_f32(BLOCK32_KINDS[kind], _ptr(w["qweight"]), out.shape[1], n0, n1, _ptr(out))
    return out


# Format family -> the `fmt` argument of gemm_a8 (quant_cpu_a8.c): the kinds with int8-activation kernels
A8_KINDS = {"int4": 0, "int8-nested": 1, "int8": 2, "q8_0": 3, "q4_1": 4, "q4_k": 5, "q5_k": 6, "q6_k": 7}


def a8_available(lib: ctypes.CDLL | None, kind: str) -> bool:
    """Whether `kind` has an int8-activation kernel here (the library was built with AVX-512 VNNI)."""
    return lib is not None and kind in A8_KINDS and bool(lib.a8_supported())


def gemm_a8(lib: ctypes.CDLL, kind: str, x: torch.Tensor, w: dict[str, torch.Tensor], out_features: int,
            group_size: int | None, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x bf16 or float32 [M, K'] contiguous (K' = padded in_features for grouped kinds) -> out_dtype [M, N]
    (bf16 or float32), with x quantized to int8 in blocks of 32 inside the call (quant_cpu_a8.c)."""
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=out_dtype)
    lib.gemm_a8(A8_KINDS[kind], _ptr(x), int(x.dtype == torch.float32), m, k, _ptr(w["qweight"]), _ptr(w.get("scales")),
                _ptr(w.get("zeros")), out_features, group_size or 0, _ptr(bias), _ptr(y),
                int(out_dtype == torch.float32))
    return y


def gemm(lib: ctypes.CDLL, kind: str, x: torch.Tensor, w: dict[str, torch.Tensor], out_features: int,
         group_size: int | None, bias: torch.Tensor | None) -> torch.Tensor:
    """`gemv` for many rows (kinds in WEIGHT_KINDS): weight tiles dequantized to bf16 in cache, then a bf16 GEMM
    on them (quant_cpu_gemm.c); the same bf16 weights as dequantize_rows + a bf16 matmul."""
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.bfloat16)
    lib.gemm_dq(WEIGHT_KINDS[kind], _ptr(x), m, k, _ptr(w["qweight"]), _ptr(w.get("scales")), _ptr(w.get("zeros")),
                out_features, group_size or 0, _ptr(bias), _ptr(y))
    return y
