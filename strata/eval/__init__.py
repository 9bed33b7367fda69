"""Evaluation tools: perplexity and bits per byte (perplexity.py), KL and top-1 agreement against a reference
model (compare.py), calibration statistics for quantization (calibration.py), text files (textfile.py)."""
