"""BlockManager: KV-cache blocks with reference counts and a prefix cache (hash chain of full blocks).

A block is `block_size` token slots. A full block's hash chains its parent's hash and its token ids, so two
sequences with the same prefix share blocks. Freed blocks keep their hash until reused, so a later request
(or a preempted one coming back) can still hit them.
"""

from __future__ import annotations

from collections import OrderedDict

from strata.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(self.num_blocks, 1)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take_free(self, block_id: int | None = None) -> Block:
        """Take a free block: a given one (a prefix-cache hit, keeps its hash) or the oldest freed (forgets it)."""
        if block_id is None:
            block_id, _ = self.free_block_ids.popitem(last=False)  # oldest freed first: keeps recent prefixes
            block = self.blocks[block_id]
            if block.hash is not None:
                if self.hash_to_block.get(block.hash) == block_id:
                    del self.hash_to_block[block.hash]
                block.hash, block.token_ids = None, ()
        else:
            del self.free_block_ids[block_id]
            block = self.blocks[block_id]
        block.ref_count += 1
        return block

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix; never the block holding the last token (it must be computed)."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:  # cached positions give no logits
            return []
        hits, parent = [], None
        num_full = (seq.num_tokens - 1) // self.block_size
        for i in range(num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
            parent = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        return fresh + reusable_free <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table
        hits = self._prefix_hits(seq)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                self._take_free(bid)
            else:
                block.ref_count += 1
            seq.block_table.append(bid)
        for _ in range(self.blocks_needed(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_free().block_id)
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        seq.num_hashed_blocks = len(hits)
        self.num_prefix_queries += seq.num_tokens
        self.num_prefix_hits += seq.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[bid] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def covers(self, seq: Sequence) -> bool:
        """Whether the sequence's blocks hold a slot for each of its tokens."""
        return len(seq.block_table) * self.block_size >= len(seq.token_ids)

    def can_append(self, seq: Sequence) -> bool:
        return self.covers(seq) or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make sure the blocks cover every token of the sequence (call after can_append)."""
        while not self.covers(seq):
            seq.block_table.append(self._take_free().block_id)

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Extend the blocks to cover num_tokens tokens (speculative drafts) if enough are free; else no change."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free().block_id)
        return True

    def release_tail(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks beyond the first num_tokens tokens (a rejected draft's slots)."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block.block_id] = None

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash blocks whose every slot is computed so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while (seq.num_hashed_blocks + 1) * bs <= seq.num_computed_tokens:
            i = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                h = block_hash(parent, tokens)
                block.hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)
            seq.num_hashed_blocks += 1
