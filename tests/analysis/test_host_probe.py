"""Strata's host costs: a probed machine's own figures replace the development machine's (strata_fit.json)."""

from dataclasses import replace

from strata.analysis.efficiency import Efficiencies
from strata.analysis.hardware import System, device_from_dict
from strata.analysis.host_probe import TWINS, priced
from strata.analysis.placement import Scenario
from strata.analysis.precision import Precisions
from strata.analysis.predict import predict
from strata.analysis.shapes import load_shape

PROF = {"name": "probe", "class": "cpu-measured", "peak_tflops": {"fp16": 1.0, "fp32": 0.5}, "memory_gb": 64,
        "bandwidth_gbs": 20.0}


def _tpot(dev, offload="none"):
    sc = Scenario(batch=1, prompt=64, gen=16, engine="strata", offload=offload, prec=Precisions("bf16"))
    if offload == "experts":
        sc.cache_frac, sc.hit_rate = 1.0, 1.0
    return predict(load_shape("olmoe"), System(dev), sc, Efficiencies())


def test_probed_host_costs_price_strata_steps():
    bare = device_from_dict("probe", PROF)
    assert bare.strata_host == {}
    p0 = _tpot(bare)
    assert any("strata probe" in n for n in p0.notes)  # says whose host costs it used
    slow = device_from_dict("probe", dict(PROF, strata_host={"overhead_us_per_call": 100.0,
                                                             "loop_us_per_expert_call": 500.0,
                                                             "prefill_loop_us_per_expert_call": 500.0}))
    p1 = _tpot(slow)
    assert not any("strata probe" in n for n in p1.notes)
    calls = sum(s.launches for s in p1.decode.segments)
    assert p1.tpot_s - p0.tpot_s > 0.5 * calls * 100e-6  # the probed per-call cost enters each call
    # the Python expert loop (offloaded experts) costs the probed time per expert call
    assert _tpot(slow, "experts").tpot_s > _tpot(replace(slow, strata_host={}), "experts").tpot_s


def test_twin_pricing_counts_calls_without_overhead():
    dev = device_from_dict("probe", PROF)
    t, calls, routed = priced("dense", dev)
    layers = TWINS["dense"]["num_hidden_layers"]
    assert routed == 0 and calls >= 7 * layers  # q/k/v/o, attention, FFN matrices per layer at least
    assert 0 < t < 5e-3  # a few MB of weights at 20 GB/s, no per-call overhead
    _, _, loop_calls = priced("moe", dev, looped=True)
    assert loop_calls > 0
