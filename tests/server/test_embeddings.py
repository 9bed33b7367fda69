"""/v1/embeddings with the openai client: the mean of transformers' last hidden state (after the final norm),
L2-normalized; float and base64 give the same vectors; strings, token ids and batches; bad input is a 400."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_embeddings_match_transformers(server, server_model, client):
    model = transformers.AutoModelForCausalLM.from_pretrained(server_model, dtype=torch.float32).eval()
    texts = ["the quick brown fox", "to be or not to be, that is the question", "a"]
    r = client.embeddings.create(model="tiny", input=texts)  # the SDK asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1, 2]
    ids = [httpx.post(server.url + "/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(i) for i in ids)
    for d, tok in zip(r.data, ids):
        with torch.no_grad():
            h = model.model(torch.tensor([tok])).last_hidden_state[0].float()  # [T, H]
        want = torch.nn.functional.normalize(h.mean(0), dim=0)
        got = torch.tensor(d.embedding)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    as_float = client.embeddings.create(model="tiny", input=texts[1], encoding_format="float")
    assert as_float.data[0].embedding == pytest.approx(r.data[1].embedding, abs=1e-6)
    as_ids = client.embeddings.create(model="tiny", input=[ids[0], ids[2]], encoding_format="float")
    assert as_ids.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-5)


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [10**9]}, "input"),
    ({"input": "x", "dimensions": 3}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({}, "input"),
])
def test_embedding_errors(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_embedding_context_limit(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"input": [5] * (server.max_model_len + 1)}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
