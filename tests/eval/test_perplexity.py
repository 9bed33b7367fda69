"""Perplexity: stories260K reproduces its published bits-per-byte; sliding windows agree with one pass."""

import json
import math

import pytest

from strata.cli import main
from strata.eval.perplexity import sliding_window
from strata.tokenizer import Tokenizer
from strata.weights.loader import load_model
from tests.conftest import SHARED_DATA

VALID = SHARED_DATA / "tinystories-valid100" / "validation_100.txt"


def test_stories260k_published_bits_per_byte(stories260k_hf, capsys):
    if not VALID.exists():
        pytest.skip("tinystories-valid100 not available")
    rc = main(["eval", "ppl", "--model", str(stories260k_hf), "--data", str(VALID), "--split", "<|endoftext|>",
               "--max-positions", "128", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert round(res["bits_per_byte"], 4) == 0.8132  # published fp32 figure (tiny_llm_edge_deploied)
    assert res["tokens"] > 10000 and math.isclose(res["ppl"], math.exp(res["nll_nats"] / res["tokens"]))


def test_sliding_window_stride_only_changes_context(stories260k_hf):
    model, tok = load_model(str(stories260k_hf), progress=False), Tokenizer(str(stories260k_hf))
    docs = VALID.read_text().split("<|endoftext|>") if VALID.exists() else []
    text = max(docs, key=len).strip() if docs else "Once upon a time, there was a cat. " * 40  # one story
    one_pass = sliding_window(model, tok, text, context=512, stride=512, progress=False)
    windows = sliding_window(model, tok, text, context=96, stride=48, progress=False)
    assert one_pass.tokens == windows.tokens and one_pass.bytes == windows.bytes
    # shorter context can only lose information, but not much on this easy text
    assert one_pass.ppl <= windows.ppl * 1.05 and windows.ppl < one_pass.ppl * 1.5
