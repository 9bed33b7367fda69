"""`--model FILE.gguf`: the file is converted once into a cache folder, and that folder is what gets loaded.

The folder lives in `gguf/` of the cache folder ($STRATA_CACHE_DIR, default ~/.cache/strata), named after
the file and a key of its resolved path, size, modification time, first and last MiB, and the converter
version, so an edited or replaced file converts again. A lock file serialises processes converting the same
file; the conversion itself writes a temporary folder and renames it, so a reader never sees half a folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path

from strata.layers.quant_native import cache_dir
from strata.weights.gguf_reader import is_gguf

CONVERTER_VERSION = 4  # bump when the converter's output changes, so cached folders are rebuilt
_EDGE_BYTES = 2**20


def cache_root() -> Path:
    return cache_dir() / "gguf"


def file_key(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    st = p.stat()
    h = hashlib.sha256(f"{CONVERTER_VERSION}\0{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with open(p, "rb") as f:
        h.update(f.read(_EDGE_BYTES))
        if st.st_size > _EDGE_BYTES:
            f.seek(max(st.st_size - _EDGE_BYTES, _EDGE_BYTES))
            h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()[:16]


def converted_folder(path: str | os.PathLike, progress: bool = True) -> Path:
    """The cached HF folder for this GGUF file, converting it first if there is none yet."""
    from strata.weights.gguf_convert import convert_gguf

    stem = Path(path).name.removesuffix(".gguf")
    out = cache_root() / f"{stem}-{file_key(path)}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same file: wait, then use its folder
        if not (out / "config.json").exists():
            if progress:
                print(f"converting {path} -> {out} (once)", file=sys.stderr)
            # Q4_0, Q8_0, Q4_1, Q5_0, Q5_1 and K-quant tensors run from their blocks (Strata's own kernels);
            # other types as the float conversion
            convert_gguf(path, out, overwrite=True, keep_quantized=None)
    return out


def resolve_model_path(path: str, progress: bool = True) -> str:
    """An HF folder as given; a GGUF file as its converted cache folder."""
    if os.path.isfile(path) and is_gguf(path):
        return str(converted_folder(path, progress))
    return path
