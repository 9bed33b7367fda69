"""Opening a GGUF file with the `gguf` package: metadata as plain Python values, tensors as float arrays.

The `gguf` package parses the file; this module turns what can go wrong (a truncated file, a quantization
type the package does not know, a tensor it cannot dequantize) into one-line WeightsErrors naming the file
and the tensor, and gives tensors in the orientation of PyTorch weights (`[out_features, in_features]`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strata.errors import UnsupportedError, WeightsError

GGUF_MAGIC = b"GGUF"


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a runtime dependency
        raise UnsupportedError("reading GGUF files needs the 'gguf' package (pip install gguf)") from None
    return gguf


@dataclass
class GGUFTensorInfo:
    name: str
    type_name: str  # GGMLQuantizationType name: F32, Q4_1, ...
    shape: tuple[int, ...]  # PyTorch order (outermost first): a [rows, cols] matrix is ggml's ne = (cols, rows)
    raw: Any  # gguf.ReaderTensor


class GGUFFile:
    """Metadata and tensors of one GGUF file; the tensor data stays memory-mapped until dequantized."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise WeightsError(f"{self.path}: GGUF file not found")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise WeightsError(f"{self.path}: not a GGUF file (expected magic b'GGUF', found {magic!r})")
        self.reader = self._open()
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except (ValueError, UnicodeDecodeError, IndexError) as e:
                raise WeightsError(f"{self.path}: metadata field '{key}' cannot be read ({e})") from None
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for t in self.reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = GGUFTensorInfo(t.name, t.tensor_type.name, shape, t)

    def _open(self):
        gguf = _gguf()
        reader_cls = _checked_reader_class(gguf, self.path)
        try:
            return reader_cls(self.path)
        except WeightsError:
            raise
        except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, MemoryError) as e:
            # numpy raises these when the header itself is cut short or holds impossible counts
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(f"{self.path}: truncated or corrupt GGUF header ({msg})") from None

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise WeightsError(f"{self.path}: metadata field 'general.architecture' missing")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise WeightsError(f"{self.path}: metadata field '{key}' missing")
        return self.metadata[key]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name` as a float32 array in PyTorch order (exact for F32/F16/BF16, dequantized otherwise)."""
        gguf = _gguf()
        info = self.tensors.get(name)
        if info is None:
            raise WeightsError(f"{self.path}: tensor '{name}' missing")
        t = info.raw
        try:
            data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise UnsupportedError(f"{self.path}: tensor '{name}' has type {info.type_name}, which the gguf "
                                   f"package cannot dequantize") from None
        if data.size != int(np.prod(info.shape)):
            raise WeightsError(f"{self.path}: tensor '{name}' holds {data.size} values, its shape "
                               f"{list(info.shape)} needs {int(np.prod(info.shape))}")
        return data.reshape(info.shape)


def _checked_reader_class(gguf, path: str):
    """GGUFReader that checks each tensor's type and extent before the package maps it.

    The package itself fails on these with errors that name neither the file nor the tensor (an enum
    ValueError for an unknown type, a numpy reshape error for a truncated file).
    """

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            file_size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                code = int(raw_dtype[0])
                try:
                    qtype = gguf.GGMLQuantizationType(code)
                except ValueError:
                    raise WeightsError(f"{path}: tensor '{name}' has unknown quantization type {code} (gguf "
                                       f"{_version(gguf)} knows {', '.join(t.name for t in gguf.GGMLQuantizationType)})"
                                       ) from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n = int(np.prod(dims.astype(np.int64))) if len(dims) else 1
                if len(dims) and n % block:
                    raise WeightsError(f"{path}: tensor '{name}' of type {qtype.name} has {n} values, not a "
                                       f"multiple of its block of {block}")
                end = int(start_offs) + int(offset[0]) + n // block * type_size
                if end > file_size:
                    raise WeightsError(f"{path}: truncated: tensor '{name}' ends at byte {end}, the file has "
                                       f"{file_size} bytes")
            super()._build_tensors(start_offs, fields)

    return CheckedReader


def _version(gguf) -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001 - only used in a message
        return "package"


def is_gguf(path: str | os.PathLike) -> bool:
    """A regular file that starts with the GGUF magic (the suffix is not required)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC
