"""Expert bytes or index fields changed on disk are caught with one line, never read as wrong weights, and the
store is rebuilt by the next start."""

from __future__ import annotations

import json
import zlib

import pytest

from strata.tiers.store import ExpertStore, StoreError, alloc_aligned
from strata.tiers.store_convert import convert, ensure_store
from strata.tiers.store_verify import StoreCorruptError
from tests.tiers.test_store import make_checkpoint


@pytest.fixture()
def store_dir(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    return convert(tmp_path / "ckpt", tmp_path / "store", progress=False)


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_bytes_changed_after_the_first_read_are_caught(store_dir):
    store = ExpertStore(store_dir)
    mm, _ = alloc_aligned(store.slot_bytes)
    store.read_into((0, 2), memoryview(mm))  # read once: fine
    _flip(store_dir / "experts.bin", store.entry((0, 2)).offset + 100)
    with pytest.raises(StoreCorruptError, match="checksum mismatch for layer 0 expert 2"):
        store.read_into((0, 2), memoryview(mm))


def _rewrite_index(store_dir, edit, fix_marker: bool) -> None:
    index = json.loads((store_dir / "index.json").read_text())
    edit(index)
    raw = json.dumps(index).encode()
    (store_dir / "index.json").write_bytes(raw)
    if fix_marker:
        (store_dir / "COMPLETE").write_text(f"{zlib.crc32(raw)}\n")


def test_changed_index_fails_its_marker_checksum_then_rebuilds(store_dir, tmp_path):
    good = ExpertStore(store_dir).entry((1, 0))

    def shift(index):
        index["experts"][3]["offset"] += 4096

    _rewrite_index(store_dir, shift, fix_marker=False)
    with pytest.raises(StoreCorruptError, match="does not match the checksum in COMPLETE.*marked for rebuild"):
        ExpertStore(store_dir)
    rebuilt = ExpertStore(ensure_store(tmp_path / "ckpt", store_dir, progress=False))
    assert rebuilt.entry((1, 0)) == good


@pytest.mark.parametrize("edit,field", [
    (lambda ix: ix["experts"][0].update(offset="zero"), "experts[0].offset"),
    (lambda ix: ix["experts"][1].update(padded=-4096), "experts[1].padded"),
    (lambda ix: ix["experts"][2].update(offset=ix["data_bytes"]), "experts[2].offset"),
    (lambda ix: ix["experts"][0].update(tensors=7), "experts[0].tensors"),
    (lambda ix: ix["experts"][0]["tensors"][0].update(nbytes=10**9), "experts[0].tensors[0]"),
    (lambda ix: ix["experts"][0]["tensors"][0].update(shape=["8"]), "experts[0].tensors[0].shape"),
    (lambda ix: ix.update(slot_bytes=None), "slot_bytes"),
    (lambda ix: ix.update(data_file="../../etc/passwd"), "data_file"),
])
def test_tampered_index_fields_are_one_line(store_dir, edit, field):
    _rewrite_index(store_dir, edit, fix_marker=True)  # even with a matching marker
    with pytest.raises(StoreError) as e:
        ExpertStore(store_dir)
    msg = str(e.value)
    assert f"field '{field}'" in msg and "\n" not in msg


def test_stale_source_facts_of_the_wrong_type_rebuild(store_dir, tmp_path):
    _rewrite_index(store_dir, lambda ix: ix.update(source=5), fix_marker=True)
    ExpertStore(ensure_store(tmp_path / "ckpt", store_dir, progress=False))


def test_concurrent_first_uses_convert_once(tmp_path, monkeypatch):
    """Two servers starting on the same checkpoint: one converts, the other waits and reuses its store."""
    import threading
    import time

    from strata.tiers import store_convert

    make_checkpoint(tmp_path / "ckpt")
    calls = []
    real = store_convert.convert

    def slow_convert(*args, **kw):
        calls.append(1)
        time.sleep(0.3)  # widen the window in which the other caller finds no store yet
        return real(*args, **kw)

    monkeypatch.setattr(store_convert, "convert", slow_convert)
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(ensure_store(tmp_path / "ckpt", tmp_path / "store",
                                                                        progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and len(outs) == 2
    ExpertStore(outs[1]).close()
