"""A request moved between two engines with its KV cache mid-decode continues exactly as if it had stayed:
greedy and seeded sampling, text deltas included; what cannot move is refused with one line."""

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.migration import MigrationError, export_kv, export_request, import_request
from strata.engine.migration_staging import drop_staged, stage_kv
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


def _reference_and_source(model, params, until: int):
    """-> the unmigrated run's deltas and last output, a source engine that has decoded `until` tokens of the
    request (and their deltas), and an empty target engine."""
    ref = _engine(model)
    ref.add_request(PROMPT, params, request_id="r")
    ref_deltas, want = _run(ref, "r")
    src, dst = _engine(model), _engine(model)
    src.add_request(PROMPT, params, request_id="r")
    deltas, _ = _run(src, "r", until=until)
    return ref_deltas, want, src, dst, deltas


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                                    SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True,
                                                   logprobs=2)])
def test_migrated_mid_decode_equals_unmigrated(model, params):
    ref_deltas, want, src, dst, deltas = _reference_and_source(model, params, until=6)
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


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                                    SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True,
                                                   logprobs=1)])
def test_live_migration_precopies_while_decoding_and_equals_unmigrated(model, params):
    """Two pre-copy stages while the request keeps decoding at the source, then a stop-and-copy of only the
    tokens decoded since the last stage: the output is the unmigrated one and the target's blocks balance."""
    ref_deltas, want, src, dst, deltas = _reference_and_source(model, params, until=4)
    staged = None
    for until in (7, 9):  # each stage copies what is computed, then the source decodes on
        chunk = export_kv(src, "r", 0 if staged is None else staged.num_tokens,
                          None if staged is None else staged.num_preemptions)
        staged = stage_kv(dst, staged, chunk)
        assert staged.num_tokens == chunk.end == src._requests["r"][0].num_computed_tokens
        more, _ = _run(src, "r", until=until)
        deltas += more
    assert staged.num_tokens == len(PROMPT) + 6  # stages covered the prompt and 6 decoded tokens
    moved = export_request(src, "r", kv_from=staged.num_tokens, num_preemptions=staged.num_preemptions)
    assert moved.kv_start == staged.num_tokens and moved.kv.shape[2] == 2  # the stop-and-copy moves 2 tokens
    import_request(dst, moved, staged=staged)
    more, got = _run(dst, "r")
    assert got.finished and got.outputs[0].token_ids == want.outputs[0].token_ids
    assert "".join(deltas + more) == "".join(ref_deltas) == got.outputs[0].text
    assert got.outputs[0].logprobs == want.outputs[0].logprobs
    assert dst.block_manager.num_free_blocks == dst.block_manager.num_blocks


def test_a_request_preempted_between_stages_sends_its_whole_kv(model):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    _, want, src, dst, _ = _reference_and_source(model, params, until=3)
    staged = stage_kv(dst, None, export_kv(src, "r"))
    src._requests["r"][0].num_preemptions += 1  # as if recomputed since: the staged K/V may differ in rounding
    moved = export_request(src, "r", kv_from=staged.num_tokens, num_preemptions=staged.num_preemptions)
    assert moved.kv_start == 0 and moved.kv.shape[2] == moved.num_computed_tokens
    import_request(dst, moved, staged=staged)  # the staged blocks are freed, the whole KV written
    _, got = _run(dst, "r")
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert dst.block_manager.num_free_blocks == dst.block_manager.num_blocks


def test_a_migration_given_up_frees_its_staged_blocks(model):
    src, dst = _engine(model), _engine(model)
    src.add_request(PROMPT, SamplingParams(max_tokens=8, temperature=0.0), request_id="r")
    _run(src, "r", until=2)
    chunk = export_kv(src, "r")
    staged = stage_kv(dst, None, chunk)
    assert dst.block_manager.num_free_blocks == dst.block_manager.num_blocks - len(staged.seq.block_table) > 0
    drop_staged(dst, staged)
    assert dst.block_manager.num_free_blocks == dst.block_manager.num_blocks
    with pytest.raises(MigrationError, match="a pre-copy stage from token 5 with nothing staged"):
        stage_kv(dst, None, export_kv(src, "r", start=5))
    moved = export_request(src, "r", kv_from=chunk.end, num_preemptions=chunk.num_preemptions)
    with pytest.raises(MigrationError, match=f"brings its KV from token {chunk.end} on, but 0 tokens are staged"):
        import_request(dst, moved)
