"""`--model` resolution: a folder or config.json, a GGUF file, or a name as the field writes it.

Names resolve against the preset catalog (presets.json) after the normalisation the field's names need:
case and punctuation ignored, the org dropped (`ggml-org/gpt-oss-20b-GGUF`), an Ollama tag read as part of the
name (`llama3.1:8b`), and packaging suffixes stripped (-GGUF, -Instruct, -chat, -it, -hf, release dates like
-2507, and quantization suffixes such as -Q8_0, -AWQ, -4bit, which are kept as the name's quantization).
A name that still matches nothing takes the longest catalog name it extends (`...-abliterated`) with the same
sizes (7B, 30B-A3B). Every resolution says which entry it took.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from strata.analysis.precision import parse_published
from strata.analysis.shapes import ModelShape, load_presets, shape_from_dict
from strata.config import read_config_json
from strata.errors import ConfigError

QUANT_TOKEN = re.compile(
    r"(?<![a-z0-9])(i?q\d(?:_[a-z0-9]{1,3}){0,2}|tq\d_\d|bf16|f16|fp16|f32|fp8|fp4|nvfp4|mxfp4|awq|gptq(?:-int[48])?"
    r"|int[48]|w4a16|w8a8|\d-?bits?)(?![a-z0-9])")
DROP_TOKENS = {"gguf", "instruct", "chat", "it", "hf", "base", "mlx", "dynamic", "ud", "qat", "latest", "pt",
               "community", "unsloth", "bartowski", "lmstudio", "quantized", "model"}
_DATE = re.compile(r"^\d{4}$")  # release dates: -2507, -0324, -1124
_VERSION = re.compile(r"^v\d+(\.\d+)*$")
_SIZE = re.compile(r"^(\d+x)?\d+(\.\d+)?[bm]$|^a\d+(\.\d+)?b$")


@dataclass
class ResolvedModel:
    shape: ModelShape
    key: str | None  # preset key, None for a folder / config.json / GGUF file
    notes: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # what the files hold: weights / experts / head
    formats_source: str = ""  # where `formats` comes from (GGUF tensors, the name, the preset's native storage)


def split_name(text: str) -> tuple[list[str], str | None]:
    """(name tokens after normalisation, quantization named in the name)."""
    s = text.strip().split("/")[-1].lower().replace(":", "-")
    s = re.sub(r"\.gguf$", "", s)
    quant = None
    for m in QUANT_TOKEN.finditer(s):
        quant = quant or m.group(1)
    s = QUANT_TOKEN.sub(" ", s)
    tokens = [t for t in re.split(r"[-_\s]+", s) if t and t not in DROP_TOKENS and not _DATE.match(t)]
    if len(tokens) > 1 and tokens[0] == "meta" and tokens[1].startswith("llama"):
        tokens = tokens[1:]  # Meta-Llama-3-8B
    return tokens, quant


def _squash(tokens: list[str], versions: bool = True) -> str:
    return re.sub(r"[^a-z0-9]", "", "".join(t for t in tokens if versions or not _VERSION.match(t)))


def _sizes(tokens: list[str]) -> set[str]:
    return {t for t in tokens if _SIZE.match(t)}


def _index() -> dict[str, list[tuple[str, str]]]:
    """preset key -> [(name as written, its tokens squashed)] for the key, its source and its aliases."""
    out = {}
    for key, p in load_presets().items():
        names = [key, p.get("source", ""), *p.get("aliases", [])]
        out[key] = [(n, split_name(n)[0]) for n in names if n]
    return out


def find_preset(name: str) -> tuple[str | None, str]:
    """(preset key, how it matched) for a name as the field writes it; (None, '') when nothing fits."""
    tokens, _ = split_name(name)
    if not tokens:
        return None, ""
    index = _index()
    for versions in (True, False):
        q = _squash(tokens, versions)
        for key, names in index.items():
            for written, toks in names:
                if _squash(toks, versions) == q:
                    return key, ("name" if written.lower() == name.strip().lower() else f"normalised to {written!r}")
    q, sizes = _squash(tokens), _sizes(tokens)
    best = None
    for key, names in index.items():
        for written, toks in names:
            c = _squash(toks)
            if sizes and _sizes(toks) == sizes and len(c) >= 4 and q.startswith(c) and (not best or len(c) > best[2]):
                best = (key, written, len(c))
    if best:
        return best[0], f"closest catalog name {best[1]!r} (the name extends it)"
    return None, ""


def _suggest(name: str) -> str:
    import difflib

    keys = list(load_presets())
    close = difflib.get_close_matches(_squash(split_name(name)[0]), [_squash(split_name(k)[0]) for k in keys], 3, 0.5)
    by_sq = {_squash(split_name(k)[0]): k for k in keys}
    return ", ".join(by_sq[c] for c in close) or "see `strata analyze --list-models`"


def resolve_model(text: str) -> ResolvedModel:
    """A model from a folder (config.json, else its first .gguf), a config.json, a .gguf file or a catalog name."""
    from strata.analysis.gguf_shape import read_gguf
    from strata.weights.gguf_reader import is_gguf

    if os.path.isdir(text) and not os.path.exists(os.path.join(text, "config.json")):
        ggufs = sorted(f for f in os.listdir(text) if f.endswith(".gguf"))
        if not ggufs:
            raise ConfigError(f"--model {text!r}: folder has neither config.json nor a .gguf file")
        text = os.path.join(text, ggufs[0])  # split files: the first part carries the metadata
    if os.path.isfile(text) and (text.endswith(".gguf") or is_gguf(text)):
        shape, fmts, desc = read_gguf(text)
        return ResolvedModel(shape, None, [f"model: {desc}"], fmts, "the GGUF file's tensor types")
    if os.path.isdir(text) or (text.endswith(".json") and os.path.exists(text)):
        path, d = read_config_json(text)
        shape = shape_from_dict(d, name=os.path.basename(os.path.dirname(path)) or path)
        return ResolvedModel(shape, None, [f"model: {path}"])
    key, how = find_preset(text)
    if key is None:
        raise ConfigError(f"--model {text!r}: not a folder, config.json, .gguf file nor a catalog name; "
                          f"closest: {_suggest(text)}")
    p = load_presets()[key]
    res = ResolvedModel(shape_from_dict(p["config"], name=key), key)
    if how != "name" or text.strip().lower() != key:
        res.notes.append(f"model {text!r} -> preset {key} (config of {p['source']}; {how})")
    if p.get("note"):
        res.notes.append(f"model {key}: {p['note']}")
    _, qtoken = split_name(text)
    quant = p.get("quant", {})
    fmt = parse_published(qtoken) if qtoken else None
    if fmt:
        res.formats, res.formats_source = {"weights": fmt}, f"the name's {qtoken.upper()}"
        if fmt == "mxfp4" and "native" in quant:
            res.formats = dict(quant["native"])
    elif "gguf" in text.lower() and "gguf" in quant:
        res.formats, res.formats_source = dict(quant["gguf"]), "the preset's usual GGUF mix"
    elif "native" in quant:
        res.formats, res.formats_source = dict(quant["native"]), "the model's native storage"
    return res
