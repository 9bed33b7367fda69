"""Integrity of an expert store: the index must match the checksum its COMPLETE marker recorded and hold
well-formed fields, and every expert read must match its crc32. A store that fails either check is marked
for rebuild (its COMPLETE marker removed), so the next start converts the checkpoint again instead of
failing the same way forever; the error says so.

zlib.crc32 runs at several GB/s, faster than the O_DIRECT reads it checks (docs/reliability.md), and it
releases the GIL, so the default verifies every read, not just the first read of each expert.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from strata.tiers.store import StoreError

_INT_FIELDS = ("data_bytes", "num_layers", "num_experts", "slot_bytes")
_EXPERT_INT_FIELDS = ("layer", "expert", "offset", "length", "padded", "crc32")
_TENSOR_INT_FIELDS = ("offset", "nbytes")


class StoreCorruptError(StoreError):
    """The expert store's index or data does not match its checksums."""


def mark_for_rebuild(path: Path) -> str:
    """Removes the COMPLETE marker (the next start rebuilds the store); returns what the user should do."""
    try:
        (path / "COMPLETE").unlink(missing_ok=True)
    except OSError:  # a read-only cache directory
        return f"delete {path} and start again to rebuild it from the checkpoint"
    return "it is marked for rebuild: the next start converts the checkpoint again"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_fields(index: dict, where: Path) -> None:
    def bad(field: str, v, what: str):
        raise StoreCorruptError(f"{where}: field '{field}' must be {what}, got {v!r}; "
                                f"{mark_for_rebuild(where.parent)}")

    for f in _INT_FIELDS:
        if not _int(index.get(f)):
            bad(f, index.get(f), "an integer >= 0")
    if not isinstance(index.get("data_file"), str) or "/" in index["data_file"]:
        bad("data_file", index.get("data_file"), "a file name in the store")
    experts = index.get("experts")
    if not isinstance(experts, list):
        bad("experts", experts, "a list")
    for i, e in enumerate(experts):
        if not isinstance(e, dict):
            bad(f"experts[{i}]", e, "an object")
        for f in _EXPERT_INT_FIELDS:
            if not _int(e.get(f)):
                bad(f"experts[{i}].{f}", e.get(f), "an integer >= 0")
        if e["offset"] + e["padded"] > index["data_bytes"] or e["length"] > e["padded"]:
            bad(f"experts[{i}].offset", e["offset"], f"inside the {index['data_bytes']}-byte data file")
        tensors = e.get("tensors")
        if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
            bad(f"experts[{i}].tensors", tensors, "a list of objects")
        for j, t in enumerate(tensors):
            name = f"experts[{i}].tensors[{j}]"
            if not all(_int(t.get(f)) for f in _TENSOR_INT_FIELDS) or t["offset"] + t["nbytes"] > e["length"]:
                bad(name, {f: t.get(f) for f in _TENSOR_INT_FIELDS}, "offset and nbytes inside the expert")
            if not isinstance(t.get("name"), str) or not isinstance(t.get("dtype"), str):
                bad(name + ".name", t.get("name"), "a string, with a string dtype")
            if not isinstance(t.get("shape"), list) or not all(_int(d) for d in t["shape"]):
                bad(name + ".shape", t.get("shape"), "a list of integers >= 0")


def read_index(path: Path) -> dict:
    """index.json of a store directory, checked against the crc32 its COMPLETE marker holds; one-line errors."""
    index_path = path / "index.json"
    try:
        raw = index_path.read_bytes()
        recorded = (path / "COMPLETE").read_text().strip()
    except OSError as e:
        raise StoreCorruptError(f"{index_path}: unreadable store index ({e.strerror})") from None
    if recorded != str(zlib.crc32(raw)):
        raise StoreCorruptError(f"{index_path}: does not match the checksum in COMPLETE (crc32 {zlib.crc32(raw)}, "
                                f"marker says {recorded[:20]!r}); the index was changed; {mark_for_rebuild(path)}")
    try:
        index = json.loads(raw)
    except ValueError as e:
        raise StoreCorruptError(f"{index_path}: unreadable store index ({e}); {mark_for_rebuild(path)}") from None
    if not isinstance(index, dict):
        raise StoreCorruptError(f"{index_path}: expected a JSON object; {mark_for_rebuild(path)}")
    return index


def check_fields(index: dict, path: Path) -> None:
    """Field types and ranges (after the format/version check, so an old store gets that message first)."""
    _check_fields(index, path / "index.json")


def check_expert(data_path: Path, key: tuple[int, int], buf: memoryview, length: int, expected: int) -> None:
    """crc32 of the expert's bytes just read against the index; a mismatch marks the store for rebuild."""
    crc = zlib.crc32(buf[:length])
    if crc != expected:
        raise StoreCorruptError(
            f"{data_path}: checksum mismatch for layer {key[0]} expert {key[1]} (crc32 {crc:08x}, index says "
            f"{expected:08x}): the file changed after it was written; {mark_for_rebuild(data_path.parent)}")
