"""Train the bundled tiny models: a Qwen3-MoE on Tiny Shakespeare and a dense Qwen3 draft model.

Dev-only: needs the test extras (`pip install -e '.[test]'`, for transformers). The strata package never
imports this file; it only reads the folders it writes (strata/assets/models/shakespeare-{moe,draft}).

Steps: byte-level BPE tokenizer on the first 90% of tinyshakespeare (split by characters at a line
boundary; the last 10% is held out), then the MoE and the draft model (fp32 AdamW, warmup + cosine),
then held-out perplexity / bits per byte of the bf16 weights, expert load per layer, a sample, and
HF-format folders with a model card. Everything is written to a temporary folder and renamed at the end.

    .venv/bin/python scripts/train_bundled.py --moe-steps 800 --draft-steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from strata.eval.textfile import split_at_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SAMPLE = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


@dataclass
class RunResult:
    name: str
    model: torch.nn.Module
    steps: int
    seconds: float
    final_loss: float


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=ROOT / "strata" / "assets" / "models")
    p.add_argument("--seed", type=int, default=0)
    # one thread: on a shared 2-core machine, two threads spin at barriers and ran 7x slower than one
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--moe-steps", type=int, default=800)
    p.add_argument("--moe-lr", type=float, default=3e-3)
    p.add_argument("--draft-steps", type=int, default=600)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--moe-dropout", type=float, default=0.1, help="residual dropout while training the MoE")
    p.add_argument("--draft-dropout", type=float, default=0.0)
    p.add_argument("--aux-coef", type=float, default=0.02, help="per-layer load-balancing loss coefficient")
    p.add_argument("--models", default="moe,draft", help="comma list of models to train: moe, draft")
    p.add_argument("--experts-impl", default="eager", help="transformers experts implementation for training")
    p.add_argument("--eval-tokens", type=int, default=0, help="cap on held-out tokens (0 = all)")
    p.add_argument("--eval-every", type=int, default=250, help="steps between quick held-out loss checks")
    p.add_argument("--sample-tokens", type=int, default=120)
    return p.parse_args(argv)


def train_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    chunks = [train_text[i:i + 65536] for i in range(0, len(train_text), 65536)]
    tok.train_from_iterator(chunks, trainer=trainer)
    return tok


def moe_config(vocab: int, seq_len: int, aux: float, impl: str):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=160, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        output_router_logits=True, router_aux_loss_coef=aux, tie_word_embeddings=True,
        max_position_embeddings=2 * seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=True,
    )
    cfg._experts_implementation = impl
    return cfg


def draft_config(vocab: int, seq_len: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        max_position_embeddings=2 * seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=True,
    )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 10% of peak


def quick_val_loss(model, val: torch.Tensor, seq_len: int, windows: int = 16) -> float:
    model.eval()
    with torch.no_grad():
        windows = min(windows, len(val) // seq_len)
        x = val[:windows * seq_len].view(windows, seq_len)  # [W, T]
        logits = model(input_ids=x).logits[:, :-1]  # [W, T-1, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
    model.train()
    return loss


def balance_loss(router_logits: tuple, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss per layer, averaged over layers (1.0 = perfectly balanced).

    transformers' load_balancing_loss_func pools all layers before balancing, which let every layer
    collapse onto a different few experts while the pooled loss still read "balanced"."""
    losses = []
    for logits in router_logits:  # [N, E] per layer
        probs = logits.float().softmax(-1)  # [N, E]
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        frac = torch.nn.functional.one_hot(chosen, probs.shape[-1]).float().sum(1).mean(0) / top_k  # [E]
        losses.append(probs.shape[-1] * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def add_residual_dropout(model, p: float) -> list:
    """Dropout on each attention and MLP output during training only; the saved architecture is unchanged."""
    def drop(module, _inputs, out):
        if isinstance(out, tuple):
            return (torch.nn.functional.dropout(out[0], p, module.training), *out[1:])
        return torch.nn.functional.dropout(out, p, module.training)

    return [m.register_forward_hook(drop) for layer in model.model.layers for m in (layer.self_attn, layer.mlp)]


def train(name: str, model, data: torch.Tensor, val: torch.Tensor, steps: int, lr: float, dropout: float,
          args) -> RunResult:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed + 1)
    offsets = torch.arange(args.seq_len)
    hooks = add_residual_dropout(model, dropout) if dropout > 0 else []
    top_k = getattr(model.config, "num_experts_per_tok", 0)
    model.train()
    t0, ema = time.time(), None
    bar = tqdm(range(steps), desc=f"train {name}", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, args.warmup)
        starts = torch.randint(0, len(data) - args.seq_len, (args.batch_size,), generator=gen)
        batch = data[starts[:, None] + offsets]  # [B, T]
        out = model(input_ids=batch)
        logits = out.logits[:, :-1]  # [B, T-1, V]
        lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        aux = balance_loss(out.router_logits, top_k) if top_k else None
        (lm + args.aux_coef * aux if aux is not None else lm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = lm.item() if ema is None else 0.98 * ema + 0.02 * lm.item()
        tok_s = (step + 1) * batch.numel() / (time.time() - t0)
        bar.set_postfix(loss=f"{ema:.3f}", aux=f"{aux.item():.3f}" if aux is not None else "-", tok_s=f"{tok_s:.0f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            bar.write(f"{name} step {step + 1}: train {ema:.3f}, held-out {quick_val_loss(model, val, args.seq_len):.3f}")
    for h in hooks:
        h.remove()
    return RunResult(name, model, steps, time.time() - t0, ema)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, byte_len: torch.Tensor, seq_len: int) -> dict:
    """Held-out NLL over non-overlapping windows; also counts routed tokens per expert if MoE."""
    model.eval()
    counts, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            counts[i] = torch.zeros(gate.num_experts, dtype=torch.long)

            def count(_module, _inputs, out, i=i):  # out = (router_logits, top-k weights, top-k indices)
                counts[i] += torch.bincount(out[2].flatten(), minlength=len(counts[i]))

            hooks.append(gate.register_forward_hook(count))
    nll = n_tok = n_bytes = 0.0
    n_windows = (len(data) - 1) // seq_len
    for w in tqdm(range(n_windows), desc="eval", dynamic_ncols=True, leave=False):
        x = data[w * seq_len:(w + 1) * seq_len + 1]
        logits = model(input_ids=x[None, :-1]).logits[0].float()  # [T, V]
        nll += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
        n_tok += seq_len
        n_bytes += byte_len[x[1:]].sum().item()
    for h in hooks:
        h.remove()
    load = {i: (c.float() / c.sum()).tolist() for i, c in counts.items()}
    return {"tokens": int(n_tok), "bytes": int(n_bytes), "ppl": math.exp(nll / n_tok),
            "bits_per_byte": nll / math.log(2) / n_bytes, "expert_load": load}


def param_counts(model, cfg) -> dict:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    k, e = getattr(cfg, "num_experts_per_tok", 1), getattr(cfg, "num_experts", 1)
    return {"total": total, "active": total - experts + experts * k // e, "experts": experts}


def write_tokenizer(folder: Path, tok: Tokenizer, seq_len: int) -> None:
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in (EOT, IM_START, IM_END)}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
           "unk_token": None, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": 2 * seq_len, "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "additional_special_tokens": [IM_START, IM_END]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def sample(model, tok: Tokenizer, prompt: str, n: int, seed: int) -> str:
    torch.manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=n, pad_token_id=0, eos_token_id=0, **SAMPLE)
    return tok.decode(out[0].tolist())


def model_card(name: str, run: RunResult, cfg, counts: dict, ev: dict, text: str, split: dict, args) -> str:
    is_moe = bool(ev["expert_load"])
    command = "python scripts/train_bundled.py " + shlex.join(sys.argv[1:])
    kind = "Mixture-of-Experts (Qwen3-MoE architecture)" if is_moe else "dense draft model (Qwen3)"
    lr = args.moe_lr if is_moe else args.draft_lr
    lines = [
        f"# {name}", "",
        f"A tiny {kind} trained from scratch on Tiny Shakespeare, bundled with Strata for demos and tests.",
        "It is a toy: it writes Shakespeare-flavoured text and knows nothing else.", "",
        "## Training", "", f"    {command}", "",
        (f"- data: tinyshakespeare `input.txt` ({split['chars']:,} chars); train = first {split['train_chars']:,} "
         f"chars (90%, cut at a line boundary), held out = last {split['val_chars']:,} chars"),
        (f"- tokenizer: byte-level BPE (`tokenizers`), vocab {cfg.vocab_size}, trained on the train split only; "
         f"special tokens `{EOT}` (id 0, bos/eos/pad), `{IM_START}`, `{IM_END}`"),
        (f"- {run.steps} steps x batch {args.batch_size} x context {args.seq_len} tokens, AdamW (betas 0.9/0.95, "
         f"wd 0.1), peak lr {lr}, {args.warmup} warmup steps, cosine to 10%, fp32, seed {args.seed}; "
         f"{run.seconds / 60:.1f} min wall on {args.threads} CPU thread(s) of a shared machine"),
        (f"- residual dropout {args.moe_dropout if is_moe else args.draft_dropout} on attention and MLP outputs "
         "(training only)"),
        (f"- weights saved in bfloat16; trained context {args.seq_len} tokens "
         f"(max_position_embeddings {cfg.max_position_embeddings})"),
    ]
    if is_moe:
        lines.append(f"- router load-balancing loss (Switch-style, per layer, mean over layers) with coefficient "
                     f"{args.aux_coef}; `output_router_logits` is saved as false for inference")
    lines += ["", "## Size", "", "| parameters | count |", "|---|---|",
              f"| total | {counts['total']:,} |", f"| active per token | {counts['active']:,} |"]
    if is_moe:
        lines.append(f"| routed experts (all layers) | {counts['experts']:,} |")
    lines += ["", "## Held-out evaluation (bf16 weights, fp32 compute)", "",
              (f"On the held-out last 10% ({ev['tokens']:,} predicted tokens, {ev['bytes']:,} bytes, "
               f"non-overlapping windows of {args.seq_len}): perplexity **{ev['ppl']:.2f}** per token, "
               f"**{ev['bits_per_byte']:.3f}** bits per byte. Final training loss (EMA) {run.final_loss:.3f}.")]
    if is_moe:
        e = len(next(iter(ev["expert_load"].values())))
        lines += ["", ("## Expert load (fraction of routed token slots per expert on held-out text; "
                       f"uniform = {1 / e:.3f})"), "",
                  "| layer | " + " | ".join(f"e{j}" for j in range(e)) + " | max / uniform |",
                  "|---" * (e + 2) + "|"]
        for i, fr in ev["expert_load"].items():
            lines.append(f"| {i} | " + " | ".join(f"{f:.3f}" for f in fr) + f" | {max(fr) * e:.2f} |")
    lines += ["", f"## Sample (prompt `ROMEO:`, temperature 0.8, top-k 50, top-p 0.95, seed {args.seed})", "",
              "```", text, "```", "", "## License", "",
              ("The training text is Shakespeare (public domain), as distributed in karpathy/char-rnn "
               "(`data/tinyshakespeare/input.txt`)."), ""]
    return "\n".join(lines)


def save_model(folder: Path, name: str, run: RunResult, cfg, tok, ev, text, split, args) -> None:
    from transformers import GenerationConfig

    folder.mkdir(parents=True)
    model = run.model.to(torch.bfloat16)
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    model.config._experts_implementation = None
    model.save_pretrained(folder, safe_serialization=True)
    # transformers 5 writes only its new key names; older readers (transformers 4.x) need the classic ones
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    if "num_local_experts" in config:
        config.setdefault("num_experts", config["num_local_experts"])
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, **SAMPLE).save_pretrained(folder)
    write_tokenizer(folder, tok, args.seq_len)
    counts = param_counts(model, cfg)
    (folder / "README.md").write_text(model_card(name, run, cfg, counts, ev, text, split, args))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    text = args.data.read_text()
    train_text, val_text = split_at_line(text, 0.9)  # held-out part starts on a fresh line
    split = {"chars": len(text), "train_chars": len(train_text), "val_chars": len(val_text)}
    tok = train_tokenizer(train_text, args.vocab_size)
    train_ids = torch.tensor(tok.encode(train_text).ids)
    val_ids = torch.tensor(tok.encode(val_text).ids)
    if args.eval_tokens:
        val_ids = val_ids[:args.eval_tokens + 1]
    vocab = tok.get_vocab()
    byte_len = torch.zeros(len(vocab), dtype=torch.long)
    for piece, i in vocab.items():  # ByteLevel maps each byte to one character
        byte_len[i] = 0 if piece in (EOT, IM_START, IM_END) else len(piece)
    print(f"tokenizer: vocab {len(vocab)}; train {len(train_ids):,} tokens, held out {len(val_ids):,} tokens")

    tmp = args.out / f".train-bundled-{int(time.time())}"
    results = []
    runs = {
        "moe": ("shakespeare-moe", lambda: Qwen3MoeForCausalLM(
            moe_config(len(vocab), args.seq_len, args.aux_coef, args.experts_impl)),
            args.moe_steps, args.moe_lr, args.moe_dropout),
        "draft": ("shakespeare-draft", lambda: Qwen3ForCausalLM(draft_config(len(vocab), args.seq_len)),
                  args.draft_steps, args.draft_lr, args.draft_dropout),
    }
    for key in args.models.split(","):
        name, build, steps, lr, dropout = runs[key]
        torch.manual_seed(args.seed)  # each model is reproducible on its own, whatever else is trained
        model = build()
        run = train(name, model, train_ids, val_ids, steps, lr, dropout, args)
        model.to(torch.bfloat16).float()  # evaluate exactly the weights that get shipped
        ev = evaluate(model, val_ids, byte_len, args.seq_len)
        text = sample(model, tok, "ROMEO:", args.sample_tokens, args.seed)
        print(f"{name}: held-out ppl {ev['ppl']:.2f}, {ev['bits_per_byte']:.3f} bits/byte, "
              f"{run.seconds / 60:.1f} min\n{text}\n")
        save_model(tmp / name, name, run, model.config, tok, ev, text, split, args)
        results.append(name)
    for name in results:
        final, old = args.out / name, args.out / f".{name}.old"
        if final.exists():
            final.rename(old)
        (tmp / name).rename(final)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rmdir()
    print("wrote", ", ".join(str(args.out / n) for n in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
