"""Writing a file so that nothing is lost: the content goes to a temporary file beside the target, which is
then renamed over it in one step (a reader sees the old file or the new one, never half of one)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file replaces an ordinary one
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))



def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """out may be written: absent, an empty folder, or overwrite is set."""
    from strata.errors import WeightsError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise WeightsError(f"{out}: output folder exists and is not empty (pass --force to replace it)")
    return out


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside out; when the block ends without error it becomes out (an existing out
    is replaced), otherwise it is deleted. Readers see the old folder or the whole new one, never a part."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
