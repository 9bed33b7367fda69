"""Broken or unsupported GGUF files: one line naming the file and the tensor/field, exit code 2, no output folder;
and `--model FILE.gguf` converting once into the cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from strata.cli import main
from strata.errors import StrataError, UnsupportedError, WeightsError
from strata.weights.gguf_convert import convert_gguf
from tests.weights.gguf_writer import write_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def hf_llama(hf_models):
    return hf_models("llama")[1]


@pytest.fixture(scope="module")
def good_gguf(hf_llama, tmp_path_factory):
    return write_gguf(hf_llama, tmp_path_factory.mktemp("gguf") / "m.gguf")


def _cli_error(capsys, gguf_path, out) -> str:
    assert main(["convert", "gguf", str(gguf_path), str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not out.exists()
    return lines[0]


def test_truncated_file_names_the_tensor(capsys, good_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = good_gguf.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    line = _cli_error(capsys, cut, tmp_path / "out")
    assert str(cut) in line and "truncated" in line and "tensor '" in line


def test_truncated_header(capsys, good_gguf, tmp_path):
    cut = tmp_path / "head.gguf"
    cut.write_bytes(good_gguf.read_bytes()[:200])
    line = _cli_error(capsys, cut, tmp_path / "out")
    assert str(cut) in line and "truncated or corrupt GGUF header" in line


def test_not_a_gguf(capsys, tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    assert "not a GGUF file" in _cli_error(capsys, bad, tmp_path / "out")


def test_unknown_quantization_type(good_gguf, tmp_path):
    data = bytearray(good_gguf.read_bytes())
    name = b"output_norm.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)  # tensor info: n_dims, dims, type
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "q.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"tensor 'output_norm.weight' has unknown quantization type 99"):
        convert_gguf(bad, tmp_path / "out")


@pytest.mark.parametrize("tensor", ["blk.1.ffn_up.weight", "blk.0.attn_k.weight"])
def test_tensor_of_wrong_shape(capsys, hf_llama, tmp_path, tensor):
    def narrow(named):
        named[tensor] = named[tensor][:-2]  # two rows short
        return named

    bad = write_gguf(hf_llama, tmp_path / "s.gguf", tensors=narrow)
    line = _cli_error(capsys, bad, tmp_path / "out")
    assert str(bad) in line and f"tensor '{tensor}'" in line and "expected" in line


def test_missing_tensor(hf_llama, tmp_path):
    def drop(named):
        del named["blk.2.ffn_down.weight"]
        return named

    with pytest.raises(WeightsError, match=r"no tensor for 'model.layers.2.mlp.down_proj.weight'"):
        convert_gguf(write_gguf(hf_llama, tmp_path / "d.gguf", tensors=drop), tmp_path / "out")


def test_vocabulary_not_matching_embedding(capsys, hf_llama, tmp_path):
    bad = write_gguf(hf_llama, tmp_path / "v.gguf", num_tokens=330)
    line = _cli_error(capsys, bad, tmp_path / "out")
    assert "tensor 'token_embd.weight' has 320 rows but the vocabulary" in line and "330 tokens" in line


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match=r"GGUF architecture 'gemma2' is not supported"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "out")


def test_generate_from_gguf_converts_once(monkeypatch, capsys, good_gguf, tmp_path):
    from strata import LLM, SamplingParams
    from strata.weights import gguf_cache, gguf_convert

    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = gguf_convert.convert_gguf
    monkeypatch.setattr(gguf_convert, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(gguf_cache.converted_folder(good_gguf, False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(folders)) == 1 and folders[0].parent == tmp_path / "cache" / "gguf"
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    from_file = LLM(str(good_gguf), progress=False).generate("the quick", params)[0].outputs[0].token_ids
    from_folder = LLM(str(folders[0]), progress=False).generate("the quick", params)[0].outputs[0].token_ids
    assert from_file == from_folder and len(calls) == 1
    assert main(["generate", "--model", str(good_gguf), "--max-tokens", "4", "--quiet", "the"]) == 0
    assert len(calls) == 1


def test_errors_are_strata_errors(tmp_path):
    with pytest.raises(StrataError, match="GGUF file not found"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
