"""A sequence longer than the KV cache never hangs the engine: max_model_len is fitted to the cache, admission
refuses what cannot fit, and the scheduler finishes a sequence the cache can never hold instead of requeuing it.

Every call that used to hang runs in a thread joined with a timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import os

import pytest

from strata.config import EngineConfig
from strata.engine.block_manager import BlockManager
from strata.engine.llm_engine import BUNDLED_MODEL
from strata.engine.sampling_params import SamplingParams
from strata.engine.scheduler import Scheduler
from strata.engine.sequence import Sequence
from strata.errors import ConfigError, InvalidRequestError
from tests.conftest import within

needs_bundled = pytest.mark.skipif(not os.path.exists(os.path.join(BUNDLED_MODEL, "model.safetensors")),
                                   reason="bundled model not present")


def _simulate(sched: Scheduler, seqs: list[Sequence], max_steps: int = 200) -> int:
    """Drives the scheduler like LLMEngine.step (one new token per sampled sequence); returns steps taken."""
    for s in seqs:
        sched.add(s)
    for step in range(max_steps):
        for s in sched.take_unschedulable():
            assert s.finish_reason == "length"
        if not sched.has_unfinished():
            return step
        batch = sched.schedule()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_uncomputed_tokens == 0:
                seq.token_ids.append(1)
                if seq.num_completion_tokens >= seq.params.max_tokens:
                    seq.finish_reason = "length"
                    sched.finish(seq)
    raise AssertionError(f"scheduler still busy after {max_steps} steps: "
                         f"{len(sched.waiting)} waiting, {len(sched.running)} running")


def test_sequence_outgrowing_the_cache_finishes_instead_of_requeuing():
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    long = Sequence("long", [5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    _simulate(sched, [long])
    assert long.is_finished and long.finish_reason == "length"
    assert long.num_tokens == 9  # the 9th token needs a third block, which the cache does not have
    assert bm.num_free_blocks == 2


def test_head_longer_than_the_cache_does_not_block_the_others():
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    huge = Sequence("huge", list(range(1, 12)), SamplingParams(max_tokens=1))
    small = Sequence("small", [1, 2], SamplingParams(max_tokens=2))
    _simulate(sched, [huge, small])
    assert huge.finish_reason == "length" and huge.num_completion_tokens == 0
    assert small.finish_reason == "length" and small.num_completion_tokens == 2


@pytest.mark.parametrize("field,value", [
    ("max_num_seqs", 0), ("max_num_batched_tokens", 0), ("block_size", 0), ("kv_cache_memory", 0),
    ("num_threads", -3), ("max_model_len", -1), ("memory_budget", 0), ("dtype", "float8"), ("max_num_seqs", 2.5),
])
def test_engine_config_refuses_nonsense(field, value):
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} must be"):
        EngineConfig(**{field: value})


@needs_bundled
def test_default_max_model_len_fits_the_cache(caplog):
    from strata import LLM

    llm = LLM(BUNDLED_MODEL, progress=False, kv_cache_memory=1)  # one block of 16 tokens
    assert llm.engine.max_model_len == 16
    assert "max_model_len lowered from 512 to 16" in caplog.text
    out = within(lambda: llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)))
    assert out[0].outputs[0].finish_reason == "length"
    assert len(out[0].prompt_token_ids) + len(out[0].outputs[0].token_ids) == 16
    with pytest.raises(InvalidRequestError, match="maximum context length is 16 tokens"):
        llm.generate("ROMEO:", SamplingParams(max_tokens=40))


@needs_bundled
def test_explicit_max_model_len_beyond_the_cache_is_refused():
    from strata import LLM

    with pytest.raises(ConfigError, match=r"--max-model-len 512 is more than the KV cache holds \(64 tokens"):
        LLM(BUNDLED_MODEL, progress=False, kv_cache_memory=98304, max_model_len=512, dtype="bfloat16")


@needs_bundled
def test_cli_generate_longer_than_the_cache_is_one_line(capsys):
    from strata.cli import main

    rc = within(lambda: main(["generate", "--kv-cache-memory", "1", "--max-tokens", "40", "ROMEO:"]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "maximum context length is 16 tokens" in err[0]


@needs_bundled
@pytest.mark.parametrize("flag", ["--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--num-threads"])
def test_cli_refuses_nonsensical_engine_flags(capsys, flag):
    from strata.cli import main

    rc = within(lambda: main(["generate", flag, "0" if flag != "--num-threads" else "-3", "ROMEO:"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {flag} must be")


@needs_bundled
def test_cli_temperature_that_would_overflow_is_one_line(capsys):
    from strata.cli import main

    rc = within(lambda: main(["generate", "--temperature", "1e-300", "--max-tokens", "4", "ROMEO:"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: temperature must be")
