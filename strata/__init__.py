"""Strata: LLM inference, above all MoE, on machines with less memory than the model."""

from strata.engine.sampling_params import SamplingParams
from strata.llm import LLM

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
