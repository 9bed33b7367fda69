"""`strata convert FORMAT ...`: turn checkpoints from other formats into HF folders Strata and transformers load.

Each source format is one `_add_<format>` function below, listed in CONVERTERS; adding a format is a new
function plus one list entry.
"""

from __future__ import annotations

import argparse


def _add_llama2c(formats) -> None:
    p = formats.add_parser(
        "llama2c",
        help="llama2.c checkpoint (legacy or version 1 fp32) + tokenizer -> HF Llama folder",
        description="Convert a llama2.c checkpoint and its tokenizer (llama2.c tok*.bin or SentencePiece .model) "
        "into an HF-format Llama folder (config.json, model.safetensors, tokenizer.json, ...).",
    )
    p.add_argument("checkpoint", help="llama2.c model file, e.g. stories260K.bin")
    p.add_argument("tokenizer", help="tokenizer: llama2.c tok*.bin or SentencePiece *.model")
    p.add_argument("out_dir", help="output folder (created; must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace out_dir if it already exists")
    p.set_defaults(func=_run_llama2c)


def _run_llama2c(args: argparse.Namespace) -> int:
    from strata.models.registry import load_config
    from strata.weights.llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir, overwrite=args.force)
    c = load_config(out)
    print(f"wrote {out}: LlamaForCausalLM hidden={c.hidden_size} layers={c.num_hidden_layers} "
          f"heads={c.num_attention_heads}/{c.num_key_value_heads} vocab={c.vocab_size} "
          f"max_positions={c.max_position_embeddings} tied={c.tie_word_embeddings}")
    return 0


def _add_gguf(formats) -> None:
    p = formats.add_parser(
        "gguf",
        help="GGUF file (llama.cpp) -> HF folder",
        description="Convert a GGUF file into an HF folder (config.json, model.safetensors, tokenizer.json with the "
        "chat template). Architectures: llama (incl. Mistral, Mixtral), qwen2, qwen3, qwen2moe, qwen3moe, olmoe. "
        "Quantized tensors are dequantized exactly (float32, or bfloat16 where that is exact).",
    )
    p.add_argument("gguf_file", help="the .gguf file")
    p.add_argument("out_dir", help="output folder (created; must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace out_dir if it already exists")
    p.add_argument("--keep-quantized", action="store_true",
                   help="keep Q4_0 projections as Strata int4-g32 and Q8_0/Q4_1/Q4_K/Q5_K/Q6_K ones as their blocks "
                        "(the same values, 4-7x less memory; a tied quantized embedding also becomes a quantized "
                        "lm_head; the folder is then for Strata only)")
    p.set_defaults(func=_run_gguf)


def _run_gguf(args: argparse.Namespace) -> int:
    from strata.models.registry import load_config
    from strata.weights.gguf_convert import convert_gguf

    out = convert_gguf(args.gguf_file, args.out_dir, overwrite=args.force, keep_quantized=args.keep_quantized)
    c = load_config(out)
    experts = f" experts={c.num_experts}/{c.num_experts_per_tok}" if c.num_experts else ""
    print(f"wrote {out}: {c.architecture} hidden={c.hidden_size} layers={c.num_hidden_layers} "
          f"heads={c.num_attention_heads}/{c.num_key_value_heads}{experts} vocab={c.vocab_size} "
          f"dtype={c.torch_dtype} tied={c.tie_word_embeddings}"
          + (f" quantized={len(c.raw['quantization_config']['modules'])} modules" if "quantization_config" in c.raw
             else ""))
    return 0


CONVERTERS = [_add_llama2c, _add_gguf]


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint from another format into an HF folder")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for add in CONVERTERS:
        add(formats)
