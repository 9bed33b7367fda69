"""`strata quantize`: quantized folders load and stay close to the float model; sharded MoE; mixed; bad input."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from strata.cli import main
from strata.layers.attention import AttentionMetadata
from strata.layers.quant_linear import QuantLinear
from strata.quant.format import QuantFormat, check_tensors
from strata.weights.loader import load_model

T = 24


def _logits(path) -> torch.Tensor:
    model = load_model(str(path), progress=False)
    ids = torch.randint(3, 256, (T,), generator=torch.Generator().manual_seed(0))  # both vocabs are larger
    with torch.no_grad():
        return model(ids, torch.arange(T), AttentionMetadata.no_cache([T])).float()


def _names(path) -> dict[str, list[int]]:
    out = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: list(h.get_slice(k).get_shape()) for k in h.keys()})  # noqa: SIM118
    return out


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt,max_err", [("int8", 0.03), ("fp8", 0.1), ("int8-nested-g64", 0.03),
                                         ("int4-g64", 0.3), ("int4-g32-asym", 0.3)])
def test_stories260k_round_trip(stories260k_hf, tmp_path, fmt, max_err):
    dst = tmp_path / "q"
    assert main(["quantize", "--format", fmt, "--no-progress", str(stories260k_hf), str(dst)]) == 0
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "strata" and cfg["format"] == fmt
    assert len(cfg["modules"]) == 5 * 7 and set(cfg["modules"].values()) == {fmt}
    names = _names(dst)
    assert "model.layers.0.mlp.down_proj.qweight" in names and "model.layers.0.mlp.down_proj.weight" not in names
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert {p.name for p in stories260k_hf.iterdir()} == {p.name for p in dst.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder renamed away
    model = load_model(str(dst), progress=False)
    assert isinstance(model.model.layers[4].mlp.down_proj, QuantLinear)  # FFN width 172: padded groups
    assert _rel(_logits(dst), _logits(stories260k_hf)) < max_err


@pytest.fixture(scope="module")
def sharded_moe(tmp_path_factory):
    from tests.models.conftest import build_hf, save_tiny_tokenizer

    path = tmp_path_factory.mktemp("qwen2moe")
    model = build_hf("qwen2_moe", path)
    model.save_pretrained(path, max_shard_size="60KB")  # several shards plus an index
    save_tiny_tokenizer(path)
    for stale in ("model.safetensors",):
        if (path / stale).exists() and (path / "model.safetensors.index.json").exists():
            os.remove(path / stale)
    return path


def test_sharded_moe_keeps_routers_and_loads(sharded_moe, tmp_path):
    assert len(list(sharded_moe.glob("*.safetensors"))) > 1
    dst = tmp_path / "q"
    assert main(["quantize", "--format", "int8", "--no-progress", str(sharded_moe), str(dst)]) == 0
    names = _names(dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(names)
    assert "model.layers.0.mlp.experts.3.gate_proj.qweight" in names
    assert "model.layers.0.mlp.shared_expert.down_proj.qweight" in names
    assert "model.layers.0.mlp.gate.weight" in names  # router stays float
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    assert "model.layers.0.self_attn.q_proj.bias" in names  # qwen2 biases copied
    assert "lm_head.weight" in names
    assert _rel(_logits(dst), _logits(sharded_moe)) < 0.03


def test_mixed_budget_gives_experts_their_own_width(sharded_moe, tmp_path):
    src_bytes = sum(f.stat().st_size for f in sharded_moe.glob("*.safetensors"))
    budget = int(src_bytes * 0.40)  # between all-int4 and all-int8 of this fp32 model
    imp = tmp_path / "imp.json"
    imp.write_text(json.dumps({"model.layers.0.mlp.experts.1": 100.0}))
    dst = tmp_path / "q"
    assert main(["quantize", "--mixed", "--budget", str(budget), "--importance", str(imp), "--no-progress",
                 str(sharded_moe), str(dst)]) == 0
    mods = json.loads((dst / "config.json").read_text())["quantization_config"]["modules"]
    assert set(mods.values()) == {"int8", "int4-g64"}
    assert mods["model.layers.0.mlp.experts.1.up_proj"] == "int8"  # the important expert got the bits
    experts = {m.rsplit(".", 1)[0] for m in mods if ".experts." in m}
    for e in experts:  # one width per expert
        assert len({mods[f"{e}.{p}"] for p in ("gate_proj", "up_proj", "down_proj")}) == 1
    assert sum(f.stat().st_size for f in dst.glob("*.safetensors")) <= budget + 64 * 1024  # headers
    assert _rel(_logits(dst), _logits(sharded_moe)) < 0.3


def _fails(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_bad_input(stories260k_hf, tmp_path, capsys):
    src, dst = str(stories260k_hf), str(tmp_path / "q")
    _fails(capsys, ["quantize", "--format", "int5", src, dst], "expected one of")
    _fails(capsys, ["quantize", "--format", "int4-g48", src, dst], "power of two")
    _fails(capsys, ["quantize", "--format", "int8", str(tmp_path / "nope"), dst], "config.json missing")
    _fails(capsys, ["quantize", "--budget", "1GiB", src, dst], "need --mixed")
    _fails(capsys, ["quantize", "--method", "awq", src, dst], "--method 'awq': expected one of rtn, peak, clip, gptq")
    _fails(capsys, ["quantize", "--method", "gptq", src, dst], "--method gptq needs calibration")
    _fails(capsys, ["quantize", "--method", "tune", src, dst], "--method tune needs calibration text")
    _fails(capsys, ["quantize", "--method", "tune", "--calibration", str(tmp_path / "s.safetensors"), src, dst],
           "--method tune needs calibration text")
    _fails(capsys, ["quantize", "--mixed", "--budget", "1KiB", "--no-progress", src, dst], "too small")
    bad = tmp_path / "truncated"
    bad.mkdir()
    for f in stories260k_hf.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    _fails(capsys, ["quantize", "--format", "int8", "--no-progress", str(bad), dst], "not a valid safetensors")
    assert not (tmp_path / "q").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "q").mkdir()
    _fails(capsys, ["quantize", "--format", "int8", "--no-progress", src, dst], "already exists")
    assert main(["quantize", "--format", "int8", "--no-progress", "--force", src, dst]) == 0
    _fails(capsys, ["quantize", "--format", "int8", "--no-progress", dst, str(tmp_path / "q2")], "already quantized")


def test_gptq_with_calibration_text(stories260k_hf, tmp_path):
    text = tmp_path / "calib.txt"  # calibration text that is not the evaluation text
    text.write_text("Once upon a time there was a little dog. He liked to play in the park with his ball.\n" * 8)
    dst, stats = tmp_path / "q", tmp_path / "stats.safetensors"
    assert main(["quantize", "--format", "int4-g64", "--method", "gptq", "--calibrate-data", str(text),
                 "--calibrate-tokens", "256", "--save-calibration", str(stats), "--no-progress",
                 str(stories260k_hf), str(dst)]) == 0
    with safe_open(str(stats), framework="pt") as h:
        assert list(h.get_slice("model.layers.0.mlp.down_proj.input_second_moment").get_shape()) == [172, 172]
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert set(cfg["modules"].values()) == {"int4-g64"}


def test_tune_writes_the_same_layout_and_runs(stories260k_hf, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a little dog. He liked to play in the park with his ball.\n" * 8)
    dst = tmp_path / "q"
    assert main(["quantize", "--format", "int4-g64", "--method", "tune", "--tune-steps", "4", "--calibrate-data",
                 str(text), "--calibrate-tokens", "256", "--no-progress", str(stories260k_hf), str(dst)]) == 0
    names = _names(dst)
    assert names["model.layers.0.mlp.down_proj.qweight"] == [64, 96]  # 172 inputs padded to 192, two per byte
    assert names["model.layers.0.mlp.down_proj.scales"] == [64, 3]
    model = load_model(str(dst), progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert _rel(_logits(dst), _logits(stories260k_hf)) < 0.3


def test_lm_head_quantized_on_request(sharded_moe, tmp_path, capsys):
    dst = tmp_path / "q"
    assert main(["quantize", "--format", "int4-g32", "--lm-head", "int8", "--no-progress", str(sharded_moe),
                 str(dst)]) == 0
    assert "lm_head in int8" in capsys.readouterr().out
    names = _names(dst)
    assert "lm_head.qweight" in names and "lm_head.weight" not in names
    mods = json.loads((dst / "config.json").read_text())["quantization_config"]["modules"]
    assert mods["lm_head"] == "int8"
    model = load_model(str(dst), progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert _rel(_logits(dst), _logits(sharded_moe)) < 0.3


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    from tests.models.conftest import build_hf

    path = tmp_path_factory.mktemp("llama-tied")
    build_hf("llama", path)  # tie_word_embeddings=true: no lm_head.weight in the file
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _names(path)
    return path


@pytest.mark.parametrize("fmt,max_err", [("int8", 0.01), ("int4-g32", 0.1), ("int4-g64-asym", 0.1)])
def test_lm_head_quantized_when_tied(tied_llama, tmp_path, fmt, max_err):
    """--lm-head on tied embeddings: the output projection gets its own quantized copy of the embedding
    matrix (quantized bytes), the lookup keeps the float rows, and the logits move only by that copy's error."""
    body, head = tmp_path / "body", tmp_path / "head"
    assert main(["quantize", "--format", "int8", "--no-progress", str(tied_llama), str(body)]) == 0
    assert main(["quantize", "--format", "int8", "--lm-head", fmt, "--no-progress", str(tied_llama),
                 str(head)]) == 0
    config = json.loads((head / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["modules"]["lm_head"] == fmt
    f = QuantFormat.parse(fmt)
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    with safe_open(str(head / "model.safetensors"), framework="pt") as h, \
            safe_open(str(tied_llama / "model.safetensors"), framework="pt") as src:
        assert "lm_head.weight" not in h.keys()  # noqa: SIM118
        stored = {s: h.get_tensor(f"lm_head.{s}") for s in f.tensor_specs(1, 1)}
        assert torch.equal(h.get_tensor("model.embed_tokens.weight"), src.get_tensor("model.embed_tokens.weight"))
    check_tensors(stored, f, vocab, hidden, "lm_head")
    assert sum(t.nbytes for t in stored.values()) == f.nbytes(vocab, hidden)
    assert f.nbytes(vocab, hidden) < vocab * hidden * 2 * (0.55 if f.bits == 8 else 0.35)  # vs bf16 rows
    model = load_model(str(head), progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt == f and not model.lm_head.qweight.is_meta
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ref = _logits(body)  # the same int8 body, the output projection tied to the float embeddings
    assert 0 < _rel(_logits(head), ref) < max_err
