"""ExpertCache: exact tensors under every pool shape, prefetch never changes results, counters agree
with the simulator, failures are reported."""

from __future__ import annotations

import json
import random

import pytest
import torch

from strata.errors import StrataError
from strata.tiers.cache import ExpertCache
from strata.tiers.pools import ExpertPools
from strata.tiers.simulate import access_step
from strata.tiers.store import ExpertStore, StoreError
from strata.tiers.store_convert import convert
from tests.tiers.test_store import expected_tensors, make_checkpoint


@pytest.fixture(scope="module")
def store_and_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    ref = make_checkpoint(root / "ckpt", "qwen", layers=3, experts=4)
    return convert(root / "ckpt", root / "store", progress=False), ref


def run(cache, ref, steps, prefetch=True, seed=0):
    rnd = random.Random(seed)
    for t in range(steps):
        for layer in range(3):
            ids = rnd.sample(range(4), 2)
            cache.route(layer, [ids], [[0.6, 0.4]])
            cache.request(layer, ids)
            for e in ids:
                with cache.hold(layer, e) as w:
                    for n, v in expected_tensors(ref, "qwen", layer, e).items():
                        assert torch.equal(w[n], v), (layer, e, n)
            if prefetch:
                cache.prefetch((layer + 1) % 3, rnd.sample(range(4), 2))


@pytest.mark.parametrize("layout,slots,workers", [("global", 2, 1), ("global", 5, 2), ("per-layer", 3, 2),
                                                  ("per-layer", 6, 1), ("global", 12, 2)])
def test_exact_tensors_with_prefetch(store_and_ref, layout, slots, workers):
    path, ref = store_and_ref
    cache = ExpertCache(ExpertStore(path), slots, "lru", layout, io_workers=workers)
    run(cache, ref, 30)
    st = cache.stats
    # a one-slot pool may have to evict a requested expert to serve the one held first: it is read again
    assert st.accesses >= 30 * 3 * 2 and st.hits + st.misses == st.accesses
    assert st.disk_bytes_read == (st.misses + st.prefetch_issued) * cache.slot_bytes
    cache.close()
    # the I/O workers timed every read they ran: a positive read time and a finite rate over it
    assert st.disk_read_s > 0 and 0 < st.disk_read_gb_s < float("inf")


def test_counters_match_the_simulated_pools(store_and_ref):
    path, ref = store_and_ref
    cache = ExpertCache(ExpertStore(path), 5, "lfu", "global")
    run(cache, ref, 25, prefetch=False, seed=3)
    sim = ExpertPools(3, 5, "lfu")
    rnd = random.Random(3)
    for t in range(25):
        for layer in range(3):
            access_step(sim, layer, rnd.sample(range(4), 2))
    assert (cache.stats.hits, cache.stats.misses) == (sim.stats.hits, sim.stats.misses)
    cache.close()


def test_pins_are_loaded_and_kept(store_and_ref):
    path, ref = store_and_ref
    cache = ExpertCache(ExpertStore(path), 4, "lru", pins=[(0, 1), (2, 3)])
    assert cache.stats.disk_bytes_read == 0  # pins are read up front and not counted as misses
    assert cache.stats.disk_read_s == 0 and cache.stats.disk_read_gb_s is None
    run(cache, ref, 10)
    assert {(0, 1), (2, 3)} <= set(cache.pools.resident_keys())
    cache.close()


def test_corrupt_expert_fails_the_access_that_needs_it(store_and_ref, tmp_path):
    path, ref = store_and_ref
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    entry = json.loads((bad / "index.json").read_text())["experts"][0]
    with open(bad / "experts.bin", "r+b") as f:
        f.seek(entry["offset"])
        f.write(b"\x00\x01\x02\x03")
    cache = ExpertCache(ExpertStore(bad), 4)
    cache.prefetch(0, [0])  # the failed prefetch is dropped, not served
    cache.request(0, [0])
    with pytest.raises(StoreError, match="checksum mismatch for layer 0 expert 0"), cache.hold(0, 0):
        pass
    with cache.hold(0, 1) as w:  # the cache keeps working
        assert torch.equal(w["up_proj.weight"], expected_tensors(ref, "qwen", 0, 1)["up_proj.weight"])
    cache.close()


def test_pool_too_small_for_held_experts(store_and_ref):
    path, _ = store_and_ref
    cache = ExpertCache(ExpertStore(path), 3, layout="per-layer")
    with cache.hold(0, 0), pytest.raises(StrataError, match="no free slot for expert 1"), cache.hold(0, 1):
        pass
    cache.close()


def test_hold_all_holds_every_requested_expert_or_none(store_and_ref):
    path, ref = store_and_ref
    cache = ExpertCache(ExpertStore(path), 3, "lru", "global")
    cache.request(0, [0, 1, 2])
    with cache.hold_all(0, [0, 1, 2]) as held:
        assert sorted(held) == [0, 1, 2]
        for e, w in held.items():
            for n, v in expected_tensors(ref, "qwen", 0, e).items():
                assert torch.equal(w[n], v), (e, n)
        assert all(cache.pools.busy.get((0, e)) for e in range(3))  # unevictable while held
    assert not cache._requested  # the holds took the requests over and dropped them on exit
    assert not any(cache.pools.busy.get((0, e), 0) > 1 for e in range(3))  # (a read's own mark may linger)
    cache.request(1, [0, 1, 2, 3])  # 4 experts, 3 slots: one was not admitted
    with cache.hold_all(1, [0, 1, 2, 3]) as held:
        assert held is None
    assert len(cache._requested) == 3  # untouched: the caller holds them one at a time or releases them
    cache.release(1, [0, 1, 2, 3])
    assert not cache._requested
    cache.close()
