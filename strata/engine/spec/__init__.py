"""Speculative decoding: proposers draft k tokens, the target verifies them in one forward pass.

config.py (SpeculativeConfig, vLLM's `--speculative-config` keys), proposer.py (the interface),
ngram.py (prompt lookup), draft_model.py (a small model with the target's tokenizer), rejection.py
(greedy and rejection-sampling acceptance), policy.py (k per step), decoder.py (the engine's hooks).
"""
