"""release_pages: fusing weights that are views of a safetensors file hands their pages back, contents kept."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from strata.layers import fusion
from strata.mapping import file_ranges, read_in


def test_release_keeps_contents_of_file_and_anonymous_tensors(tmp_path):
    w = torch.randn(512, 1024)  # 2 MiB
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as h:
        mapped = h.get_tensor("w")
        fusion._file_ranges = file_ranges()
        try:
            fusion.release_pages(mapped)
            anon = w.clone()
            fusion.release_pages(anon)  # not in a file mapping: left alone
        finally:
            fusion._file_ranges = []
        assert torch.equal(mapped, w) and torch.equal(anon, w)


def test_fuse_model_clears_the_mapping_table(tmp_path):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)

        def fuse_projections(self):
            return fusion.fuse([self.a, self.b]) is not None

    model = nn.Sequential(Attn())
    before = [m.weight.clone() for m in (model[0].a, model[0].b)]
    assert fusion.fuse_model(model) == 1 and fusion._file_ranges == []
    assert all(torch.equal(m.weight, b) for m, b in zip((model[0].a, model[0].b), before))


def test_read_in_reads_file_backed_weights_and_skips_anonymous_memory(tmp_path):
    w = torch.randn(512, 1024)  # 2 MiB
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as h:
        mapped = h.get_tensor("w")
        n = read_in([mapped, mapped[1:], w.clone()])  # a view of the same pages counts once; the clone is anonymous
        assert 512 * 1024 * 4 <= n <= 512 * 1024 * 4 + 2 * 4096  # the tensor's pages, partial edge pages included
        assert torch.equal(mapped, w)
    assert read_in([w]) == 0 and read_in([]) == 0
