"""Mistral (MistralForCausalLM): Llama plus a sliding attention window when the config sets one."""

from strata.models.base import CausalLM


class MistralForCausalLM(CausalLM):
    pass
