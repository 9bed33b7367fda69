"""ModelRunner's decode-step inputs: the native slot pass (decode_slots) against its tensor-op twin."""

from __future__ import annotations

import random

import pytest
import torch

from strata.engine.model_runner import ModelRunner
from strata.layers.attention import ContextSlots
from strata.layers.quant_native import native_lib


class _Seq:
    def __init__(self, block_table: list[int], num_tokens: int):
        self.block_table, self.token_ids = block_table, list(range(num_tokens))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _runner(block_size: int) -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)  # only the slot arithmetic: no model, no cache
    runner.block_size, runner._slot_offsets = block_size, torch.arange(block_size)
    return runner


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_slots_match_the_tensor_ops(block_size):
    lib = native_lib()
    if lib is None:
        pytest.skip("native library unavailable")
    from array import array
    from itertools import chain

    rng = random.Random(block_size)
    for _ in range(20):
        num = rng.randint(1, 17)
        lens = [rng.randint(1, 5 * block_size + 3) for _ in range(num)]
        free = list(range(200))
        rng.shuffle(free)
        # each table may hold more blocks than the context needs (a reserved draft tail)
        seqs = [_Seq([free.pop() for _ in range((n + block_size - 1) // block_size + rng.randint(0, 2))], n)
                for n in lens]
        flat_t, offsets_t, last_t, pos_t = _runner(block_size)._decode_slots_torch(seqs, lens)
        blocks = array("q", chain.from_iterable(s.block_table[: (n + block_size - 1) // block_size]
                                                for s, n in zip(seqs, lens)))
        flat, offsets = torch.full((sum(lens),), -1), torch.full((num + 1,), -1)
        last, pos = torch.full((num,), -1), torch.full((num,), -1)
        lens_arr = array("q", lens)  # held: the call reads its buffer
        lib.decode_slots(blocks.buffer_info()[0], lens_arr.buffer_info()[0], num, block_size,
                         flat.data_ptr(), offsets.data_ptr(), last.data_ptr(), pos.data_ptr())
        assert torch.equal(flat, flat_t) and torch.equal(offsets, offsets_t)
        assert torch.equal(last, last_t) and torch.equal(pos, pos_t)
        # position t of sequence s sits in block t // block_size at offset t % block_size
        s = rng.randrange(num)
        t = rng.randrange(lens[s])
        assert flat[offsets[s] + t] == seqs[s].block_table[t // block_size] * block_size + t % block_size


def test_context_slots_split_on_use():
    flat = torch.arange(10)
    slots = ContextSlots(flat, [3, 0, 7])
    assert len(slots) == 3 and slots._parts is None  # nothing split until a sequence's slots are read
    assert [s.tolist() for s in slots] == [[0, 1, 2], [], [3, 4, 5, 6, 7, 8, 9]]
    assert torch.equal(torch.cat(list(slots)), flat)
