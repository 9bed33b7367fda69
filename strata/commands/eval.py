"""`strata eval ppl`: perplexity and bits per byte of a model on a text file."""

from __future__ import annotations

import json
import os
import sys

from strata.errors import StrataError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    ppl = kinds.add_parser("ppl", help="perplexity and bits per byte on a text file")
    ppl.add_argument("--model", default=None, help="HF model folder (default: the bundled model)")
    ppl.add_argument("--data", required=True, help="UTF-8 text file")
    ppl.add_argument("--context", type=int, default=512, help="window length in tokens")
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: context/2)")
    ppl.add_argument("--split", default=None,
                     help="score each document separately, split on this string (e.g. '<|endoftext|>')")
    ppl.add_argument("--max-positions", type=int, default=128, help="with --split: predicted tokens per document")
    ppl.add_argument("--tail-fraction", type=float, default=None,
                     help="score only the last fraction of the file (e.g. 0.1 for a held-out split)")
    ppl.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    ppl.add_argument("--json", action="store_true", help="print one JSON object with ppl, bits_per_byte, tokens")
    ppl.set_defaults(func=run_ppl)


def run_ppl(args) -> int:
    from strata.engine.llm_engine import BUNDLED_MODEL
    from strata.engine.perplexity import per_document, sliding_window
    from strata.tokenizer import Tokenizer
    from strata.weights.loader import load_model

    if not os.path.isfile(args.data):
        raise StrataError(f"{args.data}: file not found (expected a UTF-8 text file)")
    with open(args.data, encoding="utf-8", errors="strict") as f:
        text = f.read()
    if args.tail_fraction:
        cut = text.rfind("\n", 0, int(len(text) * (1 - args.tail_fraction))) + 1
        text = text[cut:]
    path = args.model or BUNDLED_MODEL
    progress = sys.stderr.isatty()
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
