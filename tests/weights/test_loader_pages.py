"""The loader hands back the file pages of a tensor it casts to the compute dtype: a float32 embedding loaded as
bfloat16 must not also stay resident as float32 while the file's other tensors keep its mapping alive."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from strata.weights.loader import load_model
from tests.models.conftest import COMMON

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")


def _mapped_rss(path: str) -> int:
    """Resident bytes of this process's mappings of `path`."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return rss


def test_cast_tensor_pages_released(tmp_path):
    cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": 16384, "tie_word_embeddings": True})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    state = load_file(str(st))
    # the embedding float32 (4 MiB, cast on load), every other tensor bfloat16 (loaded as views of the file)
    state = {k: v.float() if k == "model.embed_tokens.weight" else v.to(torch.bfloat16) for k, v in state.items()}
    save_file(state, str(st), metadata={"format": "pt"})
    embed_bytes = state["model.embed_tokens.weight"].nbytes
    model = load_model(str(tmp_path), dtype="bfloat16", progress=False)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"].to(torch.bfloat16))
    rss = _mapped_rss(str(st.resolve()))
    if rss == 0:
        pytest.skip("the checkpoint's mapping is not alive after loading here: nothing to release")
    assert rss < embed_bytes // 2, f"{rss} bytes of the file resident, the float32 embedding is {embed_bytes}"
