"""The family hooks of CausalLM (docs/models.md): a family written here, with a config key of its own
(config_class), weight renames (sanitize), its own attention (make_attention) and decoder block
(decoder_layer_class), loads a renamed Llama checkpoint and runs through those hooks."""

import json
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from strata.config import HFFields, ModelConfig
from strata.layers.attention import AttentionMetadata
from strata.models import registry
from strata.models.base import Attention, CausalLM, DecoderLayer
from strata.weights.loader import load_model


@dataclass
class TinyConfig(ModelConfig):
    qk_clip: float | None = None

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict:
        return {**super().hf_fields(f), "qk_clip": f.get("qk_clip")}


class TinyForCausalLM(CausalLM):
    config_class = TinyConfig

    @classmethod
    def sanitize(cls, name: str) -> str | None:
        name = super().sanitize(name)  # drops rotary_emb.inv_freq
        return None if name is None else name.replace("decoder.", "model.", 1)

    @classmethod
    def make_attention(cls, cfg: TinyConfig, layer_idx: int) -> Attention:
        return Attention(cfg, layer_idx, cls.qk_norm, cls.qkv_bias(cfg), cls.o_bias(cfg), clip_qkv=cfg.qk_clip)


class NoMlpLayer(DecoderLayer):
    def forward(self, x, residual, cos, sin, meta, kv_cache):
        h, residual = super().forward(x, residual, cos, sin, meta, kv_cache)
        return torch.zeros_like(h), residual  # the block without its MLP


class NoMlpForCausalLM(TinyForCausalLM):
    decoder_layer_class = NoMlpLayer


def _renamed_checkpoint(src: str, dst, arch: str, **config) -> str:
    """The Llama checkpoint at src with every tensor under decoder.* (and a rotary table to drop)."""
    dst.mkdir()
    state = {k.replace("model.", "decoder.", 1): v for k, v in load_file(f"{src}/model.safetensors").items()}
    state["decoder.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, dst / "model.safetensors")
    with open(f"{src}/config.json") as f:
        cfg = json.load(f)
    (dst / "config.json").write_text(json.dumps({**cfg, "architectures": [arch], **config}))
    shutil.copy(f"{src}/tokenizer.json", dst / "tokenizer.json")
    return str(dst)


def _logits(model, ids):
    return model(ids, torch.arange(len(ids)), AttentionMetadata.no_cache([len(ids)]))


def test_family_hooks_load_a_renamed_checkpoint(hf_family, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(registry.MODEL_REGISTRY, "TinyForCausalLM", TinyForCausalLM)
    _, llama = hf_family("llama")
    ids = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(0))
    ref = _logits(load_model(llama, progress=False), ids)

    path = _renamed_checkpoint(llama, tmp_path / "wide", "TinyForCausalLM", qk_clip=1e4)
    model = load_model(path, progress=False)
    assert type(model.config) is TinyConfig and model.config.qk_clip == 1e4
    assert model.model.layers[0].self_attn.clip_qkv == 1e4
    assert "unexpected tensor" not in capsys.readouterr().err  # renamed, and the rotary table dropped
    torch.testing.assert_close(_logits(model, ids), ref)  # a clip that never bites: the same model

    tight = load_model(_renamed_checkpoint(llama, tmp_path / "tight", "TinyForCausalLM", qk_clip=0.01),
                       progress=False)
    assert not torch.allclose(_logits(tight, ids), ref)  # the family's attention is the one that runs


def test_decoder_layer_class_builds_the_blocks(hf_family, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.MODEL_REGISTRY, "NoMlpForCausalLM", NoMlpForCausalLM)
    _, llama = hf_family("llama")
    model = load_model(_renamed_checkpoint(llama, tmp_path / "m", "NoMlpForCausalLM"), progress=False)
    assert all(type(layer) is NoMlpLayer for layer in model.model.layers)
    ids = torch.randint(3, 300, (8,), generator=torch.Generator().manual_seed(1))
    ref = _logits(load_model(llama, progress=False), ids)
    assert not torch.allclose(_logits(model, ids), ref)
