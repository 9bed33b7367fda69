"""The real model: SmolLM2-135M-Instruct from its Q4_1 GGUF, against transformers reading the same file in
float32 (tokenizer ids, chat template, greedy tokens, perplexity), with Strata keeping the file's Q4_1 and Q8_0
blocks as they are (the tied Q8_0 embedding also as the quantized lm_head)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import SHARED_DATA

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You answer in one sentence."},
          {"role": "user", "content": "Why is the sky blue?"}]]
MAX_TOKENS = 16


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own GGUF loading, float32 (loaded once per session)."""
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf):
    from strata import LLM

    return LLM(str(smollm2_gguf), progress=False, num_threads=torch.get_num_threads())


def test_weights_stay_quantized(smollm2_llm):
    from strata.layers.quant_linear import QuantLinear

    model = smollm2_llm.engine.model
    formats = {n: str(m.fmt) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert formats.pop("lm_head") == "q8_0"  # token_embd's blocks: the logits read 34 bytes per 32 weights
    assert len(formats) == 7 * model.config.num_hidden_layers and set(formats.values()) == {"q4_1"}


def test_tokenizer_ids_equal_transformers(smollm2_llm, smollm2_reference):
    ref, _ = smollm2_reference
    ours = smollm2_llm.tokenizer
    for text in ["Hello world!", "  leading spaces and\ttabs\n\nnew lines", "naïve café, Straße, 日本語, 🙂👍",
                 "<|im_start|>user\nhi<|im_end|>", "x = [1, 22, 333, 4444]; print(x)", "It's 2026-12-03."]:
        assert ours.encode(text) == ref(text).input_ids, text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    for msgs in CHATS:
        assert ours.apply_chat_template(msgs, True) == ref.apply_chat_template(msgs, tokenize=False,
                                                                               add_generation_prompt=True)


def _reference_greedy(smollm2_reference, ids: list[int]) -> list[int]:
    _, model = smollm2_reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS,
                             eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_equal_transformers(smollm2_llm, smollm2_reference):
    from strata import SamplingParams

    tok = smollm2_llm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.encode_chat(m) for m in CHATS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = smollm2_llm.generate(prompts, params)
    for ids, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _reference_greedy(smollm2_reference, ids), tok.decode(ids)
    assert "Paris" in outs[3].outputs[0].text  # the chat answer of a trained model, not just equal noise


def test_perplexity_within_a_tenth_of_a_percent(smollm2_llm, smollm2_reference):
    data = SHARED_DATA / "wikitext-2" / "wiki.test.tokens"
    if not data.is_file():
        pytest.skip(f"{data} not available")
    from strata.eval.perplexity import sliding_window, window_spans

    text = data.read_text(encoding="utf-8")[:3000]
    context, stride = 256, 128
    tok = smollm2_llm.tokenizer
    ours = sliding_window(smollm2_llm.engine.model, tok, text, context, stride, progress=False)
    ref_tok, ref_model = smollm2_reference
    ids = ref_tok(text).input_ids
    assert ids == tok.encode(text)
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin, end, first in window_spans(len(ids), context, stride):
            window = torch.tensor(ids[begin:end])
            logits = ref_model(window[None]).logits[0]  # [T, V]
            nll += float(F.cross_entropy(logits[first - 1 : -1], window[first:], reduction="sum"))
            n += len(window) - first
    assert n == ours.tokens > 500
    ref_ppl = math.exp(nll / n)
    assert abs(ours.ppl - ref_ppl) / ref_ppl < 1e-3, (ours.ppl, ref_ppl)


def test_bfloat16_decode_through_the_native_decoder(smollm2_gguf, smollm2_llm):
    """--dtype bfloat16 runs decode in the one-call native decoder, whose cache-tiled GEMV (gemv_once) must size
    q8_0 / q4_1 rows from their blocks (it divided by the group size, 0 for these kinds: SIGFPE). Its first token
    is checked against the float32 model's: on this prompt the two best tokens ("The", "L") are within 0.1 nat in
    float32 and can tie in bf16, so the greedy pick may be either; the five best must mostly agree."""
    from strata import LLM, SamplingParams

    llm = LLM(str(smollm2_gguf), progress=False, dtype="bfloat16", num_threads=1)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5)
    ids = llm.tokenizer.encode_chat(CHATS[0])
    ours = llm.generate([ids], params)[0].outputs[0]
    ref = smollm2_llm.generate([ids], params)[0].outputs[0]
    ref_top = [t for t, _ in ref.logprobs[0]["top"]]
    assert len(ours.token_ids) == 8 and ours.token_ids[0] in ref_top[:2]
    assert len(set(ref_top) & {t for t, _ in ours.logprobs[0]["top"]}) >= 4
