"""A request moved between two engines with its KV cache mid-decode continues exactly as if it had stayed:
greedy and seeded sampling, text deltas included; what cannot move is refused with one line."""

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.migration import MigrationError, export_request, import_request
from strata.engine.sampling_params import SamplingParams
from tests.models.conftest import build_hf

PROMPT = [1, 17, 42, 99, 5, 250, 3, 3, 71, 8, 64, 12, 33, 150, 7, 9, 21, 40]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("migration") / "m"
    build_hf("qwen3_moe", path)
    return path


def _engine(model) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", num_threads=1, block_size=4,
                                  kv_cache_memory=2**20), progress=False)


def _run(engine, rid, until=None):
    """Step until the request has `until` completion tokens (or finishes); -> (outputs' deltas, last output)."""
    deltas, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                deltas.append(out.outputs[0].delta)
                last = out
        if last is not None and (last.finished or until is not None and len(last.outputs[0].token_ids) >= until):
            break
    return deltas, last


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                                    SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True,
                                                   logprobs=2)])
def test_migrated_mid_decode_equals_unmigrated(model, params):
    ref = _engine(model)
    ref.add_request(PROMPT, params, request_id="r")
    ref_deltas, want = _run(ref, "r")
    src, dst = _engine(model), _engine(model)
    src.add_request(PROMPT, params, request_id="r")
    deltas, _ = _run(src, "r", until=6)
    moved = export_request(src, "r")
    assert not src.has_unfinished_requests() and src.block_manager.num_free_blocks == src.block_manager.num_blocks
    assert moved.kv.shape[2] == len(PROMPT) + 5  # the newest token is computed by the next engine
    import_request(dst, moved)
    more, got = _run(dst, "r")
    assert got.finished and got.outputs[0].token_ids == want.outputs[0].token_ids
    assert "".join(deltas + more) == "".join(ref_deltas) == got.outputs[0].text
    assert got.outputs[0].logprobs == want.outputs[0].logprobs


def test_what_cannot_move_is_refused(model):
    engine = _engine(model)
    with pytest.raises(MigrationError, match="request 'x' is not running here"):
        export_request(engine, "x")
    engine.add_request(PROMPT, SamplingParams(max_tokens=4, n=2, temperature=1.0), request_id="n2")
    with pytest.raises(MigrationError, match="has n > 1 sequences"):
        export_request(engine, "n2")
    engine.add_request(PROMPT, SamplingParams(max_tokens=4), request_id="w")
    with pytest.raises(MigrationError, match="is not decoding"):
        export_request(engine, "w")
