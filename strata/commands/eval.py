"""`strata eval ppl`: perplexity and bits per byte of a model on a text file; `strata eval kl`: how far a
(quantized) model's next-token distributions are from a reference model's on the same windows."""

from __future__ import annotations

import json
import sys

from strata.commands.engine_args import add_engine_args
from strata.errors import StrataError
from strata.eval.textfile import read_text


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    ppl = kinds.add_parser("ppl", help="perplexity and bits per byte on a text file")
    add_engine_args(ppl, only=("model",))
    _add_window_args(ppl)
    ppl.add_argument("--json", action="store_true", help="print one JSON object with ppl, bits_per_byte, tokens")
    ppl.set_defaults(func=run_ppl)
    kl = kinds.add_parser("kl", help="KL divergence and top-1 agreement of a model against a reference model")
    kl.add_argument("--model", required=True, help="HF model folder to judge (e.g. a quantized copy)")
    kl.add_argument("--reference", required=True, help="HF model folder of the reference (e.g. unquantized)")
    _add_window_args(kl)
    kl.add_argument("--json", action="store_true",
                    help="print one JSON object with kl, top1_agreement, tokens, ppl and ref_ppl")
    kl.set_defaults(func=run_kl)


def _add_window_args(p) -> None:
    p.add_argument("--data", required=True, help="UTF-8 text file")
    p.add_argument("--context", type=int, default=512, help="window length in tokens")
    p.add_argument("--stride", type=int, default=None, help="window step (default: context/2)")
    p.add_argument("--split", default=None,
                   help="score each document separately, split on this string (e.g. '<|endoftext|>')")
    p.add_argument("--max-positions", type=int, default=128, help="with --split: predicted tokens per document")
    p.add_argument("--tail-fraction", type=float, default=None,
                   help="score only the last fraction of the file (e.g. 0.1 for a held-out split)")
    add_engine_args(p, only=("dtype",), defaults={"dtype": "float32"})


def run_ppl(args) -> int:
    from strata.engine.llm_engine import BUNDLED_MODEL
    from strata.eval.perplexity import per_document, sliding_window
    from strata.tokenizer import Tokenizer
    from strata.weights.gguf_cache import resolve_model_path
    from strata.weights.loader import load_model

    text = read_text(args.data, args.tail_fraction)
    progress = sys.stderr.isatty()
    path = resolve_model_path(args.model or BUNDLED_MODEL, progress)
    model = load_model(path, dtype=args.dtype, progress=progress)
    tok = Tokenizer(path)
    if args.split:
        res = per_document(model, tok, text, args.split, args.max_positions, progress=progress)
    else:
        res = sliding_window(model, tok, text, args.context, args.stride or args.context // 2, progress=progress)
    if args.json:
        print(json.dumps(res.to_dict()))
    else:
        print(f"ppl {res.ppl:.4f}  bits/byte {res.bits_per_byte:.4f}  ({res.tokens} tokens, {res.bytes} bytes)")
    return 0


def run_kl(args) -> int:
    from strata.eval.compare import compare_models
    from strata.models.registry import load_config
    from strata.tokenizer import Tokenizer
    from strata.weights.loader import load_model

    text = read_text(args.data, args.tail_fraction)
    progress = sys.stderr.isatty()
    ref_vocab, vocab = (load_config(p).vocab_size for p in (args.reference, args.model))
    if ref_vocab != vocab:
        raise StrataError(f"{args.model}/config.json: vocab_size {vocab}, expected {ref_vocab} as in the "
                          f"reference {args.reference}")
    tok = Tokenizer(args.model)
    reference = load_model(args.reference, dtype=args.dtype, progress=progress)
    model = load_model(args.model, dtype=args.dtype, progress=progress)
    res = compare_models(reference, {"model": model}, tok, text, context=args.context, stride=args.stride,
                         split=args.split, max_positions=args.max_positions, progress=progress)["model"].to_dict()
    if args.json:
        print(json.dumps(res))
    else:
        print(f"KL {res['kl']:.5f} nats/token  top-1 agreement {res['top1_agreement']:.2%}  "
              f"ppl {res['ppl']:.4f} vs {res['ref_ppl']:.4f} reference  ({res['tokens']} tokens)")
    return 0
