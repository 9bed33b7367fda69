"""Llama (LlamaForCausalLM): the plain family; every switch at its default."""

from strata.models.base import CausalLM


class LlamaForCausalLM(CausalLM):
    pass
