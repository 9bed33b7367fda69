"""Conversion of an HF safetensors checkpoint into the expert-major store (format: see store.py).

Expert tensors are found by name: `...layers.L.(block_sparse_moe|mlp).experts.E.<rest>` (Mixtral w1/w3/w2,
Qwen-MoE/OLMoE gate/up/down_proj, and any quantized companions such as .qweight/.scales), or stacked
`...layers.L.(...).experts.<name>` tensors with a leading expert dimension. Bytes are copied verbatim
(storage dtype or quantization kept); the source checkpoint is only read. The store is built under a
temporary name, fsynced, marked COMPLETE and renamed into place, so an interrupted conversion never
leaves a store that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from strata.layers.quant_native import cache_dir
from strata.tiers.store import ALIGN, FORMAT, TENSOR_ALIGN, VERSION, StoreError, align
from strata.weights.loader import quantized

log = logging.getLogger("strata.tiers")

_PER_EXPERT = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(.+)$")
_STACKED = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.([A-Za-z_][^.]*(?:\.[^.]+)*)$")


@dataclass
class _SrcTensor:
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int
    dtype: str
    shape: list[int]


def read_safetensors_header(path: Path) -> dict[str, _SrcTensor]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise StoreError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{path}: invalid safetensors header") from None
    out = {}
    for name, d in meta.items():
        if name == "__metadata__":
            continue
        b, e = d["data_offsets"]
        out[name] = _SrcTensor(path, 8 + n + b, e - b, d["dtype"], list(d["shape"]))
    return out


def _expert_tensors(src: Path) -> dict[tuple[int, int], list[tuple[str, _SrcTensor]]]:
    files = sorted(src.glob("*.safetensors")) if src.is_dir() else [src]
    if not files:
        raise StoreError(f"{src}: no *.safetensors files (expected an HF checkpoint folder)")
    experts: dict[tuple[int, int], list[tuple[str, _SrcTensor]]] = {}
    for f in files:
        for name, t in read_safetensors_header(f).items():
            m = _PER_EXPERT.match(name)
            if m:
                experts.setdefault((int(m[1]), int(m[2])), []).append((m[3], t))
                continue
            m = _STACKED.match(name)
            if m and t.shape:
                per = t.nbytes // t.shape[0]
                for e in range(t.shape[0]):
                    experts.setdefault((int(m[1]), e), []).append(
                        (m[2], _SrcTensor(t.file, t.start + e * per, per, t.dtype, t.shape[1:])))
    if not experts:
        raise StoreError(f"{src}: no expert tensors found (expected names like "
                         "'model.layers.0.mlp.experts.0.gate_proj.weight')")
    return experts


_FLOAT_CODES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def is_expert_tensor(name: str) -> bool:
    """True for a routed expert's tensor (what the store holds and the loader must skip)."""
    return bool(_PER_EXPERT.match(name) or _STACKED.match(name))


@dataclass
class CheckpointFacts:
    """Sizes read from the safetensors headers alone (no tensor data), for planning before converting."""

    non_expert_bytes: int
    non_expert_float_bytes: int  # of those, float tensors: the loader converts them to the compute dtype
    non_expert_float_elems: int
    expert_bytes: int
    num_experts: int  # (layer, expert) pairs
    slot_bytes: int  # the largest expert as laid out in the store
    lowbit_bytes: int = 0  # every expert's resident low-bit copy (--miss-fallback lowbit, tiers/lowbit.py)
    slot_classes: tuple[tuple[int, int], ...] = ()  # (padded bytes, experts) per distinct size, largest first

    def resident_bytes(self, dtype_bytes: int | None = None) -> int:
        """Bytes of everything but routed experts once loaded with floats of `dtype_bytes` (None: as stored)."""
        if dtype_bytes is None:
            return self.non_expert_bytes
        return self.non_expert_bytes - self.non_expert_float_bytes + self.non_expert_float_elems * dtype_bytes


def checkpoint_facts(src: str | os.PathLike) -> CheckpointFacts:
    src = Path(src)
    files = sorted(src.glob("*.safetensors")) if src.is_dir() else [src]
    non_expert = float_elems = float_bytes = 0
    for f in files:
        for name, t in read_safetensors_header(f).items():
            if is_expert_tensor(name):
                continue
            non_expert += t.nbytes
            if t.dtype in _FLOAT_CODES and not quantized(name):  # quantized scales keep their stored dtype
                float_elems += t.nbytes // _FLOAT_CODES[t.dtype]
                float_bytes += t.nbytes
    experts = _expert_tensors(src)
    from strata.tiers.lowbit import lowbit_nbytes

    padded = [_layout(tensors)[2] for tensors in experts.values()]
    formats = _expert_formats(src)
    lowbit = sum(lowbit_nbytes(n, t.dtype, tuple(t.shape), t.nbytes, formats.get((key, n.rpartition(".")[0])))
                 for key, ts in experts.items() for n, t in ts)
    classes = tuple((b, padded.count(b)) for b in sorted(set(padded), reverse=True))
    return CheckpointFacts(non_expert, float_bytes, float_elems,
                           sum(t.nbytes for ts in experts.values() for _, t in ts), len(experts), max(padded),
                           lowbit, classes)


def _expert_formats(src: Path) -> dict:
    """((layer, expert), linear name inside the expert) -> QuantFormat, from config.json's quantization_config."""
    from strata.quant.format import MODULE_METHODS, read_quantization_config

    config = src / "config.json" if src.is_dir() else src.parent / "config.json"
    if not config.is_file():
        return {}
    try:
        modules = read_quantization_config(json.loads(config.read_text()), MODULE_METHODS)
    except ValueError:
        raise StoreError(f"{config}: not valid JSON") from None
    out = {}
    for name, fmt in modules.items():
        m = _PER_EXPERT.match(name + ".x")
        if m:
            out[((int(m[1]), int(m[2])), m[3][: -len(".x")])] = fmt
    return out


def _layout(tensors: list[tuple[str, _SrcTensor]]) -> tuple[list[tuple[str, _SrcTensor, int]], int, int]:
    """An expert's tensors in store order with their offsets (64-byte aligned), its length and padded size."""
    out, pos = [], 0
    for name, t in sorted(tensors, key=lambda x: x[0]):
        pos = align(pos, TENSOR_ALIGN)
        out.append((name, t, pos))
        pos += t.nbytes
    return out, pos, align(max(pos, 1))


def _source_facts(src: Path) -> dict:
    files = sorted(src.glob("*.safetensors")) if src.is_dir() else [src]
    return {f.name: {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files}


def _write_expert(dst: BinaryIO, key: tuple[int, int], tensors_in: list[tuple[str, _SrcTensor]], offset: int,
                  handles: dict[Path, BinaryIO], stack: contextlib.ExitStack) -> dict:
    """Appends one expert laid out by _layout (padding bytes are zeros); returns its index entry."""
    placed, length, padded = _layout(tensors_in)
    tensors, crc, pos = [], 0, 0
    for name, t, at in placed:
        if at > pos:
            crc = zlib.crc32(bytes(at - pos), crc)
            dst.write(bytes(at - pos))
        if t.file not in handles:
            handles[t.file] = stack.enter_context(open(t.file, "rb"))  # noqa: SIM115 - closed by the stack
        fh = handles[t.file]
        fh.seek(t.start)
        data = fh.read(t.nbytes)
        if len(data) != t.nbytes:
            raise StoreError(f"{t.file}: truncated; tensor {name} of expert {key} needs "
                             f"{t.nbytes} bytes at {t.start}, got {len(data)}")
        crc = zlib.crc32(data, crc)
        dst.write(data)
        tensors.append({"name": name, "dtype": t.dtype, "shape": t.shape, "offset": at, "nbytes": t.nbytes})
        pos = at + t.nbytes
    dst.write(bytes(padded - length))
    return {"layer": key[0], "expert": key[1], "offset": offset, "length": length, "padded": padded,
            "crc32": crc, "tensors": tensors}


def convert(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, progress: bool = True) -> Path:
    """Writes the expert-major store for checkpoint `src` at `out` (a directory). Returns `out`."""
    src, out = Path(src), Path(out)
    if (out / "COMPLETE").exists() and not overwrite:
        raise StoreError(f"{out}: an expert store already exists (pass overwrite=True to rebuild)")
    experts = _expert_tensors(src)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries, cursor = [], 0
    keys = sorted(experts)
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc="expert store", unit="expert", leave=False)
    try:
        with contextlib.ExitStack() as stack, open(tmp / "experts.bin", "wb") as dst:
            handles: dict[Path, BinaryIO] = {}
            for key in it:
                entry = _write_expert(dst, key, experts[key], cursor, handles, stack)
                entries.append(entry)
                cursor += entry["padded"]
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written survives an interruption
        raise
    index = {"format": FORMAT, "version": VERSION, "alignment": ALIGN, "data_file": "experts.bin",
             "data_bytes": cursor, "source": {"path": str(src.resolve()), "files": _source_facts(src)},
             "num_layers": 1 + max(k[0] for k in keys), "num_experts": 1 + max(k[1] for k in keys),
             "slot_bytes": max(e["padded"] for e in entries), "experts": entries}
    (tmp / "index.json").write_text(json.dumps(index))
    (tmp / "COMPLETE").write_text(f"{zlib.crc32((tmp / 'index.json').read_bytes())}\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def default_store_dir(src: str | os.PathLike) -> Path:
    """Stores live outside the checkpoint (which may be read-only), in quant_native.cache_dir()."""
    src = Path(src).resolve()
    tag = zlib.crc32(str(src).encode()) & 0xFFFFFFFF
    return cache_dir() / "experts" / f"{src.name}-{tag:08x}"


def ensure_store(src: str | os.PathLike, out: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Converts on first use; reconverts when the checkpoint's files changed since the store was built."""
    out = Path(out) if out is not None else default_store_dir(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same store: wait, then reuse it
        if (out / "COMPLETE").exists():
            try:
                facts = json.loads((out / "index.json").read_text())["source"]["files"]
            except (OSError, ValueError, KeyError, TypeError):
                facts = None
            if facts == _source_facts(Path(src)):
                return out
            log.warning("expert store %s is stale (checkpoint %s changed); rebuilding", out, src)
        return convert(src, out, overwrite=True, progress=progress)
