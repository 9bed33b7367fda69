"""Peer engines (llama.cpp through llama-cpp-python) run side by side with Strata in benchmarks."""
