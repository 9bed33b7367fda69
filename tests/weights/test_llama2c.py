"""llama2.c -> HF Llama export: run.c greedy references through transformers, format parity, error lines."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from strata.cli import main
from strata.errors import UnsupportedError, WeightsError
from strata.models.registry import load_config
from strata.weights.llama2c import MAGIC, convert_llama2c, read_llama2c

STORIES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "stories260k"
pytestmark = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason="stories260k absent")
transformers = pytest.importorskip("transformers")

GREEDY = ["greedy_noprompt_n256", "greedy_noprompt_n200", "greedy_once_upon_a_time_n64"]


@pytest.fixture(scope="module")
def greedy_runs(stories260k_hf):
    """One transformers greedy generation per distinct prompt, as long as the longest case with it."""
    model = transformers.LlamaForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    cases = json.loads((STORIES / "reference_outputs.json").read_text())["cases"]
    longest: dict[tuple, int] = {}
    for name in GREEDY:
        prompt = tuple(cases[name]["derived_prompt_token_ids"])
        longest[prompt] = max(longest.get(prompt, 0), cases[name]["steps"])
    runs = {}
    for prompt, steps in longest.items():
        ids = torch.tensor([prompt])
        # run.c feeds positions 0..steps-1 and prints the token sampled at the last: steps + 1 ids with BOS
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_length=steps + 1)
        runs[prompt] = out[0].tolist()
    return cases, runs


@pytest.mark.parametrize("name", GREEDY)
def test_transformers_greedy_equals_run_c(greedy_runs, name):
    cases, runs = greedy_runs
    case = cases[name]
    want = case["derived_sequence_token_ids"]
    assert runs[tuple(case["derived_prompt_token_ids"])][: case["steps"] + 1] == want


def test_folder_loads_in_autotokenizer_and_strata(stories260k_hf):
    tok = transformers.AutoTokenizer.from_pretrained(stories260k_hf)
    assert tok("Once upon a time").input_ids == [1, 403, 407, 261, 378]
    assert tok("").input_ids == [1]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    cfg = load_config(stories260k_hf)
    assert (cfg.architecture, cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == ("LlamaForCausalLM", 64, 4, 8)
    assert (cfg.tie_word_embeddings, cfg.rms_norm_eps, cfg.max_position_embeddings) == (True, 1e-5, 512)
    assert json.loads((stories260k_hf / "generation_config.json").read_text())["eos_token_id"] == [2, 1]


def test_v1_and_model_tokenizer_give_identical_files(stories260k_hf, tmp_path):
    out = convert_llama2c(STORIES / "stories260K_v1.bin", STORIES / "tok512.model", tmp_path / "v1")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (stories260k_hf / name).read_bytes(), name


# ---- synthetic untied checkpoint, checked against a numpy port of run.c's forward ----------------------
def _synthetic(seed=0, dim=16, hidden=24, layers=2, heads=4, kv_heads=2, vocab=512, seq=32):
    rng = np.random.default_rng(seed)
    c = {"dim": dim, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "vocab": vocab,
         "seq": seq}
    kv = kv_heads * dim // heads

    def r(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    t = {"emb": r(vocab, dim), "rms_att": 1 + r(layers, dim), "wq": r(layers, dim, dim), "wk": r(layers, kv, dim),
         "wv": r(layers, kv, dim), "wo": r(layers, dim, dim), "rms_ffn": 1 + r(layers, dim),
         "w1": r(layers, hidden, dim), "w2": r(layers, dim, hidden), "w3": r(layers, hidden, dim),
         "rms_final": 1 + r(dim), "wcls": r(vocab, dim)}
    return c, t


def _write(path, c, t, version):
    ints = [c["dim"], c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["vocab"], c["seq"]]
    mats = [t[k] for k in ("wq", "wk", "wv", "wo")]
    if version == 0:
        ints[5] = -ints[5]  # negative vocab: separate classifier
        half = c["dim"] // c["heads"] // 2
        freqs = np.zeros((2, c["seq"], half), np.float32)
        arrays = [t["emb"], t["rms_att"], *mats, t["rms_ffn"], t["w1"], t["w2"], t["w3"], t["rms_final"], freqs]
        head = struct.pack("<7i", *ints)
    else:
        arrays = [t["rms_att"], t["rms_ffn"], t["rms_final"], t["emb"], *mats, t["w1"], t["w2"], t["w3"]]
        head = struct.pack("<Ii7iB", MAGIC, 1, *ints, 0).ljust(256, b"\0")
    path.write_bytes(head + b"".join(a.astype("<f4").tobytes() for a in [*arrays, t["wcls"]]))
    return path


def _run_c_logits(c, t, tokens):
    """run.c's forward over a whole sequence, in float64: adjacent-pair RoPE, GQA, SwiGLU."""
    T, hs = len(tokens), c["dim"] // c["heads"]
    rep = c["heads"] // c["kv_heads"]
    t = {k: v.astype(np.float64) for k, v in t.items()}

    def rmsnorm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    def rope(x):  # [T, n, hs], rotating pairs (2i, 2i+1) by pos * 10000^(-2i/hs)
        ang = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, hs, 2) / hs)  # [T, hs/2]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return np.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(x.shape)

    x = t["emb"][tokens]  # [T, dim]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(c["layers"]):
        xb = rmsnorm(x, t["rms_att"][i])
        q = rope((xb @ t["wq"][i].T).reshape(T, c["heads"], hs))
        k = np.repeat(rope((xb @ t["wk"][i].T).reshape(T, c["kv_heads"], hs)), rep, axis=1)
        v = np.repeat((xb @ t["wv"][i].T).reshape(T, c["kv_heads"], hs), rep, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hs) + mask  # [heads, T, T]
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(T, -1) @ t["wo"][i].T
        xb = rmsnorm(x, t["rms_ffn"][i])
        g = xb @ t["w1"][i].T
        x = x + (g / (1 + np.exp(-g)) * (xb @ t["w3"][i].T)) @ t["w2"][i].T
    return rmsnorm(x, t["rms_final"]) @ t["wcls"].T  # [T, vocab]


def test_untied_gqa_checkpoint_matches_run_c_forward(tmp_path):
    c, t = _synthetic()
    v0 = convert_llama2c(_write(tmp_path / "v0.bin", c, t, 0), STORIES / "tok512.bin", tmp_path / "hf0")
    v1 = convert_llama2c(_write(tmp_path / "v1.bin", c, t, 1), STORIES / "tok512.bin", tmp_path / "hf1")
    assert (v0 / "model.safetensors").read_bytes() == (v1 / "model.safetensors").read_bytes()
    assert json.loads((v0 / "config.json").read_text())["tie_word_embeddings"] is False
    model = transformers.LlamaForCausalLM.from_pretrained(v0, dtype=torch.float32).eval()
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(got, _run_c_logits(c, t, tokens), rtol=1e-4, atol=1e-4)


# ---- one-line errors -------------------------------------------------------------------------
def test_missing_files(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.bin: checkpoint file not found"):
        convert_llama2c(tmp_path / "nope.bin", STORIES / "tok512.bin", tmp_path / "out")
    with pytest.raises(WeightsError, match=r"nope\.model: tokenizer file not found"):
        convert_llama2c(STORIES / "stories260K.bin", tmp_path / "nope.model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["stories260K.bin", "stories260K_v1.bin"])
def test_truncated_checkpoint(tmp_path, source):
    bad = tmp_path / "cut.bin"
    bad.write_bytes((STORIES / source).read_bytes()[:-4])
    with pytest.raises(WeightsError, match=r"cut\.bin: truncated: header \(dim=64.*implies \d+ bytes, file has \d+"):
        read_llama2c(bad)


def test_bad_magic_and_version(tmp_path):
    raw = (STORIES / "stories260K_v1.bin").read_bytes()
    cases = {
        b"\xff" * 28 + raw[28:]: (WeightsError, r"bad magic: expected 0x616b3432 \('ak42'\)"),
        raw[:4] + struct.pack("<i", 7) + raw[8:]: (WeightsError, "unknown llama2.c checkpoint version 7"),
        raw[:4] + struct.pack("<i", 2) + raw[8:]: (UnsupportedError, r"version 2 \(int8 Q8_0\)"),
        raw[:10]: (WeightsError, r"truncated llama2.c checkpoint \(10 bytes, header needs 28\)"),
        raw[:100]: (WeightsError, r"truncated llama2.c checkpoint \(100 bytes, header needs 256\)"),
    }
    for data, (exc, msg) in cases.items():
        (tmp_path / "x.bin").write_bytes(data)
        with pytest.raises(exc, match=msg):
            read_llama2c(tmp_path / "x.bin")


def test_vocab_size_mismatch(tmp_path):
    raw = (STORIES / "tok512.bin").read_bytes()
    pos = 4
    for _ in range(500):
        pos += 8 + struct.unpack_from("<i", raw, pos + 4)[0]
    (tmp_path / "tok500.bin").write_bytes(raw[:pos])
    with pytest.raises(WeightsError, match=r"tok500\.bin: tokenizer has 500 pieces but checkpoint .* vocab_size 512"):
        convert_llama2c(STORIES / "stories260K.bin", tmp_path / "tok500.bin", tmp_path / "out")


def test_cli_convert_and_error_line(tmp_path, capsys):
    args = ["convert", "llama2c", str(STORIES / "stories260K_v1.bin"), str(STORIES / "tok512.bin")]
    assert main([*args, str(tmp_path / "hf")]) == 0
    assert "vocab=512" in capsys.readouterr().out
    assert main([*args, str(tmp_path / "hf")]) == 2  # exists and not empty
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--force" in err and "\n" not in err
    assert main([*args, str(tmp_path / "hf"), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp folders left behind
