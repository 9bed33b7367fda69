"""`strata quantize`: write a quantized copy of an HF folder (formats and layout: docs/quantization.md)."""

from __future__ import annotations

import argparse
import json

from strata import units
from strata.errors import UnsupportedError, WeightsError


def register(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize the linear layers of an HF folder (int8, int4-gG[-asym], int8-nested-gG, fp8)",
        description="Quantize every linear projection weight (q/k/v/o_proj, gate/up/down_proj, w1/w2/w3) of an "
        "HF model folder; embeddings, lm_head, norms and routers are copied. Output is written to a temporary "
        "folder next to OUT_DIR and renamed when complete.",
    )
    p.add_argument("in_dir", help="HF model folder (config.json + model.safetensors or shards with an index)")
    p.add_argument("out_dir", help="output folder (must not exist unless --force)")
    p.add_argument("--format", default="int8", help="int8, int4-g32|g64|g128[-asym], int8-nested-g64, fp8 "
                   "(default int8); with --mixed, the comma-separated candidate formats")
    p.add_argument("--method", default="peak", help="how scales are chosen: rtn (absmax), peak (each "
                   "group's largest weight kept exact on the grid, the candidate with the smaller error, weighted "
                   "by calibration input energy when given; default), clip (search of clipping ratios, weighted "
                   "likewise), gptq (column-wise "
                   "error compensation with the calibration Hessian; needs --calibrate-data or --calibration) or "
                   "tune (gptq, then int4 scales and codes tuned end to end against the unquantized model's "
                   "next-token distributions on the calibration text; needs --calibrate-data)")
    p.add_argument("--tune-steps", type=int, default=600, help="with --method tune: Adam steps of 8 windows of "
                   "128 tokens (default 600)")
    p.add_argument("--tune-rounding", default="learned", choices=("learned", "fixed"), help="with --method tune: "
                   "learned (codes move too; default) or fixed (GPTQ's codes, only the scales are tuned)")
    p.add_argument("--lm-head", metavar="FORMAT", help="also quantize lm_head (the output projection, read every "
                   "decode step) to FORMAT, e.g. int8; default: keep it unquantized. With tied embeddings the "
                   "output gets its own quantized copy and the embedding lookup keeps its float rows")
    p.add_argument("--mixed", action="store_true", help="choose a format per expert to fit --budget")
    p.add_argument("--budget", help="with --mixed: total bytes of the output weights, e.g. 2GiB or 1.5GB "
                   f"({units.RULE})")
    p.add_argument("--importance", help="with --mixed: JSON {unit: importance} (unit = expert prefix such as "
                   "model.layers.3.mlp.experts.5, or a module name); default: uniform routing frequency")
    p.add_argument("--calibration", help="safetensors of <module>.input_sq_mean [in], <module>.input_second_moment "
                   "[in, in] (gptq) and <expert>.routing_frequency [] measured on calibration text "
                   "(docs/quantization.md)")
    p.add_argument("--calibrate-data", metavar="FILE", help="measure the calibration statistics by running the "
                   "unquantized IN_DIR over this UTF-8 text (use training text, never the evaluation text)")
    p.add_argument("--calibrate-tokens", type=int, default=32768, help="with --calibrate-data: tokens to run "
                   "(default 32768)")
    p.add_argument("--save-calibration", metavar="PATH", help="with --calibrate-data: also write the statistics "
                   "to this safetensors file (reusable with --calibration)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from strata.quant.format import QuantFormat, check_method
    from strata.weights.quant_plan import Calibration, MixedPlanConfig, parse_size, read_calibration
    from strata.weights.quantize_checkpoint import mixed_formats, quantize_checkpoint

    progress = not args.no_progress
    method = check_method(args.method.strip().lower(), "--method")
    if args.calibration and args.calibrate_data:
        raise UnsupportedError("give either --calibration (a stats file) or --calibrate-data (a text), not both")
    if method == "gptq" and not (args.calibration or args.calibrate_data):
        raise UnsupportedError("--method gptq needs calibration: --calibrate-data FILE or --calibration FILE")
    if method == "tune" and not args.calibrate_data:
        raise UnsupportedError("--method tune needs calibration text: --calibrate-data FILE")
    if not args.mixed and (args.budget or args.importance):
        raise UnsupportedError("--budget and --importance need --mixed")
    calib, tune = Calibration(), {}
    if args.calibration:
        calib = read_calibration(args.calibration)
    if args.calibrate_data:
        calib = _calibrate(args, progress, second_moments=method in ("gptq", "tune"))
    if method == "tune":
        from strata.eval.textfile import read_text
        from strata.tokenizer import Tokenizer
        from strata.weights.quant_tune import TuneConfig

        ids = Tokenizer(args.in_dir).encode(read_text(args.calibrate_data))[: args.calibrate_tokens]
        tune = {"tune_ids": ids, "tune_config": TuneConfig(steps=args.tune_steps, rounding=args.tune_rounding,
                                                           progress=progress)}
    if not args.mixed:
        fmt = QuantFormat.parse(args.format)
        out = quantize_checkpoint(args.in_dir, args.out_dir, fmt=fmt, force=args.force, progress=progress,
                                  method=method, calibration=calib, lm_head=args.lm_head, **tune)
        head = f", lm_head in {QuantFormat.parse(args.lm_head)}" if args.lm_head else ""
        print(f"wrote {out}: linear layers in {fmt} ({method}){head}")
        return 0
    if not args.budget:
        raise UnsupportedError("--mixed needs --budget, e.g. --budget 2GiB")
    formats = tuple(str(QuantFormat.parse(f)) for f in args.format.split(","))
    if len(formats) == 1:  # one format given: let the plan choose between it and int4-g64
        formats = tuple(dict.fromkeys((*formats, "int8", "int4-g64")))
    cfg = MixedPlanConfig(budget_bytes=parse_size(args.budget), formats=formats,
                          expert_frequency=_default_frequency(Path(args.in_dir)), input_sq=calib.input_sq,
                          second_moment=calib.second_moment, method=method,
                          importance=dict(calib.routing_frequency))
    if args.importance:
        try:
            cfg.importance.update({str(k): float(v) for k, v in json.loads(Path(args.importance).read_text()).items()})
        except (OSError, ValueError, AttributeError) as e:
            raise WeightsError(f"{args.importance}: expected a JSON object {{unit: number}} ({e})") from None
    modules = mixed_formats(Path(args.in_dir), cfg, progress=progress)
    out = quantize_checkpoint(args.in_dir, args.out_dir, modules=modules, force=args.force, progress=progress,
                              label="mixed", method=method, calibration=calib, lm_head=args.lm_head, **tune)
    counts = {f: list(modules.values()).count(f) for f in sorted(set(modules.values()))}
    print(f"wrote {out}: " + ", ".join(f"{n} linears in {f}" for f, n in counts.items()) + f" ({method})")
    return 0


def _default_frequency(src) -> float:
    """top_k / num_experts from config.json: the share of tokens an expert sees under uniform routing."""
    try:
        c = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return 1.0
    experts = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts")
    top_k = c.get("num_experts_per_tok")
    return top_k / experts if experts and top_k else 1.0


def _calibrate(args: argparse.Namespace, progress: bool, second_moments: bool):
    """Statistics of the unquantized model on --calibrate-data, read as read_calibration reads a file."""
    from strata.eval.calibration import calibrate, save_calibration
    from strata.eval.textfile import read_text
    from strata.weights.quant_plan import calibration_of

    stats = calibrate(args.in_dir, read_text(args.calibrate_data), max_tokens=args.calibrate_tokens,
                      progress=progress, second_moments=second_moments)
    if args.save_calibration:
        save_calibration(stats, args.save_calibration)
    return calibration_of(stats, args.calibrate_data)
