"""Expert store: conversion of each naming scheme, exact read-back, checksums, interrupted conversion."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from strata.tiers import store_convert
from strata.tiers.store import ExpertStore, StoreError, alloc_aligned
from strata.tiers.store_convert import checkpoint_facts, convert, ensure_store


def make_checkpoint(path, names: str = "mixtral", layers: int = 2, experts: int = 3, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    H, inter = 8, 12
    t = {"model.embed_tokens.weight": torch.randn(16, H, generator=g).to(dtype)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t[p + "self_attn.q_proj.weight"] = torch.randn(H, H, generator=g).to(dtype)
        for e in range(experts):
            if names == "mixtral":
                for n, shape in (("w1", (inter, H)), ("w3", (inter, H)), ("w2", (H, inter))):
                    t[f"{p}block_sparse_moe.experts.{e}.{n}.weight"] = torch.randn(shape, generator=g).to(dtype)
            elif names == "qwen":
                for n, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter))):
                    t[f"{p}mlp.experts.{e}.{n}.weight"] = torch.randn(shape, generator=g).to(dtype)
            elif names == "quant":  # a packed int4 weight with its scales: odd sizes, several dtypes
                t[f"{p}mlp.experts.{e}.gate_proj.qweight"] = torch.randint(0, 255, (inter, 3), dtype=torch.uint8)
                t[f"{p}mlp.experts.{e}.gate_proj.scales"] = torch.randn(inter, 1, generator=g).half()
        if names == "stacked":
            t[p + "mlp.experts.gate_up_proj"] = torch.randn(experts, 2 * inter, H, generator=g).to(dtype)
            t[p + "mlp.experts.down_proj"] = torch.randn(experts, H, inter, generator=g).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    half = len(t) // 2  # two shards, to check that experts may span files
    keys = sorted(t)
    save_file({k: t[k] for k in keys[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in keys[half:]}, str(path / "model-00002-of-00002.safetensors"))
    return t


def expected_tensors(t: dict, names: str, layer: int, e: int) -> dict:
    if names == "stacked":
        p = f"model.layers.{layer}.mlp.experts."
        return {"gate_up_proj": t[p + "gate_up_proj"][e], "down_proj": t[p + "down_proj"][e]}
    out = {}
    for k, v in t.items():
        for mid in (f"layers.{layer}.block_sparse_moe.experts.{e}.", f"layers.{layer}.mlp.experts.{e}."):
            if mid in k:
                out[k.split(mid)[1]] = v
    return out


def read_all(store: ExpertStore):
    mm, pool = alloc_aligned(store.slot_bytes)
    for key in list(store.entries):
        store.read_into(key, memoryview(mm))
        yield key, {k: v.clone() for k, v in store.views(key, pool).items()}


@pytest.mark.parametrize("names", ["mixtral", "qwen", "quant", "stacked"])
def test_convert_and_read_back_exactly(tmp_path, names):
    t = make_checkpoint(tmp_path / "ckpt", names)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    out = convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before  # source untouched
    with ExpertStore(out) as store:
        assert store.keys() == [(layer, e) for layer in range(2) for e in range(3)]
        for (layer, e), tensors in read_all(store):
            entry = store.entry((layer, e))
            assert entry.offset % 4096 == 0 and entry.padded % 4096 == 0
            want = expected_tensors(t, names, layer, e)
            assert set(tensors) == set(want)
            for n, v in want.items():
                assert tensors[n].dtype == v.dtype and torch.equal(tensors[n], v)


def test_views_share_the_slot_memory(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    store = ExpertStore(convert(tmp_path / "ckpt", tmp_path / "store", progress=False))
    mm, pool = alloc_aligned(store.slot_bytes)
    store.read_into((0, 0), memoryview(mm))
    views = store.views((0, 0), pool)
    assert all(v.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr() for v in views.values())


def test_checksum_mismatch_names_layer_and_expert(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    out = convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    entry = json.loads((out / "index.json").read_text())["experts"][4]  # layer 1, expert 1
    with open(out / "experts.bin", "r+b") as f:
        f.seek(entry["offset"] + 10)
        b = f.read(1)
        f.seek(entry["offset"] + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    store = ExpertStore(out)
    mm, _ = alloc_aligned(store.slot_bytes)
    assert ExpertStore(out, verify="never").read_into((1, 1), memoryview(mm)) > 0
    store.read_into((0, 0), memoryview(mm))  # other experts still read fine
    with pytest.raises(StoreError, match=r"experts.bin: checksum mismatch for layer 1 expert 1.*marked for rebuild"):
        store.read_into((1, 1), memoryview(mm))
    rebuilt = ExpertStore(ensure_store(tmp_path / "ckpt", out, progress=False))  # what the next start does
    assert rebuilt.read_into((1, 1), memoryview(mm)) > 0


def test_interrupted_conversion_leaves_no_store(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "ckpt")
    calls = {"n": 0}
    real = store_convert.align

    def boom(n, a=4096):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(n, a)

    monkeypatch.setattr(store_convert, "align", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the temporary folder is gone too
    with pytest.raises(StoreError, match="does not exist"):
        ExpertStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    with pytest.raises(StoreError, match="incomplete"):
        ExpertStore(tmp_path / "store")


def test_truncated_store_refused(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    out = convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    os.truncate(out / "experts.bin", 4096)
    with pytest.raises(StoreError, match="truncated"):
        ExpertStore(out)


def test_buffered_fallback_when_o_direct_refused(tmp_path, monkeypatch, caplog):
    make_checkpoint(tmp_path / "ckpt")
    out = convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="strata.tiers"):
        store = ExpertStore(out)
    assert not store.direct_io and "O_DIRECT refused" in caplog.text
    assert dict(read_all(store))  # reads still work


def test_ensure_store_reuses_then_rebuilds_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    make_checkpoint(tmp_path / "ckpt")
    out = ensure_store(tmp_path / "ckpt", progress=False)
    assert out.parent == tmp_path / "cache" / "experts"
    stamp = (out / "index.json").stat().st_mtime_ns
    assert ensure_store(tmp_path / "ckpt", progress=False) == out
    assert (out / "index.json").stat().st_mtime_ns == stamp
    make_checkpoint(tmp_path / "ckpt", layers=3)
    ExpertStore(ensure_store(tmp_path / "ckpt", progress=False)).entry((2, 0))
    facts = checkpoint_facts(tmp_path / "ckpt")
    assert facts.expert_bytes == 3 * 3 * 3 * 8 * 12 * 2 and facts.non_expert_bytes == (16 * 8 + 3 * 8 * 8) * 2
    assert facts.resident_bytes(4) == 2 * facts.non_expert_bytes and facts.num_experts == 9
    assert facts.slot_bytes == ExpertStore(out).slot_bytes
