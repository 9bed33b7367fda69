"""Quantization formats as tensor math: codes, scales and packing (format.py), GGUF k-quant blocks (kquant.py),
scale search and GPTQ (search.py, gptq.py). No model, no file: layers/ runs these formats, weights/ writes
and reads them."""
