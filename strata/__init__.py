"""Strata: LLM inference, above all MoE, on machines with less memory than the model."""
