"""HF folders the llama.cpp converter can read: adds an offline tokenizer to checkpoints that have none.

The synthetic benchmark checkpoints (benchmarks/synthetic.py) carry no tokenizer, and convert_hf_to_gguf.py
needs one. The cached folder is never modified: a sibling under .cache/peers/hf/<name>/ symlinks every file
of it and adds the tokenizer beside them.

- vocab 32000: the Mistral-7B-v0.1 SentencePiece `tokenizer.model` (Llama-style, bos 1 / eos 2), taken from
  the mistral-common wheel (pip download, unzip; not installed, it would downgrade numpy in .venv).
- any other vocab: the GPT-NeoX byte-level BPE (OLMoE's tokenizer family) rebuilt as a `tokenizer.json` from
  the vocab-only `ggml-vocab-gpt-neox.gguf` in the llama-cpp-python sdist, cut to the model's vocab size; the
  converter pads the ids above it with [PAD] tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS = Path(os.environ.get("STRATA_PEERS_DIR") or ROOT / ".cache" / "peers")  # the sdist, wheels, GGUF cache
MISTRAL_COMMON = "1.13.1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def vendor_dir() -> Path:
    """vendor/llama.cpp of the unpacked sdist (install_llamacpp.sh puts it there)."""
    found = sorted(PEERS.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise FileNotFoundError(f"no convert_hf_to_gguf.py under {PEERS}: run benchmarks/peers/install_llamacpp.sh")
    return found[-1].parent


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in TOKENIZER_FILES)


def with_tokenizer(hf_folder: str | Path) -> Path:
    """`hf_folder` itself if it has a tokenizer, else .cache/peers/hf/<name>/ (symlinks + a tokenizer)."""
    src = Path(hf_folder).resolve()
    if has_tokenizer(src):
        return src
    out = PEERS / "hf" / src.name
    if has_tokenizer(out):
        return out
    tmp = out.with_name(f".{src.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        link = tmp / f.name
        if not link.exists():
            link.symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    if vocab == 32000:
        (tmp / "tokenizer.model").write_bytes(_mistral_sentencepiece())
    else:
        _write_neox_bpe(tmp, vocab)
    os.replace(tmp, out)
    return out


def _mistral_sentencepiece() -> bytes:
    wheels = PEERS / "wheels"
    found = sorted(wheels.glob(f"mistral_common-{MISTRAL_COMMON}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"mistral-common=={MISTRAL_COMMON}",
                        "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(f"mistral_common-{MISTRAL_COMMON}-*.whl"))
    with zipfile.ZipFile(found[-1]) as z:
        return z.read("mistral_common/data/tokenizer.model.v1")


def _write_neox_bpe(folder: Path, vocab_size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vendor = vendor_dir()
    sys.path.insert(0, str(vendor / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(vendor / "models" / "ggml-vocab-gpt-neox.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    # ids from 50277 up are the file's own [PAD] fillers; the converter adds its own up to vocab_size
    n = min(vocab_size, next(i for i, t in enumerate(tokens) if t.startswith("[PAD")))
    vocab = {t: i for i, t in enumerate(tokens[:n])}
    merges = []
    for m in reader.fields["tokenizer.ggml.merges"].contents():
        a, b = m.split(" ")
        if a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    control = int(gguf.TokenType.CONTROL)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in range(n) if types[i] == control])
    tok.save(str(folder / "tokenizer.json"))
    # no bos/eos here: the converter then takes bos_token_id/eos_token_id from the model's config.json
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
