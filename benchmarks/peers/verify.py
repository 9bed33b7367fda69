"""Checks that the llama.cpp peer computes the same model as Strata: greedy tokens and the top-20
log-probabilities after the prompt, on the same token ids (so tokenizers cannot hide a difference).

    .venv/bin/python benchmarks/peers/verify.py --model dense-1b --type bf16
    .venv/bin/python benchmarks/peers/verify.py --model strata/assets/models/shakespeare-moe --text "ROMEO:"

--model is a benchmarks/synthetic.py preset name or an HF folder. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers.llamacpp import gguf_for, greedy_llamacpp


def strata_greedy(path: str | Path, prompt_ids: list[int], n_tokens: int, dtype: str | None = None) -> dict:
    """{"tokens": greedy ids, "top": [(id, logprob)] x 20 after the prompt} from Strata."""
    from strata import LLM, SamplingParams

    llm = LLM(str(path), progress=False, max_num_seqs=1, **({"dtype": dtype} if dtype else {}))
    out = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True,
                                                     logprobs=20))[0].outputs[0]
    return {"tokens": out.token_ids, "top": out.logprobs[0]["top"]}


def compare(hf_folder: str | Path, qtype: str, prompt_ids: list[int], n_tokens: int = 8,
            dtype: str | None = None) -> dict:
    """Strata (compute dtype `dtype`, default: the checkpoint's) vs llama.cpp on the `qtype` GGUF."""
    ref = strata_greedy(hf_folder, prompt_ids, n_tokens, dtype)
    peer = greedy_llamacpp(gguf_for(hf_folder, qtype), prompt_ids, n_tokens)
    logits = peer.pop("logits")
    m = max(logits)
    lse = m + math.log(sum(math.exp(x - m) for x in logits))
    diffs = [abs((logits[i] - lse) - lp) for i, lp in ref["top"]]
    same = [a == b for a, b in zip(ref["tokens"], peer["tokens"])]
    return {"model": Path(hf_folder).name, "type": qtype, "strata_dtype": dtype, "prompt_ids": prompt_ids,
            "strata_tokens": ref["tokens"], "llamacpp_tokens": peer["tokens"], "tokens_match": all(same),
            "first_mismatch": None if all(same) else same.index(False),
            "top20_logprob_max_abs_diff": max(diffs),
            "top1_logprob_strata": ref["top"][0][1], "top20_order_match": [i for i, _ in ref["top"][:5]]
            == sorted(range(len(logits)), key=lambda i: -logits[i])[:5]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dense-1b")
    ap.add_argument("--type", default="bf16")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--dtype", help="Strata compute dtype (llama.cpp computes activations in float32)")
    ap.add_argument("--ids", default="1,15,27", help="comma-separated prompt token ids")
    ap.add_argument("--text", help="prompt text, tokenized by Strata's tokenizer (overrides --ids)")
    args = ap.parse_args()
    folder = Path(args.model)
    if not folder.is_dir():
        from benchmarks.synthetic import synthetic_model

        folder = synthetic_model(args.model)
    if args.text:
        from strata.tokenizer import Tokenizer

        ids = Tokenizer(str(folder)).encode(args.text)
    else:
        ids = [int(x) for x in args.ids.split(",")]
    print(json.dumps(compare(folder, args.type, ids, args.tokens, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
