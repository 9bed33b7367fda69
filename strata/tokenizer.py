"""Tokenizer: tokenizer.json through `tokenizers`, special tokens from tokenizer_config.json, and the chat
template rendered in jinja2's sandbox with transformers' semantics."""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from strata.errors import ConfigError, InvalidRequestError, StrataError


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


# Texts longer than this are encoded with encode_batch, which releases the GIL (encode holds it: measured,
# a thread beside a 464k-character encode ran 9x slower); shorter ones with encode, a little faster.
GIL_FREE_CHARS = 4096


class ChatTemplateError(StrataError):
    """The chat template raised (raise_exception) or failed to render."""


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile_template(source: str):
    """The chat template compiled once per source: compiling takes ~1 ms, rendering a short chat ~10 us."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    def __init__(self, path: str):
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise ConfigError(f"{tok_file}: file not found (Strata reads tokenizers' tokenizer.json)")
        try:
            self.tok = HFTokenizer.from_file(tok_file)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types
            raise ConfigError(f"{tok_file}: cannot be parsed by tokenizers ({str(e).splitlines()[0]})") from None
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        model_cfg = _read_json(os.path.join(path, "config.json"))
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.bos_token_id = self._id(self.bos_token, model_cfg.get("bos_token_id"))
        eos_ids = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        eos_ids = [] if eos_ids is None else ([eos_ids] if isinstance(eos_ids, int) else list(eos_ids))
        own_eos = self._id(self.eos_token, None)
        if own_eos is not None and own_eos not in eos_ids:
            eos_ids.append(own_eos)
        self.eos_token_ids = eos_ids
        # Does encoding already add BOS (post-processor)? If not, honour add_bos_token ourselves.
        probe = self.tok.encode("a", add_special_tokens=True).ids
        self._post_adds_bos = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        self.add_bos_token = bool(cfg.get("add_bos_token", False)) and not self._post_adds_bos
        self.chat_template = self._load_template(path, cfg)
        self.is_byte_level = "ByteLevel" in str(self.tok.decoder)
        self.special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def _id(self, token: str | None, fallback: int | None) -> int | None:
        if token is not None:
            i = self.tok.token_to_id(token)
            if i is not None:
                return i
        return fallback

    @staticmethod
    def _load_template(path: str, cfg: dict) -> str | None:
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):
            with open(jinja_file) as f:
                return f.read()
        t = cfg.get("chat_template")
        if isinstance(t, list):  # named templates: pick "default"
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            return named.get("default") or next(iter(named.values()), None)
        if t is None:
            extra = _read_json(os.path.join(path, "chat_template.json"))
            t = extra.get("chat_template")
        return t

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            if len(text) > GIL_FREE_CHARS:  # encode_batch releases the GIL: the engine thread keeps stepping
                ids = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
            else:
                ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids if text else []
        except TypeError:  # tokenizers refuses str that is not valid Unicode (a lone surrogate)
            raise InvalidRequestError("text to tokenize is not valid Unicode (a lone UTF-16 surrogate?)",
                                      param="prompt") from None
        if text == "" and add_special_tokens and self._post_adds_bos:
            ids = [self.bos_token_id]  # as llama2.c's run.c: an empty prompt starts from BOS alone
        if add_special_tokens and self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # the incremental detokenizer calls this twice per generated token: no copy of a list, no keyword argument
        return self.tok.decode(ids if type(ids) is list else list(ids), skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, template: str | None = None, **kwargs
    ) -> str:
        source = template or self.chat_template
        if source is None:
            raise ConfigError("tokenizer_config.json: no 'chat_template' (and no chat_template.jinja) for --chat")
        try:
            compiled = _compile_template(source)
            return compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # e.g. a kwarg of the wrong type
            raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template writes BOS itself when the model wants one (transformers passes add_special_tokens=False).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)
