"""CLI: `strata analyze` (performance model), `strata probe` (measure this machine), `strata plan` (choose config)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from strata.commands.engine_args import add_field_arg, engine_field, parse_size
from strata.errors import ConfigError


def register(sub) -> None:
    a = sub.add_parser("analyze", help="predict speed, memory and energy of a model on hardware")
    a.add_argument("--model", help="a name as the field writes it (HF id, '...-GGUF', 'llama3.1:8b'; see "
                   "--list-models), a folder with config.json or .gguf, a config.json, or a .gguf file")
    a.add_argument("--hardware", default="strata-dev",
                   help="catalog key or name ('Apple M1 Ultra (64-core GPU)', '2xh100-sxm', 'rtx4090+xeon-6454s'), "
                   "an ad-hoc spec 'mem_bw=800GB/s,bf16=100TFLOPS,mem=64GB,cores=16', or a probe profile .json")
    a.add_argument("--engine", default="generic", help="engine as named: llama.cpp, ollama, mlx, vllm 0.19, sglang, "
                   "tensorrt-llm, ktransformers, moe-infinity, mixtral-offloading, transformers, strata... "
                   "(unknown: physics-only prediction)")
    a.add_argument("--batch", type=int, default=1, help="sequences decoded together (0 = as many as KV fits)")
    a.add_argument("--prompt", type=int, default=512)
    a.add_argument("--gen", type=int, default=128)
    a.add_argument("--weights", default=None, help="weight format as named: bf16, fp8, Q4_K_M, IQ2_XXS, AWQ, GPTQ, "
                   "MXFP4, '4-bit'... (default: the GGUF file's, the name's, the engine's default, the model's own)")
    a.add_argument("--expert-weights", default=None, help="routed-expert precision when different (mixed)")
    a.add_argument("--kv", default="bf16", help="KV-cache precision")
    a.add_argument("--activations", default="bf16")
    a.add_argument("--offload", default="auto", choices=["auto", "none", "experts", "layers"])
    a.add_argument("--expert-tier", default="host", choices=["host", "flash"])
    a.add_argument("--cold", default="auto", choices=["auto", "transfer", "cpu"],
                   help="cold experts: transfer to the device or compute on the host CPU (Fiddler)")
    a.add_argument("--gpu-layers", type=int, default=None, help="layers on the device (llama.cpp -ngl)")
    a.add_argument("--cpu-moe-layers", type=int, default=0, help="experts of the first N layers on the CPU")
    a.add_argument("--cache-frac", type=float, default=None, help="fraction of routed experts cached on the device")
    a.add_argument("--hit-rate", type=float, default=None, help="expert-cache hit rate (default: from the trace "
                   "or uniform routing)")
    a.add_argument("--routing-trace", default=None, help="JSON-lines routing trace to replay for the hit rate")
    a.add_argument("--cache-policy", default="lru", choices=["lru", "lfu", "score"])
    a.add_argument("--prefetch", type=float, default=0.0, help="share of transfers overlapped with compute (0..1)")
    a.add_argument("--sweep-batch", default=None, help="comma list of batch sizes: print one table")
    a.add_argument("--sweep-context", default=None, help="comma list of prompt lengths: print one table")
    a.add_argument("--plot", default=None, help="write a roofline PNG with the operators")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--validate", default=None, help="predict every row of a measurements CSV and score it")
    a.add_argument("--calibrate", action="store_true", help="refit calibration.json on the repo's measurements "
                   "(strata/analysis/data/published_perf.csv, or --data) with leave-one-out / -source-out scores")
    a.add_argument("--data", default=None, help="measurements CSV for --calibrate")
    a.add_argument("--calibration", default=None, help="efficiency factors JSON (default: the shipped one)")
    a.add_argument("--list-hardware", action="store_true")
    a.add_argument("--list-models", action="store_true")
    a.set_defaults(func=run_analyze)

    p = sub.add_parser("probe", help="measure this machine's memory, disk and matmul ceilings")
    p.add_argument("--out", default=None, help="profile path (default ~/.cache/strata/hardware.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests)")
    p.add_argument("--dir", default=None, help="directory for the temporary disk-test file")
    p.add_argument("--no-engine", action="store_true",
                   help="skip measuring Strata's own host costs per kernel call (thin random models, ~1 minute)")
    p.set_defaults(func=run_probe)

    pl = sub.add_parser("plan", help="rank Strata configurations for a model under a memory budget")
    pl.add_argument("--model", required=True)
    add_field_arg(pl, engine_field("memory_budget"), required=True)  # the same flag as generate's and serve's
    pl.add_argument("--profile", default=None, help="probe profile (default ~/.cache/strata/hardware.json, "
                    "else the catalog's strata-dev entry)")
    pl.add_argument("--routing-trace", default=None)
    pl.add_argument("--runs", default=None, help="measured-run history (default ~/.cache/strata/runs.jsonl)")
    pl.add_argument("--prompt", type=int, default=128)
    pl.add_argument("--gen", type=int, default=128)
    pl.add_argument("--top", type=int, default=8)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=run_plan)


def _effs(path):
    from strata.analysis.efficiency import Efficiencies

    if path and not os.path.exists(path):
        raise ConfigError(f"--calibration {path}: file not found")
    return Efficiencies.load(path)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected a comma-separated list of integers") from None


def run_analyze(args: argparse.Namespace) -> int:
    from strata.analysis import hardware, shapes

    effs = _effs(args.calibration)
    if args.list_hardware:
        for k, d in hardware.load_catalog().items():
            print(f"{k:<22}{d.cls:<14}{d.bandwidth_gbs:>8.1f} GB/s  {d.name}  [{d.source}]")
        return 0
    if args.list_models:
        for k, p in shapes.load_presets().items():
            c = shapes.shape_from_dict(p["config"], name=k).param_counts()
            print(f"{k:<30}{c['total'] / 1e9:>8.2f} B total {c['active'] / 1e9:>7.2f} B active  [{p['source']}]")
        return 0
    if args.calibrate:
        return _calibrate(args)
    if args.validate:
        return _validate(args, effs)
    if not args.model:
        raise ConfigError("analyze: --model is required (a folder, config.json or preset)")
    return _analyze(args, effs)


def _validate(args, effs) -> int:
    from strata.analysis.validate import load_cases, score

    res = score(load_cases(args.validate), effs)
    if args.json:
        print(json.dumps(res, indent=1, default=float))
        return 0
    print(f"{'#':>3} {'model':<34}{'hardware':<32}{'metric':<17}{'measured':>10}{'predicted':>11}{'error':>8}")
    for r in res["rows"]:
        print(f"{r['index']:>3} {r['model'][:33]:<34}{r['hardware'][:31]:<32}{r['metric']:<17}{r['measured']:>10.1f}"
              f"{r['predicted']:>11.1f}{(r['ratio'] - 1):>+8.0%}" + (f"  [{'; '.join(r['flags'])}]" if r["flags"] else ""))
    for r in res["unpredictable"]:
        print(f"{r['index']:>3} {r['model'][:33]:<34}cannot predict: {r['reason']}")
    flagged = sum(1 for r in res["rows"] if r["flags"])
    print(f"coverage {res['coverage']:.1%} ({flagged} of the predicted rows rest on an assumption); "
          f"predicted {res['n_predicted']} rows, {res['n_unpredictable']} unpredictable; median APE "
          f"{res['median_ape']:.1%}, p90 APE {res['p90_ape']:.1%}, geometric mean predicted/measured "
          f"{res['gmean_ratio']:.3f}")
    return 0


def _calibrate(args) -> int:
    from strata.analysis.calibrate import DATA_PATH, calibrate

    path = args.data or str(DATA_PATH)
    if not os.path.exists(path):
        raise ConfigError(f"--data {path}: file not found (expected a measurements CSV)")
    doc = calibrate(path)
    print(json.dumps(doc["validation"], indent=1))
    print(f"fitted {doc['n_parameters']} parameters on {doc['n_rows']} rows "
          f"({doc['n_rows'] / doc['n_parameters']:.1f} rows per parameter): " + ", ".join(doc["parameters"]))
    return 0


def _scenario(args, model, engine: str, fmts: dict):
    from strata.analysis.assumptions import precisions
    from strata.analysis.placement import Scenario
    from strata.analysis.precision import Precisions
    from strata.analysis.trace import hit_rate, load_trace

    prec = precisions(fmts, kv=args.kv, activations=args.activations)
    if args.expert_weights:
        prec = Precisions(prec.weights, args.expert_weights, prec.activations, prec.kv, prec.head)
    sc = Scenario(batch=args.batch, prompt=args.prompt, gen=args.gen, engine=engine, prec=prec,
                  offload=args.offload, expert_tier=args.expert_tier, cold=args.cold, gpu_layers=args.gpu_layers,
                  cpu_moe_layers=args.cpu_moe_layers, cache_frac=args.cache_frac, hit_rate=args.hit_rate,
                  prefetch=args.prefetch)
    if args.routing_trace and model.is_moe and args.hit_rate is None:
        frac = 1.0 if args.cache_frac is None else args.cache_frac
        sc.hit_rate = hit_rate(load_trace(args.routing_trace), int(frac * model.num_experts), args.cache_policy)
    return sc


def _analyze(args, effs) -> int:
    from dataclasses import replace

    from strata.analysis.assumptions import offload_host, weight_formats
    from strata.analysis.efficiency import versioned_engine
    from strata.analysis.engines import EXPERT_OFFLOAD_FAMILIES, identify
    from strata.analysis.hardware import parse_system
    from strata.analysis.models import resolve_model
    from strata.analysis.predict import predict
    from strata.analysis.report import format_sweep, format_table, format_totals, op_rows

    resolved = resolve_model(args.model)
    model = resolved.shape
    system = parse_system(args.hardware)
    eng = identify(args.engine)
    fmts, how, _ = weight_formats(args.weights, eng, resolved)
    assumptions = resolved.notes + system.notes + [eng.describe(), how]
    engine = versioned_engine(args.engine, None)
    sc = _scenario(args, model, engine, fmts)
    sc.engine_name, sc.engine_version = eng.name, eng.version
    host = offload_host(system, eng, model, sc.prec)
    if host:
        assumptions.append(host)
    if eng.family in EXPERT_OFFLOAD_FAMILIES and model.is_moe and system.host is not None:
        sc.offload = "experts"
    if args.sweep_batch or args.sweep_context:
        batches = _ints(args.sweep_batch, "--sweep-batch") if args.sweep_batch else [sc.batch]
        ctxs = _ints(args.sweep_context, "--sweep-context") if args.sweep_context else [sc.prompt]
        res = [(b, c, predict(model, system, replace(sc, batch=b, prompt=c), effs)) for b in batches for c in ctxs]
        if args.json:
            print(json.dumps([{"batch": b, "prompt": c, **p.to_json(effs)} for b, c, p in res], indent=1))
        else:
            print(f"{model.name} on {system.label} ({eng.describe()}, {sc.prec.fmt()})")
            print(format_sweep(res))
        return 0
    p = predict(model, system, sc, effs)
    pre_rows, dec_rows = op_rows(p.prefill, effs), op_rows(p.decode, effs)
    if args.plot:
        from strata.analysis.plot import roofline_png

        e = effs.get(system.device.cls, engine)
        roofline_png(args.plot, system.device, {"prefill": pre_rows, "decode": dec_rows},
                     sc.prec.compute(), e.eta_bw, e.eta_flops)
    if args.json:
        out = {"model": model.name, "hardware": system.label, "engine": engine, "assumptions": assumptions,
               **p.to_json(effs),
               "params": model.param_counts(), "prefill_ops": pre_rows, "decode_ops": dec_rows}
        print(json.dumps(out, indent=1, default=float))
        return 0
    c = model.param_counts()
    print(f"{model.name} ({c['total'] / 1e9:.2f} B params, {c['active'] / 1e9:.2f} B active) on {system.label}, "
          f"engine {engine}, weights {sc.prec.fmt()}, batch {p.batch}, prompt {sc.prompt}, gen {sc.gen}")
    print("assumptions:\n  " + "\n  ".join(assumptions))
    print(format_table(pre_rows, f"\nprefill ({sc.prompt} tokens x {p.batch})"))
    print(format_table(dec_rows, f"\ndecode step (context {sc.prompt + sc.gen // 2})"))
    print()
    print(format_totals(p, effs, "totals"))
    if args.plot:
        print(f"roofline plot: {args.plot}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from strata.analysis.probe import DEFAULT_PATH, write_profile
    from strata.analysis.probe import run_probe as probe

    prof = probe(quick=args.quick, directory=args.dir, engine=not args.no_engine)
    path = write_profile(prof, args.out or DEFAULT_PATH)
    flash = prof.get("flash", {})
    print(f"memory {prof['bandwidth_by_threads_gbs']} GB/s by threads; GEMV/GEMM {json.dumps(prof['kernels'])}")
    print(f"disk {flash.get('by_read_kib', {})} GB/s by read KiB (direct I/O: {flash.get('direct_io')})"
          + (f"; {prof['disk_note']}" if prof.get("disk_note") else ""))
    if "strata_host" in prof:
        h = prof["strata_host"]
        print(f"Strata host costs: {h['overhead_us_per_call']} us per kernel call, {h['loop_us_per_expert_call']} us "
              f"per expert call of the Python loop ({h['prefill_loop_us_per_expert_call']} in a prompt)")
    print(f"wrote {path}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from strata.analysis.hardware import System, device_from_dict, load_catalog
    from strata.analysis.planner import RUNS_PATH, explain, load_runs, plan
    from strata.analysis.probe import DEFAULT_PATH
    from strata.analysis.shapes import load_shape
    from strata.analysis.trace import load_trace

    budget = parse_size(args.memory_budget, "memory_budget")
    path = args.profile or (str(DEFAULT_PATH) if DEFAULT_PATH.exists() else None)
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"--profile {path}: file not found (run `strata probe` first)")
        with open(path) as f:
            profile = json.load(f)
        dev = device_from_dict("probe", profile)
    else:
        dev, profile = load_catalog()["strata-dev"], {}
        print("no probe profile; using the catalog's strata-dev figures (run `strata probe`)", file=sys.stderr)
    dev = replace(dev, memory_gb=budget / 1e9 / 0.9)  # the budget, not the machine's RAM, bounds residency
    model = load_shape(args.model)
    trace = load_trace(args.routing_trace) if args.routing_trace else None
    runs = load_runs(args.runs or RUNS_PATH)
    cands = plan(model, System(dev), budget, profile, args.prompt, args.gen, trace, runs, args.model)
    if args.json:
        print(json.dumps({"best": cands[0].__dict__, "candidates": [c.__dict__ for c in cands[: args.top]]},
                         indent=1))
        return 0
    print(f"{'precision':<10}{'cache':>7}{'policy':>8}{'prefetch':>9}{'threads':>8}{'hit':>6}{'tok/s':>8}  fits")
    for c in cands[: args.top]:
        print(f"{c.precision:<10}{c.cache_frac:>7.0%}{c.policy:>8}{c.prefetch!s:>9}{c.threads:>8}"
              f"{c.hit_rate:>6.0%}{c.corrected_tok_s:>8.1f}  {'yes' if c.fits else 'no'} {c.why}")
    print()
    print(explain(cands, model, budget, bool(trace)))
    return 0
