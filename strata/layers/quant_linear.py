"""QuantLinear: a linear layer whose weight is stored in one of the formats of strata/quant/format.py.

Buffers carry the on-disk names (`qweight`, `scales`, [`zeros`], [`bias`]) so a checkpoint loads by HF name
with `load_state_dict(..., assign=True)`; `post_load()` then prepares the kernel layout once. Kernels, in
order of preference (STRATA_QUANT_BACKEND=native|torch|reference forces one):

    native     quant_cpu*.c through quant_native.py: a GEMV for up to `gemv_max_rows` rows; up to
               `gemm_max_rows` rows a GEMM that dequantizes weight tiles into cache and runs bf16 dot products
               on them (quant_cpu_gemm.c); more rows dequantize the weight to bf16 (in row tiles) and run
               torch's bf16 matmul (oneDNN; AMX where the CPU has it).
    torch      torch._weight_int8pack_mm / aten._weight_int4pack_mm_for_cpu (repacked at load time);
               fp8 and nested int8 dequantize with torch ops.
    reference  dequantize_weight + F.linear in float32. Slow, always correct.

Activations run in bf16 (fp32 activations make torch's quantized kernels 10-60x slower): the input is cast
to bf16 and the output back to the input dtype. With `quantized_activations = "int8"` (the engine's
`--quantized-activations int8`, set by `set_quantized_activations`), the native batched path (more than
`gemv_max_rows` rows) quantizes each input row to int8 in blocks of 32 and runs integer dot products on
AVX-512 VNNI instead (quant_cpu_a8.c; formats in quant_native.A8_KINDS); decode rows keep the bf16 GEMV. Except for GGUF's q8_0, q4_1, q5_0 and q5_1 blocks, which exist to hold a
GGUF file's weights exactly: with float32 input they compute in float32 (a GEMV at about 2^-16 of float32
arithmetic, or the exact dequantized weight in a float32 matmul), so a float32 model gives the logits of
transformers on the same file; give them bf16 input (`--dtype bfloat16`) for speed.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from strata.errors import ConfigError, UnsupportedError, WeightsError
from strata.layers import quant_native
from strata.quant.format import (
    MXFP4_GROUP,
    QuantFormat,
    check_tensors,
    dequantize_weight,
    quantize_weight,
    unpack_nibbles,
)

BACKENDS = ("native", "torch", "reference")
ACTIVATION_MODES = ("none", "int8")  # --quantized-activations
GEMV_MAX_ROWS = 4  # above this many rows the GEMM beat the GEMVs on most layers measured (quant_gemm.py)
GEMM_MAX_ROWS = 64  # above this many rows, dequantize + oneDNN's bf16 matmul may beat the GEMM (quant_gemm.py)
# Without AVX-512 (the AVX2 build of the kernels) torch's bf16 matmul runs several times slower than its float32 one,
# and the native GEMMs are the AVX-512 code on half-width registers: from this many rows, float32 tiles of the weight
# meet float32 activations in torch's float32 matmul (Q4_1 576 x 1536: 1.5x the native kernels at 16 rows, 2.7x at
# 64-256, on a Zen 3 core)
AVX2_FLOAT32_MIN_ROWS = 16
# the same for the formats of the AVX2 kernel on int16 activations (quant_cpu_q32x16_avx2.c, 8 x rows at a time from
# 7 rows on), which beat the float32 tiles (one Zen 3 core, weights from memory) up to 32 rows on SmolLM2's Q4_1/Q8_0
# projections and LM head (1.0-1.1x there, 0.9x at 48), up to 48 on K-quants [2048, 2048] (1.1-1.2x; 0.8-1.0x at
# 64), below 48 on int4 [2048, 2048], [1024, 2048] and [2048, 1024] (1.0-1.1x at 48, 0.85-0.9x at 64; its float32
# tiles exact and dequantized natively, dequant_int4_f32) and up to 64 on int8 [2048, 2048] (1.3x; 1.0x at 96)
AVX2_BLOCK32_FLOAT32_MIN_ROWS = 40
AVX2_KQUANT_FLOAT32_MIN_ROWS = 56
AVX2_INT4_FLOAT32_MIN_ROWS = 48
AVX2_INT8_FLOAT32_MIN_ROWS = 80
AVX2_FP8_FLOAT32_MIN_ROWS = 48  # fp8, K a multiple of 16 (quant_cpu_gemv16_avx2.c): faster up to 32 rows, not at 64
# float32 input to GGUF's 32-weight blocks on AVX2: rows that the native float32 GEMV (quant_cpu_q32_avx2.c, 4 rows
# a pass) takes before the float32 tiles in torch's float32 matmul. SmolLM2's Q4_1 projections and Q8_0 LM head, a
# Zen 3 VM: on one thread the GEMV ran 1.4-2.4x the tiles at 6 rows and 0.9-1.7x at 8, 0.6-1.0x at 16; on two,
# where every tile costs the matmul's and the dequantization's barriers, 1.8-3.3x at 12 rows, 1.4-2.6x at 16,
# 1.0-1.8x at 24 and 0.7-1.5x at 32
AVX2_F32_GEMV_MAX_ROWS_1_THREAD = 8
AVX2_F32_GEMV_MAX_ROWS = 24
# the same on AVX-512 (quant_cpu_q32.c, x split into two bf16 halves): against the tiles, weights from memory, 2
# threads (benchmarks/quant_gemm.py --float32), SmolLM2's [1536, 576] and [576, 1536] Q4_1 and [49152, 576] Q8_0 LM
# head took 0.57-0.77x the tiles' CPU time at 16 rows, 0.66-0.93x at 24, 0.73-0.99x at 32, 0.89-1.26x at 64. Kept at
# 16, where the GEMV and the tiles agree within test_quant_gemm's 1e-5 (at 24 one element of the test's rows
# differed by 1.26e-5). The float32 one-call decode's row limit too.
F32_GEMV_MAX_ROWS = 16
# bf16 bytes dequantized per tile of the batched path. One thread: small tiles that stay in cache for the
# matmul are fastest. Several threads: every tile costs two OpenMP barriers, and on shared cores a preempted
# thread stalls each one, so few large tiles win (benchmarks/quant_kernels.py, docs/quantization.md).
TILE_BYTES_1_THREAD = 4 << 20
TILE_BYTES = 64 << 20
# float dtypes that hold every value of the key exactly: a cast into them can be undone
_WIDER = {
    torch.float8_e4m3fn: {torch.float16, torch.bfloat16, torch.float32, torch.float64},
    torch.float16: {torch.float32, torch.float64},
    torch.float32: {torch.float64},
}
_scratch = threading.local()
_warned_narrowing: list[str] = []
log = logging.getLogger(__name__)  # one reusable bf16 tile buffer per thread (no page faults per call)


def _tile_buffer(numel: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    name = f"buf_{dtype}"
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:numel]


def default_backend() -> str:
    forced = os.environ.get("STRATA_QUANT_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise UnsupportedError(f"STRATA_QUANT_BACKEND: expected one of {BACKENDS}, found {forced!r}")
        return forced
    return "native" if quant_native.native_lib() is not None else "torch"


def avx2_float32_min_rows(fmt: QuantFormat, in_features: int) -> int:
    """Rows from which the AVX2 build runs a layer of this format as float32 tiles in torch's float32 matmul."""
    kind = fmt.kind
    if not quant_native.avx2_own_gemv(kind, fmt.group_size, in_features):
        return AVX2_FLOAT32_MIN_ROWS
    if kind in quant_native.KQUANT_KINDS:
        return AVX2_KQUANT_FLOAT32_MIN_ROWS
    return {"int4": AVX2_INT4_FLOAT32_MIN_ROWS, "int8": AVX2_INT8_FLOAT32_MIN_ROWS,
            "fp8": AVX2_FP8_FLOAT32_MIN_ROWS}.get(kind, AVX2_BLOCK32_FLOAT32_MIN_ROWS)


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) with W quantized. Build empty (possibly on meta), load buffers, call post_load."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat | str, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt = QuantFormat.parse(fmt)
        if self.fmt.blocks is not None:
            self.fmt.blocks.check_width(self.fmt.kind, in_features)
        if self.fmt.kind == "mxfp4" and in_features % MXFP4_GROUP:
            raise UnsupportedError(f"format mxfp4: in_features must be a multiple of {MXFP4_GROUP}, got {in_features}")
        self.module_name = ""  # set by swap_linears, used in error messages
        for suffix, (shape, dt) in self.fmt.tensor_specs(out_features, in_features).items():
            self.register_buffer(suffix, torch.empty(shape, dtype=dt, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.backend: str | None = None
        self.gemv_max_rows = GEMV_MAX_ROWS
        self.gemm_max_rows = GEMM_MAX_ROWS  # for the formats of quant_native.WEIGHT_KINDS (not mxfp4)
        # the AVX2 build: from this many rows, float32 tiles in torch's float32 matmul
        self.avx2_float32_min_rows = avx2_float32_min_rows(self.fmt, in_features)
        self._k: dict[str, torch.Tensor] = {}  # kernel-layout tensors made by post_load
        self._gemv = None  # native GEMV with bound weight pointers (quant_native.gemv_call), set by post_load
        self.quantized_activations = "none"  # "int8": the batched path runs on int8 activations (ACTIVATION_MODES)
        self._a8 = False  # whether this layer has an int8-activation kernel here, set by post_load

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: QuantFormat | str, backend: str | None = None) -> QuantLinear:
        has_bias = linear.bias is not None
        q = cls(linear.in_features, linear.out_features, fmt, bias=has_bias,
                dtype=linear.bias.dtype if has_bias else torch.bfloat16)
        for name, t in quantize_weight(linear.weight.detach(), q.fmt).items():
            setattr(q, name, t)
        if has_bias:
            q.bias = linear.bias.detach().clone()
        q.post_load(backend)
        return q

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                f"bias={self.bias is not None}, backend={self.backend}")

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s) for s in self.fmt.tensor_specs(1, 1)}

    def post_load(self, backend: str | None = None) -> None:
        """Check the loaded buffers and build the kernel layout for `backend` (default: best available)."""
        name = self.module_name or "QuantLinear"
        if any(t.is_meta for t in self._tensors().values()):
            raise WeightsError(f"{name}: post_load called before the weights were loaded")
        self._restore_dtypes(name)
        tensors = self._tensors()
        check_tensors(tensors, self.fmt, self.out_features, self.in_features, name)
        self.backend = backend or default_backend()
        kind, k = self.fmt.kind, {}
        if self.backend == "native" and (quant_native.native_lib() is None or kind not in quant_native.KERNELS):
            self.backend = "torch"
        if self.backend == "native":
            k = {s: t.contiguous() for s, t in tensors.items()}
            if kind == "fp8":
                k["qweight"] = k["qweight"].view(torch.uint8)
            k["bias"] = None if self.bias is None else self.bias.float().contiguous()
        self._gemv = None
        self._a8 = self.backend == "native" and quant_native.a8_available(quant_native.native_lib(), kind)
        if self.backend == "native" and self.fmt.padded_in(self.in_features) == self.in_features:
            self._gemv = quant_native.gemv_call(quant_native.native_lib(), kind, k, self.in_features,
                                                self.out_features, self.fmt.group_size, k["bias"])
        elif self.backend == "torch":
            k = self._torch_layout(tensors)
        self._k = k

    def _restore_dtypes(self, name: str) -> None:
        """Undo a loader's cast of float tensors (scales, fp8 codes) to the model dtype (warn if it rounded)."""
        for suffix, (_, dtype) in self.fmt.tensor_specs(self.out_features, self.in_features).items():
            t = getattr(self, suffix)
            if t.dtype == dtype or not (t.is_floating_point() and dtype.is_floating_point):
                continue
            if t.dtype not in _WIDER[dtype] and not _warned_narrowing:
                _warned_narrowing.append(name)  # once per process: every layer of a model has the same cause
                log.warning("%s.%s: stored as %s but loaded as %s, which rounded it; load quantized tensors "
                            "(qweight, scales, zeros) without casting to the model dtype", name, suffix, dtype, t.dtype)
            setattr(self, suffix, t.to(dtype))

    def _torch_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind, n = self.fmt.kind, self.out_features
        if kind == "int8":  # the int8pack kernel needs K % 16 == 0 (it crashes otherwise): pad columns
            kp = -(-self.in_features // 16) * 16
            return {"w": F.pad(tensors["qweight"], (0, kp - self.in_features)).contiguous(), "k": kp,
                    "s": tensors["scales"].to(torch.bfloat16)}
        if kind == "int4" and self.fmt.group_size <= 256:  # int4pack needs N % 16 == 0: pad rows
            n16 = -(-n // 16) * 16
            q = F.pad(unpack_nibbles(tensors["qweight"]).to(torch.int32), (0, 0, 0, n16 - n))
            s = F.pad(tensors["scales"].float(), (0, 0, 0, n16 - n))
            z = F.pad(tensors["zeros"].float(), (0, 0, 0, n16 - n)) if self.fmt.asym else torch.full_like(s, 8.0)
            sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous()  # [Kp/G, N16, 2]
            return {"w": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), "sz": sz.to(torch.bfloat16),
                    "k": self.fmt.padded_in(self.in_features)}
        return {}  # fp8, nested, K-quants, int4 with big groups: dequantize per call

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The float weight [out, in] (for tests, tiers, and the batched path of the torch backend)."""
        return dequantize_weight(self._tensors(), self.fmt, self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gemv = self._gemv
        if (gemv is not None and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] <= self.gemv_max_rows
                and x.is_contiguous() and x.device.type == "cpu"):  # decode fast path: one native call
            y = torch.empty(x.shape[0], self.out_features, dtype=torch.bfloat16)  # [M, N]
            gemv(x.data_ptr(), x.shape[0], y.data_ptr())
            return y
        if self.backend is None:
            raise WeightsError(f"{self.module_name or 'QuantLinear'}: call post_load() after loading weights")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._a8 and self.quantized_activations == "int8" and x2.shape[0] > self.gemv_max_rows:
            return self._int8_activations(x2).to(x.dtype).reshape(*lead, self.out_features)
        if x.dtype == torch.float32 and self.fmt.kind in quant_native.BLOCK32_KINDS:
            return self._float32(x2.contiguous()).reshape(*lead, self.out_features)
        if self.backend == "reference":
            y = F.linear(x2.float(), self.dequantize(torch.float32))
            y = y if self.bias is None else y + self.bias.float()
            return y.to(x.dtype).reshape(*lead, self.out_features)
        xb = x2.to(torch.bfloat16)
        y = self._native(xb) if self.backend == "native" else self._torch(xb)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _pad_x(self, xb: torch.Tensor, k: int) -> torch.Tensor:
        return (F.pad(xb, (0, k - self.in_features)) if k != self.in_features else xb).contiguous()

    def _native(self, xb: torch.Tensor) -> torch.Tensor:
        lib, fmt, k = quant_native.native_lib(), self.fmt, self._k
        kp = fmt.padded_in(self.in_features)
        xb = self._pad_x(xb, kp)
        if xb.shape[0] <= self.gemv_max_rows:
            return quant_native.gemv(lib, fmt.kind, xb, k, self.out_features, fmt.group_size, k["bias"])
        n = self.out_features
        avx2 = quant_native.isa() == "avx2"
        if avx2 and xb.shape[0] >= self.avx2_float32_min_rows:
            y = self._float32_tiles(xb.float()).to(torch.bfloat16)
            return y if self.bias is None else y + self.bias.to(torch.bfloat16)
        # on AVX2 the GEMM up to the float32 tiles, whatever gemm_max_rows says: the bf16 tiles below would run in
        # torch's bf16 matmul, several times slower there
        if (xb.shape[0] <= self.gemm_max_rows or avx2) and fmt.kind in quant_native.WEIGHT_KINDS:
            return quant_native.gemm(lib, fmt.kind, xb, k, n, fmt.group_size, k["bias"])
        # many rows: dequantize row tiles into a reused bf16 buffer and matmul each (oneDNN bf16 / AMX)
        tile_bytes = TILE_BYTES_1_THREAD if torch.get_num_threads() == 1 else TILE_BYTES
        rows = max(16, min(n, tile_bytes // (2 * kp)))
        buf = _tile_buffer(rows * kp)
        y = torch.empty(xb.shape[0], n, dtype=torch.bfloat16)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            tile = quant_native.dequantize_rows(lib, fmt.kind, k, n0, n1, fmt.group_size,
                                                buf[: (n1 - n0) * kp].view(n1 - n0, kp))
            y[:, n0:n1] = F.linear(xb, tile)
        return y if self.bias is None else y + self.bias.to(torch.bfloat16)

    def _int8_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> [M, N] with x quantized to int8 per 32 values (bf16 out; float32 out for float32 x)."""
        out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
        xq = self._pad_x(x.to(out_dtype), self.fmt.padded_in(self.in_features))
        return quant_native.gemm_a8(quant_native.native_lib(), self.fmt.kind, xq, self._k, self.out_features,
                                    self.fmt.group_size, self._k["bias"], out_dtype)

    def _float32(self, x: torch.Tensor) -> torch.Tensor:
        """GGUF 32-weight blocks (quant_native.BLOCK32_KINDS) with float32 x [M, K] -> float32 [M, N] (see the module docstring)."""
        if self.backend != "native":
            y = F.linear(x, self.dequantize(torch.float32))
        elif x.shape[0] <= self._f32_gemv_max_rows():
            return quant_native.gemv_f32(quant_native.native_lib(), self.fmt.kind, x, self._k, self.out_features,
                                         self._k["bias"])
        else:
            y = self._float32_tiles(x)
        return y if self.bias is None else y + self.bias.float()

    def _f32_gemv_max_rows(self) -> int:
        """Rows of float32 input that _float32 gives the native GEMV (more: the float32 tiles)."""
        if self.gemv_max_rows < GEMV_MAX_ROWS:  # a path forced (tests): as set
            return self.gemv_max_rows
        if quant_native.isa() != "avx2":
            return max(self.gemv_max_rows, F32_GEMV_MAX_ROWS)
        one = torch.get_num_threads() == 1
        return max(self.gemv_max_rows, AVX2_F32_GEMV_MAX_ROWS_1_THREAD if one else AVX2_F32_GEMV_MAX_ROWS)

    def _float32_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 [M, K'] (K' the weight's padded row width) -> float32 [M, N], no bias: row tiles of the weight in
        float32 (exact for quant_native.F32_DEQUANT_KINDS, else its bf16 dequantization widened), each in a float32
        matmul."""
        lib, fmt, n, k = quant_native.native_lib(), self.fmt, self.out_features, x.shape[1]
        rows = max(16, min(n, TILE_BYTES_1_THREAD // (4 * k)))
        exact = fmt.kind in quant_native.F32_DEQUANT_KINDS
        # the scratch buffers are written by the kernels only: no torch op updates them in place, so that one
        # made under torch.inference_mode serves outside it too
        buf = _tile_buffer(rows * k, torch.float32 if exact else torch.bfloat16)
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            tile = buf[: (n1 - n0) * k].view(n1 - n0, k)
            if exact:
                quant_native.dequantize_rows_f32(lib, fmt.kind, self._k, n0, n1, tile, fmt.group_size)
            else:
                tile = quant_native.dequantize_rows(lib, fmt.kind, self._k, n0, n1, fmt.group_size, tile).float()
            y[:, n0:n1] = F.linear(x, tile)
        return y

    def _torch(self, xb: torch.Tensor) -> torch.Tensor:
        k, fmt = self._k, self.fmt
        if fmt.kind == "int8":
            y = torch._weight_int8pack_mm(self._pad_x(xb, k["k"]), k["w"], k["s"])
        elif "w" in k:  # int4pack
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._pad_x(xb, k["k"]), k["w"], fmt.group_size,
                                                           k["sz"])[:, : self.out_features]
        else:
            y = F.linear(xb, self.dequantize(torch.bfloat16))
        return y if self.bias is None else y + self.bias.to(torch.bfloat16)


def quantized_linear(x: torch.Tensor, fmt: QuantFormat, tensors: dict[str, torch.Tensor], out_features: int,
                     in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [.., in] -> [.., out] = x @ W^T (+ bias), W held in `fmt` as `tensors` (qweight, scales, ...) by a
    module that keeps them under other names (gpt-oss's MXFP4 experts, whose tensors the expert tiers pass in
    per call). bf16 activations in few rows run the format's native GEMV; otherwise the weight is dequantized
    for this call only, in the activations' dtype (float32 activations stay float32)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # [M, in]
    lib = quant_native.native_lib()
    if (lib is not None and fmt.kind in quant_native.KERNELS and x2.shape[0] <= GEMV_MAX_ROWS
            and x.dtype == torch.bfloat16 and fmt.padded_in(in_features) == in_features and x.device.type == "cpu"):
        w = {s: t.contiguous() for s, t in tensors.items()}
        b = None if bias is None else bias.float().contiguous()
        y = quant_native.gemv(lib, fmt.kind, x2.contiguous(), w, out_features, fmt.group_size, b)
    else:
        w = dequantize_weight(tensors, fmt, out_features, in_features, x.dtype)  # [out, in]
        y = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
    return y.to(x.dtype).reshape(*lead, out_features)


def swap_linears(model: nn.Module, modules: dict[str, str | QuantFormat]) -> None:
    """Replace each named nn.Linear (may live on meta) by an empty QuantLinear of the given format.

    Bias presence, dtype and device are kept. Load the quantized buffers afterwards, then call
    `post_load()` on every QuantLinear (see `post_load_all`).
    """
    for name, fmt in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise WeightsError(f"quantization_config.modules names {name!r}, which the model does not have") from None
        if isinstance(old, QuantLinear):
            continue
        if not isinstance(old, nn.Linear):
            raise WeightsError(f"quantization_config.modules: {name!r} is a {type(old).__name__}, expected nn.Linear")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        has_bias = old.bias is not None
        new = QuantLinear(old.in_features, old.out_features, fmt, bias=has_bias,
                          dtype=old.bias.dtype if has_bias else torch.bfloat16, device=old.weight.device)
        new.module_name = name
        setattr(parent, attr, new)


def set_quantized_activations(model: nn.Module, mode: str) -> int:
    """Set `quantized_activations` on every QuantLinear of `model`, fused projections included; returns how many
    of them have an int8-activation kernel on this machine (0 without AVX-512 VNNI: they keep bf16)."""
    if mode not in ACTIVATION_MODES:
        raise ConfigError(f"--quantized-activations must be one of {', '.join(ACTIVATION_MODES)}, got {mode!r}")
    layers = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            layers[id(m)] = m
        for v in vars(m).values():  # FusedProjection (fusion.py) holds a QuantLinear outside the module tree
            q = getattr(v, "quant", None)
            if isinstance(q, QuantLinear):
                layers[id(q)] = q
    for q in layers.values():
        q.quantized_activations = mode
    return sum(q._a8 for q in layers.values())


def post_load_all(model: nn.Module, backend: str | None = None) -> None:
    """Call post_load on every QuantLinear of `model` (after load_state_dict)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.post_load(backend)
