"""--tensor-parallel-size 2 on gloo: greedy output equals one process (dense and MoE families), and a rank
that dies ends the step with one clear error. A watchdog ends the run instead of letting a rank hang it."""

import pytest
import torch

from strata.config import EngineConfig
from strata.distributed.launcher import shutdown
from strata.distributed.tensor_parallel import shard_config, shard_dim, shard_tensor
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.errors import ConfigError, DistributedError
from strata.models.registry import load_config
from tests.distributed.conftest import PROMPTS, greedy, make_engine
from tests.models.conftest import build_hf


def _tp2_equals_tp1(path, family: str) -> LLMEngine:
    """Greedy output of 2 ranks against 1 process; returns the 2-rank engine, still running."""
    build_hf(family, path)
    want = greedy(make_engine(path, 1))
    engine = make_engine(path, 2)
    try:
        assert engine.model.config.num_key_value_heads == 1  # rank 0 holds (and caches) half the kv heads
        assert engine.runner.kv_caches[0][0].shape[1] == 1
        got = greedy(engine)
        assert got == want and all(len(t) == 10 for t in got)
    except BaseException:
        shutdown(engine.model)
        raise
    return engine


def test_tp2_greedy_equals_one_process_moe(tmp_path):
    shutdown(_tp2_equals_tp1(tmp_path, "mixtral").model)


def test_tp2_greedy_equals_one_process_dense_then_a_dead_rank_ends_the_step(tmp_path):
    engine = _tp2_equals_tp1(tmp_path, "qwen3")
    ranks = engine.model.__dict__["_tp_ranks"]
    try:
        ranks.procs[0].kill()
        ranks.procs[0].join()
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0))
        with pytest.raises(DistributedError, match=r"^tensor-parallel rank 1 exited with code -9; the other ranks "
                                                   r"were stopped$"):
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        shutdown(engine.model)
    assert ranks.stopped


def test_sharding_rules_by_hf_name():
    assert shard_dim("model.layers.0.self_attn.q_proj.weight") == 0
    assert shard_dim("model.layers.0.self_attn.o_proj.weight") == 1
    assert shard_dim("model.layers.3.block_sparse_moe.experts.2.w2.weight") == 1
    assert shard_dim("model.layers.3.block_sparse_moe.experts.2.w3.weight") == 0
    assert shard_dim("model.layers.1.mlp.gate.weight") is None  # the router stays whole
    assert shard_dim("model.layers.1.mlp.shared_expert_gate.weight") is None
    assert shard_dim("model.embed_tokens.weight") is None and shard_dim("lm_head.weight") is None
    w = torch.arange(24.0).view(4, 6)
    assert torch.equal(shard_tensor("model.layers.0.mlp.down_proj.weight", w, 1, 2, False), w[:, 3:])
    assert torch.equal(shard_tensor("model.layers.0.mlp.up_proj.weight", w, 1, 2, False), w[2:])
    bias = torch.ones(4)
    assert torch.equal(shard_tensor("model.layers.0.self_attn.o_proj.bias", bias, 1, 2, False), torch.zeros(4))
    assert torch.equal(shard_tensor("model.layers.0.self_attn.o_proj.bias", bias, 0, 2, False), bias)


def test_indivisible_heads_are_refused(tmp_path):
    build_hf("llama", tmp_path)
    cfg = load_config(tmp_path)
    assert shard_config(cfg, 2).num_attention_heads == 2
    with pytest.raises(ConfigError, match="num_attention_heads' = 4 is not divisible by --tensor-parallel-size 3"):
        make_engine(tmp_path, 3)


def test_flags_and_their_checks():
    import argparse

    from strata.commands.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    cfg = engine_config_from_args(parser.parse_args(["--tensor-parallel-size", "2",
                                                     "--distributed-executor-backend", "mp"]))
    assert (cfg.tensor_parallel_size, cfg.distributed_executor_backend) == (2, "mp")
    with pytest.raises(ConfigError, match="--distributed-executor-backend must be mp or ray"):
        EngineConfig(tensor_parallel_size=2, distributed_executor_backend="slurm")
    with pytest.raises(ConfigError, match="--tensor-parallel-size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)
