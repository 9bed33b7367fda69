"""`strata generate` (one prompt, text on stdout, statistics on stderr) and `strata chat` (interactive)."""

from __future__ import annotations

import argparse
import sys
import time

from strata.commands.engine_args import add_engine_args, engine_config_from_args
from strata.fileio import write_json_atomic


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stats-json", default=None, help="write run statistics as one JSON object to this file")


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt (text on stdout, stats on stderr)")
    g.add_argument("prompt", nargs="?", default="", help="prompt text (empty: start from BOS)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    g.add_argument("--quiet", action="store_true", help="no statistics on stderr")
    _sampling_args(g)
    add_engine_args(g, skip=("seed",))  # its --seed above seeds the sampling
    g.set_defaults(func=run_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system message")
    _sampling_args(c)
    add_engine_args(c, skip=("seed",))
    c.set_defaults(func=run_chat)


def _llm(args):
    from strata import LLM
    from strata.weights.file_guard import guard_model_files

    cfg = engine_config_from_args(args)
    kw = {k: v for k, v in vars(cfg).items() if k != "model"}
    llm = LLM(cfg.model, progress=sys.stderr.isatty(), **kw)
    guard_model_files(llm.engine.model_path)  # a model file changed under us: one line and exit 75, not SIGBUS
    return llm


def _params(llm, args):
    return llm.default_sampling_params(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )


def _write_stats(path: str, stats: dict) -> None:
    write_json_atomic(path, stats)


def run_generate(args) -> int:
    from strata.engine.stats import run_stats

    llm = _llm(args)
    params = _params(llm, args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    t0 = time.perf_counter()
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = run_stats(llm, time.perf_counter() - t0)
    if not args.quiet:
        print(f"[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    if args.stats_json:
        _write_stats(args.stats_json, stats)
    return 0


def run_chat(args) -> int:
    llm = _llm(args)
    params = _params(llm, args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("strata chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = llm.tokenizer.encode_chat(messages)
        reply = []
        for delta in llm.stream(ids, params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
