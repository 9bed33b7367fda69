"""Bad input gives one line naming the file/field/tensor, exit code 2, and no traceback."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from strata.cli import main
from strata.errors import WeightsError
from tests.models.conftest import build_hf


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    build_hf("llama", path)
    return path


def _copy(good, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(good, dst)
    return dst


def _run(capsys, path) -> str:
    rc = main(["generate", "--model", str(path), "--max-tokens", "2", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(capsys, tmp_path):
    assert "model folder not found" in _run(capsys, tmp_path / "nope")


def test_missing_config(capsys, good, tmp_path):
    m = _copy(good, tmp_path)
    (m / "config.json").unlink()
    msg = _run(capsys, m)
    assert "config.json" in msg and "not found" in msg


def test_unknown_architecture(capsys, good, tmp_path):
    m = _copy(good, tmp_path)
    _edit_config(m, architectures=["FancyNetForCausalLM"])
    msg = _run(capsys, m)
    assert "FancyNetForCausalLM" in msg and "LlamaForCausalLM" in msg


@pytest.mark.parametrize("field,value,expect", [
    ("num_attention_heads", -4, "num_attention_heads"),
    ("hidden_size", "wide", "hidden_size"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("torch_dtype", "float8", "torch_dtype"),
    ("rms_norm_eps", -1, "rms_norm_eps"),
    ("rms_norm_eps", 1e30, "rms_norm_eps"),
    ("rope_theta", 0, "rope_theta"),
    ("rope_theta", -10000.0, "rope_theta"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),  # bool("false") is True
    ("attention_bias", "no", "attention_bias"),
    ("max_position_embeddings", 0, "max_position_embeddings"),
])
def test_invalid_config_value(capsys, good, tmp_path, field, value, expect):
    m = _copy(good, tmp_path)
    _edit_config(m, **{field: value})
    msg = _run(capsys, m)
    assert expect in msg and "config.json" in msg and repr(value) in msg


def test_missing_tensor(capsys, good, tmp_path):
    m = _copy(good, tmp_path)
    sd = load_file(m / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, m / "model.safetensors")
    msg = _run(capsys, m)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg and "[96, 64]" in msg


def test_misshaped_tensor(capsys, good, tmp_path):
    m = _copy(good, tmp_path)
    sd = load_file(m / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:16].clone()
    save_file(sd, m / "model.safetensors")
    msg = _run(capsys, m)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[16, 64]" in msg and "[32, 64]" in msg


def test_truncated_safetensors(capsys, good, tmp_path):
    m = _copy(good, tmp_path)
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = _run(capsys, m)
    assert "model.safetensors" in msg


def test_cli_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "strata.cli", "info", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    assert "config.json" in r.stderr


def test_fewer_layers_in_config_than_in_checkpoint(capsys, good, tmp_path):
    m = _copy(good, tmp_path)
    _edit_config(m, num_hidden_layers=2)
    msg = _run(capsys, m)
    assert "layer 2" in msg and "num_hidden_layers=2" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(capsys, good, tmp_path, value):
    m = _copy(good, tmp_path)
    sd = load_file(m / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(sd, m / "model.safetensors")
    msg = _run(capsys, m)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "1 NaN/inf" in msg
    rc = main(["generate", "--model", str(m), "--max-tokens", "2", "--no-check-weights", "hi"])
    err = capsys.readouterr().err
    assert "holds 1 NaN/inf" not in err  # loaded; the sampler then refuses to turn NaN logits into tokens
    assert rc == 0 or (rc == 2 and "NaN/inf logits" in err)


def test_integer_tensor_where_floats_belong(capsys, good, tmp_path):
    m = _copy(good, tmp_path)
    sd = load_file(m / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    save_file(sd, m / "model.safetensors")
    msg = _run(capsys, m)
    assert "model.norm.weight" in msg and "int32" in msg and "floating-point" in msg


def test_float16_sum_overflow_is_not_mistaken_for_inf():
    from strata.weights.checks import check_finite_values

    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # finite values whose float16 sum overflows
    assert not torch.isfinite(big.sum())
    check_finite_values("f", "t", big)


def test_float8_weights_are_checked():
    from strata.weights.checks import check_finite_values

    t = torch.randn(64, 64).to(torch.float8_e4m3fn)
    check_finite_values("f", "t", t)
    t.view(torch.uint8)[3, 7] = 0x7F  # e4m3fn NaN
    with pytest.raises(WeightsError, match="holds 1 NaN/inf"):
        check_finite_values("f", "t", t)
