"""Incremental detokenization: text deltas as tokens arrive, never splitting a multi-byte UTF-8 character,
with stop strings cut out of the text and held back while they may still be forming; it also says how many
tokens the text handed out so far covers (so streamed logprobs travel with their own text)."""

from __future__ import annotations

from bisect import bisect_right

from strata.tokenizer import Tokenizer

try:  # tokenizers' own incremental decoding (>= 0.22 takes the prompt's ids): two decodes per token in Rust
    from tokenizers.decoders import DecodeStream

    DecodeStream(ids=[], skip_special_tokens=True)
except (ImportError, TypeError):  # an older tokenizers: the same algorithm in Python (_decode_new)
    DecodeStream = None

_CONTEXT_TOKENS = 6  # prompt tokens decoded with the output so spacing rules see the left context


class IncrementalDetokenizer:
    # tokenizers' DecodeStream over ids[prefix_offset:], built on the first add (so a migrated state, which
    # carries ids and offsets, rebuilds it); None after it declined (see _new_text)
    _stream = None
    _use_stream = DecodeStream is not None

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.skip = skip_special_tokens
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # output text so far (stop string removed)
        self.num_emitted = 0  # characters of self.text already handed out
        self.stop_hit: str | None = None
        self.token_ends: list[int] = []  # per decoded output token: len(text) once its text is complete
        self.num_added = 0
        # tokens the engine generated that a deferred output hands to its consumer's thread to add (outputs.py)
        self.pending: list[int] = []

    @property
    def num_tokens_emitted(self) -> int:
        """Output tokens whose text has been handed out in full (a token still forming a character or a
        possible stop string is not)."""
        if self.tokenizer is None:
            return self.num_added
        return bisect_right(self.token_ends, self.num_emitted)

    def add(self, token: int) -> None:
        self.num_added += 1
        if self.tokenizer is None:  # token-ids-only engine: no text
            return
        self.ids.append(token)
        stream = self._stream
        if stream is not None:  # the usual case, inline: this runs for every generated token
            try:
                new = stream.step(self.tokenizer.tok, token)
            except Exception:  # noqa: BLE001 - tokenizers' DecodeStreamError (InvalidPrefix) is no Python type
                new = self._decline()
        else:
            new = self._new_text(token) if self._use_stream else self._decode_new()
        if new is None:
            return  # an incomplete UTF-8 sequence: wait for the next byte token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(len(self.text) - self.holdback, 0)
        self.text += new
        if self.num_added - len(self.token_ends) == 1:
            self.token_ends.append(len(self.text))
        else:  # the tokens that completed a character together end with it
            self.token_ends.extend([len(self.text)] * (self.num_added - len(self.token_ends)))
        if not self.stop:
            return
        hits = [(idx, s) for s in self.stop if (idx := self.text.find(s, start)) != -1]
        if hits:
            idx, self.stop_hit = min(hits)
            self.text = self.text[:idx]

    def _decode_new(self) -> str | None:
        """The text the last id adds (decode(ids[prefix_offset:]) past decode(ids[prefix_offset:read_offset])),
        or None while it ends inside a UTF-8 sequence."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        return full[len(prefix) :]

    def _new_text(self, token: int) -> str | None:
        """_decode_new's text from a new DecodeStream (add steps it from then on): tokenizers' incremental
        decoding, the same two decodes and rule without the Python around them. Where the two could differ,
        this detokenizer goes on with _decode_new: a prompt whose tail ends inside a UTF-8 sequence (the stream
        would hand out that prompt text), or a decode that does not extend the one before (the stream raises;
        byte-fallback decoding of invalid UTF-8 does that)."""
        context = self.ids[self.prefix_offset : self.read_offset]
        if self.tokenizer.decode(context, self.skip).endswith("\ufffd"):
            return self._decline()
        stream = self._stream = DecodeStream(ids=context, skip_special_tokens=self.skip)
        pending = self.ids[self.read_offset : -1]  # added while incomplete (a migrated state)
        try:
            if pending and stream.step(self.tokenizer.tok, pending) is not None:
                return self._decline()
            return stream.step(self.tokenizer.tok, token)
        except Exception:  # noqa: BLE001 - as in add
            return self._decline()

    def _decline(self) -> str | None:
        self._stream, self._use_stream = None, False
        return self._decode_new()

    def take_delta(self, final: bool) -> str:
        """Text not yet handed out; keeps back a possible stop-string prefix unless final, and then ends at a
        token boundary (a chunk never carries part of a token's text)."""
        if final or self.stop_hit:
            end = len(self.text)
        else:
            limit = len(self.text) - self.holdback
            i = bisect_right(self.token_ends, limit)
            end = max(self.token_ends[i - 1] if i else 0, self.num_emitted)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
