"""Quantized formats dispatch through one table (family -> kernels): an unknown family is refused in one line,
never run with another family's kernel."""

import json
import shutil

import pytest

from strata.cli import main
from strata.errors import UnsupportedError
from strata.layers import quant_native
from strata.quant.format import KINDS, QuantFormat
from tests.models.conftest import build_hf


def test_every_family_has_its_kernels():
    assert set(quant_native.KERNELS) == set(KINDS)


def test_unknown_family_is_refused():
    with pytest.raises(UnsupportedError, match=r"family 'q9': expected one of int8"):
        QuantFormat("q9")
    with pytest.raises(UnsupportedError, match=r"family 'q9': no native kernel"):
        quant_native.kernels_for("q9")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("qd")
    build_hf("llama", root / "f")
    assert main(["quantize", "--format", "int4-g32", "--no-progress", str(root / "f"), str(root / "q")]) == 0
    return root / "q"


@pytest.mark.parametrize("edit,expect", [
    (lambda q: q["modules"].update({k: "q3_zz" for k in q["modules"]}),
     "config.json quantization_config.modules['model.layers.0.mlp.down_proj']: quantization format 'q3_zz'"),
    (lambda q: q.update(quant_method="gptq"), "quant_method: expected 'strata', found 'gptq'"),
])
def test_checkpoint_naming_an_unknown_format_is_one_line_exit_2(quantized, tmp_path, capsys, edit, expect):
    m = tmp_path / "m"
    shutil.copytree(quantized, m)
    cfg = json.loads((m / "config.json").read_text())
    edit(cfg["quantization_config"])
    (m / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["generate", "--model", str(m), "--max-tokens", "2", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0]
