"""Command-line flags generated from dataclass fields (one generator for every command's knobs).

EngineConfig's fields (strata/config.py) carry their help text, value type and choices in their metadata
(`knob(...)`); `add_engine_args` turns them into the engine flags of `generate`, `chat`, `serve`, `eval` and
`plan`; `add_dataclass_args` does the same for any other dataclass built with `knob` (the server's ServerConfig).
Byte sizes all go through strata.units.parse_size, so `--memory-budget 3GiB` reads the same everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

from strata import units
from strata.config import EngineConfig
from strata.errors import ConfigError


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def parse_size(text: str | int, field: str = "size") -> int:
    """A size flag's value in bytes; a one-line ConfigError naming the flag when it does not parse or is <= 0."""
    try:
        value = units.parse_size(text)
    except ValueError as e:
        raise ConfigError(f"{flag_name(field)}: {e}") from None
    if value <= 0:
        raise ConfigError(f"{flag_name(field)}: must be > 0, got {text!r}")
    return value


def _choices(meta) -> tuple[str, ...] | None:
    """A field's choices: its tuple, or the tuple its "module:NAME" reference names."""
    choices = meta.get("choices")
    if isinstance(choices, str):
        module, name = choices.split(":")
        return getattr(importlib.import_module(module), name)
    return choices


def _help(f: dataclasses.Field, default) -> str:
    text = f.metadata["help"]
    if f.metadata.get("type") == "size":
        text += f" ({units.RULE})"
        return text if default is None else f"{text} (default {units.format_size(default)})"
    if default is not None and not isinstance(default, bool):
        text += f" (default {default})"
    return text


def add_field_arg(parser, f: dataclasses.Field, required: bool = False, default=dataclasses.MISSING) -> None:
    """One flag for one field: bool -> --x/--no-x, size -> parsed later by `config_kwargs`, else typed.
    `default` replaces the field's for a command that needs another (eval's float32)."""
    flag, meta = flag_name(f.name), f.metadata
    default = f.default if default is dataclasses.MISSING else default
    if isinstance(f.default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_help(f, default))
    elif meta.get("type") == "size":
        parser.add_argument(flag, default=None, required=required, help=_help(f, default))
    else:
        parser.add_argument(flag, type=meta.get("type") or str, default=default, required=required,
                            choices=_choices(meta), help=_help(f, default))


def add_dataclass_args(parser, cls, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                       defaults: dict | None = None) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or "help" not in f.metadata:
            continue
        add_field_arg(parser, f, default=(defaults or {}).get(f.name, dataclasses.MISSING))


def add_engine_args(parser, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                    defaults: dict | None = None) -> None:
    add_dataclass_args(parser, EngineConfig, skip=skip, only=only, defaults=defaults)


def engine_field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(EngineConfig) if f.name == name)


def config_kwargs(cls, args: argparse.Namespace) -> dict:
    """Keyword arguments of `cls` from the parsed flags it has (size flags read to bytes)."""
    kw = {}
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        if f.metadata.get("type") == "size":
            v = f.default if v is None else parse_size(v, f.name)
        kw[f.name] = v
    return kw


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    return EngineConfig(**{**config_kwargs(EngineConfig, args), **overrides})
