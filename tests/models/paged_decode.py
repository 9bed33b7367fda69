"""Drives a model like the engine does, for the family tests: several sequences prefilled in one batch,
then decoded together one token per step, their KV in small blocks scattered over the cache."""

import torch

from strata.layers.attention import AttentionMetadata
from strata.layers.kv_cache import allocate_kv_caches


def _slots(table: list[int], block_size: int, positions: range) -> torch.Tensor:
    return torch.tensor([table[p // block_size] * block_size + p % block_size for p in positions])


def paged_logits(model, seqs: list[torch.Tensor], prefill_lens: list[int], block_size: int = 4,
                 dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Per sequence: logits [len - prefill, V] predicting positions prefill .. len - 1 (the prefill's last
    row, then one row per decode step), i.e. rows prefill - 1 .. len - 2 of a full forward's logits."""
    n = len(seqs)
    blocks = [-(-len(s) // block_size) for s in seqs]
    # interleaved and reversed, so no sequence's blocks are contiguous or in order
    order = list(range(sum(blocks)))[::-1]
    tables = [[order[b * n + i] for b in range(blocks[i])] for i in range(n)] if len(set(blocks)) == 1 else None
    if tables is None:
        raise ValueError("paged_logits: give sequences of one length")
    caches = allocate_kv_caches(model.kv_cache_spec(), sum(blocks) * block_size, dtype)  # as the engine does
    starts = [sum(prefill_lens[:i]) for i in range(n)]
    meta = AttentionMetadata(starts, list(prefill_lens), list(prefill_lens),
                             torch.cat([_slots(t, block_size, range(p)) for t, p in zip(tables, prefill_lens)]),
                             [_slots(t, block_size, range(p)) for t, p in zip(tables, prefill_lens)])
    ids = torch.cat([s[:p] for s, p in zip(seqs, prefill_lens)])
    pos = torch.cat([torch.arange(p) for p in prefill_lens])
    last = torch.tensor([st + p - 1 for st, p in zip(starts, prefill_lens)])
    with torch.no_grad():
        first = model(ids, pos, meta, caches, logits_indices=last)  # [S, V]
    out = [[first[i]] for i in range(n)]
    for t in range(min(prefill_lens), len(seqs[0])):
        live = [i for i in range(n) if prefill_lens[i] <= t]
        meta = AttentionMetadata(list(range(len(live))), [1] * len(live), [t + 1] * len(live),
                                 torch.cat([_slots(tables[i], block_size, range(t, t + 1)) for i in live]),
                                 [_slots(tables[i], block_size, range(t + 1)) for i in live])
        with torch.no_grad():
            step = model(torch.stack([seqs[i][t] for i in live]), torch.full((len(live),), t), meta, caches)
        for j, i in enumerate(live):
            out[i].append(step[j])
    return [torch.stack(o[:-1]) for o in out]  # the last step predicts beyond the sequence


def random_ids(vocab_size: int, n: int, seed: int) -> torch.Tensor:
    """n token ids in [3, vocab_size) (above the special tokens of the tiny configs)."""
    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def assert_paged_decode_matches(model, hf, vocab_size: int, length: int = 30, prefill_lens=(5, 11, 3),
                                block_size: int = 4) -> None:
    """Three sequences prefilled together and decoded together over small scattered blocks give transformers'
    full-forward logits, row for row."""
    seqs = [random_ids(vocab_size, length, s) for s in range(2, 2 + len(prefill_lens))]
    got = paged_logits(model, seqs, list(prefill_lens), block_size)
    for s, p, g in zip(seqs, prefill_lens, got):
        with torch.no_grad():
            ref = hf(s[None]).logits[0, p - 1 : -1]
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)


def assert_cached_decode_equals_full(model, ids: torch.Tensor, caches, slots: torch.Tensor, prefill: int) -> None:
    """One sequence: a prefill of `prefill` tokens, then one token per step, its KV at `slots` in `caches`, gives
    the logits of one forward without a cache, row for row."""
    n = len(ids)
    full = model(ids, torch.arange(n), AttentionMetadata.no_cache([n]))
    meta = AttentionMetadata([0], [prefill], [prefill], slots[:prefill], [slots[:prefill]])
    steps = [model(ids[:prefill], torch.arange(prefill), meta, caches)]
    for t in range(prefill, n):
        meta = AttentionMetadata([0], [1], [t + 1], slots[t : t + 1], [slots[: t + 1]])
        steps.append(model(ids[t : t + 1], torch.tensor([t]), meta, caches))
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-4, rtol=1e-4)
