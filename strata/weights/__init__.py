"""Reading and writing weights: safetensors loading, converters, quantization formats."""
