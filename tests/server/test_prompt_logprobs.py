"""Prompt logprobs over HTTP: echo with logprobs (what lm-evaluation-harness's `local-completions` sends),
vLLM's `prompt_logprobs`, and /tokenizer_info, against transformers' log-softmax over the same tokens."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(server_model):
    model = transformers.AutoModelForCausalLM.from_pretrained(server_model, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]

    return logprobs


def _tokenize(server, text: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]


def test_echo_logprobs_are_the_prompts_loglikelihood(server, client, reference):
    ids = _tokenize(server, "the quick brown fox jumps over the lazy dog")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0,
                                  seed=1234)  # lm-eval's loglikelihood request
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(ids)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    assert r.choices[0].text.startswith(httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"])
    for i in range(1, len(ids)):  # the chosen token and the top one; is_greedy as lm-eval computes it
        top = lp.top_logprobs[i]
        assert top[lp.tokens[i]] == lp.token_logprobs[i]
        assert (max(top.values()) == lp.token_logprobs[i]) == (int(ref[i - 1].argmax()) == ids[i])


def test_echo_logprobs_streamed(server, client):
    kw = {"model": "tiny", "prompt": "the lazy dog", "max_tokens": 3, "logprobs": 2, "echo": True,
          "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == full.logprobs.tokens
    assert chunks[0].choices[0].text == "the lazy dog" and chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_vllm_prompt_logprobs(server, reference):
    ids = _tokenize(server, "to be or not to be")
    ref = reference(ids)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0}
    choice = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None and choice["logprobs"] is None
    for i in range(1, len(ids)):
        entry = plp[i][str(ids[i])]
        assert entry["logprob"] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert entry["rank"] == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
        top2 = torch.topk(ref[i - 1], 2).indices.tolist()
        assert all(str(t) in plp[i] for t in top2) and plp[i][str(top2[0])]["rank"] == 1
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == r["usage"]["prompt_tokens"]


def test_tokenizer_info_is_what_lm_eval_detects(server):
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert "eos_token" in info and info["model_max_length"] == server.max_model_len
    eos_ids = _tokenize(server, info["eos_token"])
    assert len(eos_ids) == 1  # lm-eval reads the EOS id as encode(eos_token)[0]
