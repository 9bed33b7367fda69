"""DeepSeek-V2/V3 GGUF files made by llama.cpp's own converter (convert_hf_to_gguf.py, arch `deepseek2`, kv_b_proj
split into attn_k_b / attn_v_b) from tiny random checkpoints: Strata converts them back and gives
transformers' logits. Skipped without a llama.cpp checkout: STRATA_LLAMA_CPP names one, else the vendored
copy under .cache/peers/ (benchmarks/peers/install_llamacpp.sh) is used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from strata.layers.attention import AttentionMetadata
from strata.weights.gguf_convert import convert_gguf
from strata.weights.loader import load_model
from tests.models.test_deepseek import BASE, build_hf

ROOT = Path(__file__).resolve().parents[2]


def _converter() -> Path | None:
    env = os.environ.get("STRATA_LLAMA_CPP")
    found = [Path(env) / "convert_hf_to_gguf.py"] if env else sorted(
        (ROOT / ".cache" / "peers").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return next((f for f in reversed(found) if f.exists()), None)


CONVERTER = _converter()
pytestmark = pytest.mark.skipif(CONVERTER is None, reason="llama.cpp's convert_hf_to_gguf.py not found")
# The tiny test tokenizer's pre-tokenizer is plain byte-level BPE, GPT-2's; the converter only knows
# published tokenizers by hash, so it is told which one this is.
RUN = """import sys
sys.path.insert(0, {dir!r})
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outfile", {out!r}, "--outtype", "f32"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def llama_cpp_gguf(hf_dir: Path, out: Path) -> Path:
    code = RUN.format(dir=str(CONVERTER.parent), src=str(hf_dir), out=str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("variant,scoring", [("v2_greedy", "softmax"), ("v3_yarn", "sigmoid")])
def test_llama_cpp_converted_gguf_equals_transformers(tmp_path, variant, scoring):
    hf_dir = tmp_path / "hf"
    hf = build_hf(variant, hf_dir)
    cfg_path = hf_dir / "config.json"  # as DeepSeek's published configs: the keys llama.cpp reads
    cfg = json.loads(cfg_path.read_text())
    cfg.update(num_key_value_heads=cfg["num_attention_heads"], scoring_func=scoring,
               topk_method="noaux_tc" if scoring == "sigmoid" else cfg.get("topk_method", "greedy"))
    cfg_path.write_text(json.dumps(cfg))
    path = llama_cpp_gguf(hf_dir, tmp_path / "m.gguf")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "blk.1.attn_k_b.weight" in names and "blk.1.attn_v_b.weight" in names
    assert ("blk.1.exp_probs_b.bias" in names) == (scoring == "sigmoid")
    out = convert_gguf(path, tmp_path / "back")
    want_arch = "DeepseekV3ForCausalLM" if scoring == "sigmoid" else "DeepseekV2ForCausalLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == [want_arch]
    ids = torch.randint(3, BASE["vocab_size"], (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    got = load_model(str(out), progress=False)(ids, torch.arange(30), AttentionMetadata.no_cache([30]))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
