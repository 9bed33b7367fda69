"""Draft-model proposer: a small model sharing the target's tokenizer drafts k tokens autoregressively.

The draft keeps its own paged KV cache (BlockManager + ModelRunner of its own) with one shadow Sequence per
target sequence. Before each proposal the shadow is synced to the target's tokens: its cache stays valid up
to the longest common prefix (the accepted drafts), the rest is recomputed in the first draft forward (the
bonus token, or the whole prompt the first time). Each draft forward batches every proposing sequence.
The engine loads the draft before the target, so its weights and cache count against --memory-budget.
"""

from __future__ import annotations

import json
import os

import torch

from strata.config import EngineConfig
from strata.engine.block_manager import BlockManager
from strata.engine.model_runner import ModelRunner, num_kv_blocks
from strata.engine.sampler import sampling_probs
from strata.engine.scheduler import ScheduledBatch
from strata.engine.sequence import Sequence
from strata.engine.spec.proposer import Proposal, Proposer
from strata.errors import ConfigError
from strata.models.registry import load_config


def _vocab(path: str) -> dict[str, int] | None:
    tok = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tok).get_vocab(with_added_tokens=True)


def check_same_vocabulary(draft_path: str, target_path: str) -> None:
    """One-line ConfigError unless the draft's tokenizer and vocab_size are the target's."""
    draft, target = load_config(draft_path), load_config(target_path)
    if draft.vocab_size != target.vocab_size:
        raise ConfigError(
            f"--speculative-config: draft {draft_path} has vocab_size {draft.vocab_size}, the target "
            f"{target_path} has {target.vocab_size}; the draft must share the target's tokenizer"
        )
    dv, tv = _vocab(draft_path), _vocab(target_path)
    if dv is not None and tv is not None and dv != tv:
        diff = min(set(dv.items()) ^ set(tv.items()))
        raise ConfigError(
            f"--speculative-config: draft {draft_path}'s tokenizer.json differs from the target's "
            f"(token {json.dumps(diff[0])} -> id {diff[1]} in one only); the vocabularies must match"
        )


class DraftModelProposer(Proposer):
    def __init__(self, draft_path: str, target_path: str, config: EngineConfig):
        from strata.weights.loader import load_model

        if not os.path.isdir(draft_path):
            raise ConfigError(f"--speculative-config: draft model folder {draft_path} not found")
        check_same_vocabulary(draft_path, target_path)
        self.model = load_model(draft_path, dtype=config.dtype, progress=False)
        cfg = self.model.config
        target_len = min(load_config(target_path).max_position_embeddings, 4096)
        self.max_model_len = min(config.max_model_len or target_len, cfg.max_position_embeddings)
        bs = config.block_size
        num_blocks = num_kv_blocks(
            self.model, bs, config.max_num_seqs, self.max_model_len, config.kv_cache_memory
        )
        self.block_manager = BlockManager(num_blocks, bs, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, num_blocks, bs)
        self._kv_bytes = sum(t.nbytes for layer in self.runner.kv_caches for t in layer)
        self.shadows: dict[int, Sequence] = {}  # target seq_id -> the draft's copy
        # target seq_id -> the target's length at the last sync (drafted tokens follow it)
        self._synced: dict[int, int] = {}

    def memory_bytes(self) -> int:
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return weights + self._kv_bytes

    def release(self, seq: Sequence) -> None:
        shadow = self.shadows.pop(seq.seq_id, None)
        self._synced.pop(seq.seq_id, None)
        if shadow is not None:
            self.block_manager.free(shadow)

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of seq, with its cache trimmed to the prefix it shares with seq's tokens."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = self.shadows[seq.seq_id] = Sequence(seq.request_id, seq.token_ids, seq.params)
        else:
            common = self._synced[seq.seq_id]  # tokens before it are the target's own, so they match
            limit = min(shadow.num_computed_tokens, seq.num_tokens)
            while common < limit and shadow.token_ids[common] == seq.token_ids[common]:
                common += 1
            shadow.num_computed_tokens = min(shadow.num_computed_tokens, common)
            shadow.token_ids = list(seq.token_ids)
            self.block_manager.release_tail(shadow, shadow.num_tokens)
        self._synced[seq.seq_id] = seq.num_tokens
        return shadow

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        proposals = [Proposal([]) for _ in seqs]
        work: list[tuple[int, Sequence, int]] = []  # (index, shadow, k)
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            k = min(k, self.max_model_len - seq.num_tokens)
            shadow = self._sync(seq)
            # the last drafted token is never run through the draft, so k - 1 new positions need slots
            if k > 0 and self.block_manager.reserve(shadow, seq.num_tokens + k - 1):
                work.append((i, shadow, k))
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in work}
        with torch.inference_mode():
            while work:
                batch = ScheduledBatch([s for _, s, _ in work], [s.num_uncomputed_tokens for _, s, _ in work])
                logits, _, _ = self.runner.execute(batch)  # [len(work), V]: every shadow ends on its last token
                for (i, shadow, _), n, row in zip(work, batch.num_new_tokens, logits):
                    shadow.num_computed_tokens += n
                    tok, q = self._sample(row, seqs[i])
                    shadow.token_ids.append(tok)
                    proposals[i].token_ids.append(tok)
                    if q is not None:
                        probs[i].append(q)
                work = [w for w in work if len(proposals[w[0]].token_ids) < w[2]]
        for i, qs in probs.items():
            if qs:
                proposals[i].probs = torch.stack(qs)  # [k, V]
        return proposals

    @staticmethod
    def _sample(logits: torch.Tensor, seq: Sequence) -> tuple[int, torch.Tensor | None]:
        """A draft token and the distribution q it came from (None when greedy: argmaxes are compared)."""
        if seq.params.is_greedy:
            return int(torch.argmax(logits)), None
        q = sampling_probs(logits, seq.params)
        q = q / q.sum()  # [V]
        return int(torch.multinomial(q, 1, generator=seq.generator)), q
