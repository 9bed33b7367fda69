"""One file per HF model_type; registry.py maps config.json architectures to classes."""
