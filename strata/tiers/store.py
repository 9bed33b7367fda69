"""The expert-major store on disk: its format and the reader (O_DIRECT into preallocated slots).

A store directory (written by store_convert.py) holds:
    experts.bin   every expert's tensors back to back; each expert starts at a 4 KiB-aligned offset and
                  is padded to a 4 KiB multiple, so loading one expert is one aligned read;
    index.json    per expert: offset, length, padded length, crc32, and per tensor name/dtype/shape/offset
                  (tensor offsets relative to the expert, 64-byte aligned);
    COMPLETE      written last: a directory without it is an interrupted conversion.
`ExpertStore.read_into` reads one expert into a caller-owned aligned buffer (a cache slot) with O_DIRECT,
falling back to buffered reads (logged once) where the filesystem refuses O_DIRECT; `views` exposes
the tensors of a slot as torch views, without copies.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

from strata.errors import StrataError

log = logging.getLogger("strata.tiers")

ALIGN = 4096
TENSOR_ALIGN = 64
FORMAT = "strata-expert-store"
VERSION = 1
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class StoreError(StrataError):
    """The expert store is missing, incomplete, stale or corrupted."""


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def alloc_aligned(nbytes: int, populate: bool = False) -> tuple[mmap.mmap, torch.Tensor]:
    """Page-aligned anonymous memory (what O_DIRECT needs) as (mmap, uint8 tensor [nbytes]).

    populate=True faults every page in now, so the pool's memory is taken up front, not per token.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate and hasattr(mmap, "MAP_POPULATE"):
        flags |= mmap.MAP_POPULATE
    mm = mmap.mmap(-1, max(nbytes, ALIGN), flags=flags)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)[:nbytes]  # [nbytes]


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    offset: int
    length: int
    padded: int
    crc32: int
    tensors: tuple[TensorEntry, ...]


class ExpertStore:
    """Reader of a store directory. Thread-safe: reads are positional (preadv) on one descriptor.

    verify: "always" checks the expert's crc32 on every read (bytes changed on disk after a first read would
    otherwise give silently wrong output), "first" on its first read only, "never" skips (store_verify.py).
    """

    def __init__(self, path: str | os.PathLike, verify: str = "always", direct: bool = True):
        from strata.tiers.store_verify import check_fields, read_index

        self.path = Path(path)
        if verify not in ("first", "always", "never"):
            raise StoreError(f"expert store verify mode must be first, always or never, got {verify!r}")
        self.verify_mode = verify
        index_path = self.path / "index.json"
        if not (self.path / "COMPLETE").exists():
            what = "does not exist" if not self.path.exists() else "is incomplete (no COMPLETE marker)"
            raise StoreError(f"{self.path}: expert store {what}; run the conversion again")
        index = read_index(self.path)
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise StoreError(f"{index_path}: expected format {FORMAT} v{VERSION}, got "
                             f"{index.get('format')!r} v{index.get('version')!r}; reconvert the checkpoint")
        check_fields(index, self.path)
        self.index = index
        self.data_path = self.path / index["data_file"]
        size = self.data_path.stat().st_size if self.data_path.exists() else -1
        if size != index["data_bytes"]:
            raise StoreError(f"{self.data_path}: expected {index['data_bytes']} bytes, found {size}; "
                             "the store is truncated, reconvert the checkpoint")
        self.entries: dict[tuple[int, int], ExpertEntry] = {}
        for e in index["experts"]:
            ts = tuple(TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"])
                       for t in e["tensors"])
            self.entries[(e["layer"], e["expert"])] = ExpertEntry(
                e["layer"], e["expert"], e["offset"], e["length"], e["padded"], e["crc32"], ts)
        self.num_layers, self.num_experts = index["num_layers"], index["num_experts"]
        self.slot_bytes = index["slot_bytes"]
        # distinct expert sizes, largest first: more than one when a --mixed plan gave experts different formats
        self.class_bytes = sorted({e.padded for e in self.entries.values()}, reverse=True)
        self._class = {k: self.class_bytes.index(e.padded) for k, e in self.entries.items()}
        self.direct_io = False
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.data_path, os.O_RDONLY | os.O_DIRECT)
                self.direct_io = True
            except OSError as e:
                log.warning("O_DIRECT refused for %s (%s); using buffered reads", self.data_path, e.strerror)
        if self._fd < 0:
            self._fd = os.open(self.data_path, os.O_RDONLY)
        self._verified: set[tuple[int, int]] = set()

    # ---- facts ------------------------------------------------------------------------------------
    def keys(self) -> list[tuple[int, int]]:
        return list(self.entries)

    def entry(self, key: tuple[int, int]) -> ExpertEntry:
        e = self.entries.get(key)
        if e is None:
            raise StoreError(f"{self.path}: no expert {key[1]} in layer {key[0]}")
        return e

    def nbytes(self, key: tuple[int, int]) -> int:
        """Bytes one read of this expert moves from disk."""
        return self.entry(key).padded

    def size_class(self, key: tuple[int, int]) -> int:
        """Index into class_bytes of this expert's size."""
        return self._class[key]

    @property
    def total_bytes(self) -> int:
        return self.index["data_bytes"]

    # ---- reading ----------------------------------------------------------------------------------
    def _pread(self, buf: memoryview, offset: int) -> int:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def read_into(self, key: tuple[int, int], buf: memoryview) -> int:
        """Reads expert `key` into buf (>= its padded size; 4 KiB-aligned for O_DIRECT). Returns bytes read."""
        e = self.entry(key)
        if len(buf) < e.padded:
            raise StoreError(f"{self.path}: slot of {len(buf)} bytes is smaller than expert {key} ({e.padded})")
        view = buf[: e.padded]
        try:
            n = self._pread(view, e.offset)
        except OSError as err:
            if not (self.direct_io and err.errno == errno.EINVAL):
                raise StoreError(f"{self.data_path}: read of layer {key[0]} expert {key[1]} failed: "
                                 f"{err.strerror}") from None
            log.warning("O_DIRECT read refused for %s (%s); using buffered reads", self.data_path, err.strerror)
            os.close(self._fd)
            self._fd = os.open(self.data_path, os.O_RDONLY)
            self.direct_io = False
            n = self._pread(view, e.offset)
        if n != e.padded:
            raise StoreError(f"{self.data_path}: short read for layer {key[0]} expert {key[1]}: "
                             f"expected {e.padded} bytes at offset {e.offset}, got {n}")
        if self.verify_mode == "always" or (self.verify_mode == "first" and key not in self._verified):
            self.check(key, buf)
        return n

    def check(self, key: tuple[int, int], buf: memoryview) -> None:
        from strata.tiers.store_verify import check_expert

        e = self.entry(key)
        check_expert(self.data_path, key, buf, e.length, e.crc32)
        self._verified.add(key)

    def views(self, key: tuple[int, int], slot: torch.Tensor) -> dict[str, torch.Tensor]:
        """The expert's tensors as views of `slot` (uint8 [>= padded]); no copies."""
        out = {}
        for t in self.entry(key).tensors:
            raw = slot[t.offset : t.offset + t.nbytes]  # [nbytes] uint8
            out[t.name] = raw.view(DTYPES[t.dtype]).view(t.shape)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
