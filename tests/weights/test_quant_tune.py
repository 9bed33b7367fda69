"""End-to-end tuning (quant_tune.py): never a higher calibration KL than the GPTQ start, same on-disk layout."""

import pytest
import torch
import torch.nn.functional as F

from strata.errors import UnsupportedError
from strata.eval.calibration import collect_calibration
from strata.layers.attention import AttentionMetadata
from strata.models.registry import config_from_dict, model_class
from strata.quant.format import QuantFormat, check_tensors, dequantize_weight, quantize_weight
from strata.weights.quant_tune import TuneConfig, tune_quantized
from strata.weights.quantize_checkpoint import is_quantizable

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _model():
    torch.manual_seed(0)
    cfg = config_from_dict(CONFIG)
    model = model_class(cfg)(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.fill_(1.0)
    model.post_load()
    return model


def _calibration_kl(model, weights, ids, context):  # KL(float || model with `weights` swapped in), mean/token
    windows = [ids[i : i + context] for i in range(0, len(ids) - 1, context)]
    mods = dict(model.named_modules())

    def logits():
        flat = torch.tensor([t for w in windows for t in w])
        pos = torch.cat([torch.arange(len(w)) for w in windows])
        return F.log_softmax(model(flat, pos, AttentionMetadata.no_cache([len(w) for w in windows])).float(), -1)

    with torch.no_grad():
        ref = logits()
        saved = {n: mods[n].weight.clone() for n in weights}
        for n, w in weights.items():
            mods[n].weight.copy_(w)
        q = logits()
        for n, w in saved.items():
            mods[n].weight.copy_(w)
    return float((ref.exp() * (ref - q)).sum(-1).mean())


@pytest.mark.parametrize(("fmt", "rounding"), [("int4-g32", "learned"), ("int4-g32-asym", "fixed")])
def test_tuning_never_raises_calibration_kl(fmt, rounding):
    model = _model()
    ids = torch.randint(0, 96, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    stats = collect_calibration(model, ids, context=64, progress=False, second_moments=True)
    shapes = {n: m.weight.shape for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and is_quantizable(f"{n}.weight", tuple(m.weight.shape))}
    start = {n: quantize_weight(dict(model.named_modules())[n].weight, fmt, "gptq",
                                hessian=stats[f"{n}.input_second_moment"]) for n in shapes}
    formats = dict.fromkeys(shapes, fmt)
    cfg = TuneConfig(steps=30, batch=4, context=64, eval_every=10, progress=False, rounding=rounding, lr_code=0.02)
    tuned, facts = tune_quantized(model, start, formats, ids, cfg)

    def dequant(tensors):
        return {n: dequantize_weight(tensors[n], fmt, *shapes[n]) for n in shapes}

    for n, shape in shapes.items():
        check_tensors(tuned[n], QuantFormat.parse(fmt), *shape, name=n)  # the layout kernels read
    if rounding == "fixed":
        assert all(torch.equal(tuned[n]["qweight"], start[n]["qweight"]) for n in shapes)
    kl_start = _calibration_kl(model, dequant(start), ids, 64)
    kl_end = _calibration_kl(model, dequant(tuned), ids, 64)
    assert kl_start == pytest.approx(facts["kl_start"], rel=1e-3)
    assert kl_end == pytest.approx(facts["kl_end"], rel=1e-3)
    assert kl_end < kl_start  # it helps here, and the kept state is never worse than the start


def test_bad_rounding():
    with pytest.raises(UnsupportedError, match="tune rounding 'soft': expected one of learned, fixed"):
        tune_quantized(_model(), {}, {}, [1, 2, 3], TuneConfig(rounding="soft"))
