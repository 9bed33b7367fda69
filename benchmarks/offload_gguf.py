"""Headline benchmark: a quantized MoE GGUF larger than the memory it is given, Strata and llama.cpp on the same file.

    .venv/bin/python benchmarks/offload_gguf.py --rounds 2                  # builds the files once (~36 GB at peak)
    .venv/bin/python benchmarks/offload_gguf.py --clean                     # deletes them again

An OLMoE-1B-7B-shaped random checkpoint (benchmarks/synthetic.py: 16 layers, 64 experts of 2048 -> 1024 -> 2048,
top-8, vocabulary 50304, N(0, 0.02) bf16 weights) is made into GGUF by llama.cpp's own converter (bf16) and
quantizer (llama_model_quantize: Q4_K_M and Q4_0), benchmarks/peers/llamacpp.py. Then, per type and per limit
(25% and 50% of the GGUF file's size), each engine decodes inside its own cgroup-v1 memory group of that limit
(benchmarks/memlimit.py; page cache counts, so nothing outside the limit stays in RAM), files evicted first:

- llama.cpp (llama-cpp-python, 1 thread like Strata) mmaps the file; what does not fit comes back by page faults.
  Its CPU backend repacks Q4_K/Q4_0 weights into anonymous memory by default (a copy of the model, killed by the
  limit); the `llamacpp-norepack` row turns that off so the weights stay in the mapping;
- Strata opens the same file (`--model FILE.gguf`, converted once with its projections kept in the file's
  quantization, docs/gguf.md), its experts in the expert store read with O_DIRECT into a cache sized by
  `--memory-budget` = limit / --cgroup-slack. It replays real routing (the Mixtral-8x7B gsm8k trace mapped onto
  64 experts top-8, as benchmarks/offload.py) and, as a second row, routes with the model's own router, which is
  what llama.cpp does (same weights, same prompt): the same-routing ratio.

The disk's O_DIRECT rate for whole experts is probed in the same run before and after every row; a row's I/O bound
is the mean of its two probes over the bytes its process read from storage per decoded token (/proc/self/io).
Rounds alternate the engines, so the ratio of each round compares neighbouring runs. Results: JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import offload
from benchmarks.memlimit import unavailable_reason
from strata.layers.quant_native import cache_dir
from strata.models.registry import load_config

TYPES = ("q4_k_m", "q4_0")
ENGINES = {"strata, replayed routing": "strata", "strata, own routing": "strata-own", "llama.cpp mmap": "llamacpp",
           "llama.cpp mmap, no repack": "llamacpp-norepack"}
KV_CACHE_BYTES = 16 << 20  # 128 positions of this model: llama.cpp's context is the prompt + decode + 16
GIB = 2**30


WORK = {"dir": cache_dir() / "bench-gguf"}  # --work-dir


def work_dir() -> Path:
    return Path(WORK["dir"])


def build_files(model: str, layers: int | None, types: list[str]) -> dict[str, Path]:
    """The llama.cpp GGUFs of each type (cached); the HF checkpoint and the bf16 GGUF are deleted once quantized."""
    from benchmarks import synthetic
    from benchmarks.peers.llamacpp import quantize_gguf, to_gguf

    work = work_dir()
    name = f"{model}-{layers}l" if layers else model
    out = {t: work / f"{name}-{t}.gguf" for t in types}
    if all(p.exists() for p in out.values()):
        return out
    os.environ.setdefault("STRATA_PEERS_DIR", str(work / "peers"))  # the converter's tokenizer folder goes there
    synthetic.CACHE = work
    hf = synthetic.synthetic_model(model, layers)
    bf16 = to_gguf(hf, work / f"{name}-bf16.gguf", "bf16")
    for t, p in out.items():
        print(f"llama.cpp quantize -> {p}", file=sys.stderr)
        quantize_gguf(bf16, p, t, n_threads=os.cpu_count() or 1)
    shutil.rmtree(hf)
    bf16.unlink()
    return out


def strata_folder(gguf: Path) -> tuple[str, str]:
    """(the folder `--model FILE.gguf` loads, its expert store), both made once."""
    from strata.tiers.store_convert import ensure_store
    from strata.weights.gguf_cache import resolve_model_path

    folder = resolve_model_path(str(gguf))
    return folder, str(ensure_store(folder))


def _row(name: str, res: dict, **extra) -> dict:
    return {"engine": name, **extra, **res}


def run(args) -> dict:
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"memory cgroups needed: {reason}")
    from strata.layers import quant_native

    if quant_native.native_lib() is None:  # built once into the cache folder; children would run torch fallbacks
        raise SystemExit("Strata's native kernels did not build (see the warning above); rerun when they do")
    offload.CGROUP.update(on=True, slack=1.0)  # limits below are given as bytes: the cgroup gets exactly those
    trace = str(offload.TRACE.resolve()) if offload.TRACE.exists() else None
    if trace is None:
        raise SystemExit(f"routing trace not found: {offload.TRACE}")
    ggufs = build_files(args.model, args.layers, args.types.split(","))
    fracs = [float(f) for f in args.fractions.split(",")]
    rows: list[dict] = []
    load_start = os.getloadavg()
    files = {}
    for qtype, gguf in ggufs.items():
        folder, store = strata_folder(gguf)
        files[qtype] = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "strata_folder": folder,
                        "store": store, "store_bytes": sum(f.stat().st_size for f in Path(store).iterdir())}
    probes: list[float] = []

    def probe(store: str) -> float:
        offload.evict([Path(store)])
        probes.append(offload.disk_read_gbs(Path(store)))
        return probes[-1]


    for rnd in range(args.rounds):
        for qtype, f in files.items():
            gguf, folder, store = Path(f["gguf"]), f["strata_folder"], f["store"]  # full paths here, names in the JSON
            vocab = load_config(folder).vocab_size
            prompt = offload._prompt(vocab, args.prompt_len)
            for frac in fracs:
                limit = int(frac * f["gguf_bytes"])
                budget = int(limit / args.cgroup_slack)
                strata = (folder, budget, "nextuse", "none", args.prompt_len, args.decode, args.threads)
                runs = [("strata, replayed routing", "run_strata", (*strata, trace, KV_CACHE_BYTES)),
                        ("strata, own routing", "run_strata", (*strata, None, KV_CACHE_BYTES)),
                        ("llama.cpp mmap", "run_llamacpp", (str(gguf), prompt, args.peer_decode, args.threads,
                                                            budget)),
                        ("llama.cpp mmap, no repack", "run_llamacpp", (str(gguf), prompt, args.peer_decode,
                                                                       args.threads, budget, False))]
                runs = [r for r in runs if ENGINES[r[0]] in args.engines.split(",")]
                for name, fn, fargs in runs if rnd % 2 == 0 else runs[::-1]:
                    before = probe(store)
                    offload.evict([gguf, Path(folder), Path(store)])
                    res = offload._child(fn, *fargs, limit=limit, name=f"{qtype}-{frac}-{fn}", timeout=args.timeout)
                    after = probe(store)
                    row = _row(name, res, type=qtype, fraction=frac, round=rnd, limit_bytes=limit,
                               disk_o_direct_gb_s_row=(before + after) / 2, load_avg=os.getloadavg()[0])
                    per_tok = row.get("proc_read_bytes_per_token")
                    if per_tok and row.get("decode_tok_s"):
                        row["io_bound_tok_s"] = row["disk_o_direct_gb_s_row"] * 1e9 / per_tok
                        row["fraction_of_io_bound"] = row["decode_tok_s"] / row["io_bound_tok_s"]
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "disk_o_direct_gb_s_probes": probes, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
               "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cgroup_slack": args.cgroup_slack}
    try:
        import llama_cpp

        machine["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    names = {q: {k: Path(v).name if isinstance(v, str) else v for k, v in f.items()} for q, f in files.items()}
    setup = {"model": f"{args.model}" + (f"-{args.layers}l" if args.layers else ""), "files": names,
             "trace": Path(trace).name, "prompt_len": args.prompt_len, "decode_tokens": args.decode,
             "peer_decode_tokens": args.peer_decode,
             "strata_budget": "limit / cgroup_slack", "policy": "nextuse", "prefetch": "none",
             "strata_kv_cache_bytes": KV_CACHE_BYTES}
    return {"machine": machine, "setup": setup, "rows": rows}


def merge(paths: list[str]) -> dict:
    """Runs made one after another (e.g. one type at a time) as one result; rounds renumbered per run."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = [dict(r, round=i * 100 + r["round"], run=i) for i, part in enumerate(parts) for r in part["rows"]]
    machine = dict(parts[0]["machine"], runs=[p["machine"] for p in parts],
                   disk_o_direct_gb_s_probes=[x for p in parts for x in p["machine"]["disk_o_direct_gb_s_probes"]],
                   load_avg_start=parts[0]["machine"]["load_avg_start"], load_avg_end=parts[-1]["machine"]["load_avg_end"])
    setup = dict(parts[0]["setup"], files={k: v for p in parts for k, v in p["setup"]["files"].items()})
    return {"machine": machine, "setup": setup, "rows": rows}


def summarize(result: dict) -> list[dict]:
    """Per (type, limit, engine): median tok/s, spread, bytes/token, bound; ratios per round against llama.cpp."""
    rows = result["rows"]
    out = []
    keys = sorted({(r["type"], r["fraction"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for qtype, frac in keys:
        sel = [r for r in rows if r["type"] == qtype and r["fraction"] == frac]
        peers = {e: {r["round"]: r.get("decode_tok_s") for r in sel if r["engine"] == e}
                 for e in ENGINES if e.startswith("llama.cpp")}
        for engine in dict.fromkeys(r["engine"] for r in sel):
            mine = [r for r in sel if r["engine"] == engine]
            ok = [r for r in mine if r.get("decode_tok_s")]
            s = {"type": qtype, "fraction": frac, "engine": engine, "runs": len(mine),
                 "errors": [r["error"] for r in mine if r.get("error")]}
            if ok:
                tok = [r["decode_tok_s"] for r in ok]
                s.update(decode_tok_s=statistics.median(tok), decode_tok_s_all=tok,
                         mb_read_per_token=statistics.median(r["proc_read_bytes_per_token"] / 1e6 for r in ok),
                         io_bound_tok_s=statistics.median(r["io_bound_tok_s"] for r in ok if "io_bound_tok_s" in r),
                         fraction_of_io_bound=statistics.median(r["fraction_of_io_bound"] for r in ok
                                                                if "fraction_of_io_bound" in r),
                         peak_rss_gib=max(r["peak_rss_bytes"] for r in ok) / GIB,
                         cgroup_max_gib=max(r.get("cgroup_max_usage_bytes") or 0 for r in ok) / GIB,
                         limit_gib=ok[0]["limit_bytes"] / GIB, budget_gib=(ok[0].get("budget_bytes") or 0) / GIB,
                         hit_rate=statistics.median(r["expert_hit_rate"] for r in ok) if "expert_hit_rate" in ok[0]
                         else None)
                if not engine.startswith("llama.cpp"):  # against each llama.cpp row that decoded: medians, and
                    for peer_name, peer in peers.items():  # per round where both ran in the same round
                        done = [v for v in peer.values() if v]
                        if done:
                            s.setdefault("vs", {})[peer_name] = {
                                "median": s["decode_tok_s"] / statistics.median(done),
                                "rounds": [r["decode_tok_s"] / peer[r["round"]] for r in ok if peer.get(r["round"])]}
            out.append(s)
    return out


def print_table(result: dict, summary: list[dict]) -> None:
    m, st = result["machine"], result["setup"]
    print(f"\n{st['model']}; disk O_DIRECT probes {min(m['disk_o_direct_gb_s_probes']):.2f}-"
          f"{max(m['disk_o_direct_gb_s_probes']):.2f} GB/s; {m['threads']} thread(s); load avg "
          f"{m['load_avg_start'][0]:.1f} -> {m['load_avg_end'][0]:.1f}\n")
    print("| file | limit | engine | decode tok/s (runs) | vs llama.cpp | hit rate | MB read/token | I/O-bound tok/s "
          "| of bound | peak RSS / budget | cgroup max / limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        gguf = st["files"][s["type"]]["gguf_bytes"] / GIB
        head = f"| {s['type'].upper()} ({gguf:.2f} GiB) | {s['fraction']:.0%} | {s['engine']} |"
        if "decode_tok_s" not in s:
            print(f"{head} error: {'; '.join(s['errors'])[:200]} | | | | | | | |")
            continue
        runs = ", ".join(f"{t:.2f}" for t in s["decode_tok_s_all"])
        ratio = "; ".join(f"**{v['median']:.1f}x** {k.removeprefix('llama.cpp mmap')[2:] or 'default'}"
                          for k, v in s.get("vs", {}).items()) or "-"
        hit = f"{s['hit_rate']:.2f}" if s.get("hit_rate") is not None else "-"
        budget = f" / {s['budget_gib']:.2f}" if not s["engine"].startswith("llama.cpp") else ""
        print(f"{head} {s['decode_tok_s']:.2f} ({runs}) | {ratio} | {hit} | {s['mb_read_per_token']:.0f} | "
              f"{s['io_bound_tok_s']:.2f} | {s['fraction_of_io_bound']:.0%} | {s['peak_rss_gib']:.2f}{budget} GiB | "
              f"{s['cgroup_max_gib']:.2f} / {s['limit_gib']:.2f} GiB |")


def clean() -> None:
    """Deletes the benchmark's files: the GGUFs and what Strata converted from them."""
    from strata.tiers.store_convert import default_store_dir
    from strata.weights.gguf_cache import cache_root

    work = work_dir()
    for gguf in sorted(work.glob("*.gguf")):
        stem = gguf.name.removesuffix(".gguf")
        for folder in cache_root().glob(f"{stem}-*"):
            shutil.rmtree(default_store_dir(folder), ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
            print(f"deleted {folder} and its expert store")
    shutil.rmtree(work, ignore_errors=True)
    print(f"deleted {work}")


def main() -> None:
    from strata.fileio import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="olmoe-1b-7b", help="a preset of benchmarks/synthetic.py")
    ap.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    ap.add_argument("--types", default=",".join(TYPES), help="llama.cpp quantization types")
    ap.add_argument("--fractions", default="0.25,0.5", help="memory limits as fractions of the GGUF file")
    ap.add_argument("--cgroup-slack", type=float, default=1.1, help="Strata's --memory-budget = limit / this")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--engines", default=",".join(ENGINES.values()), help="rows to run, of " + ", ".join(ENGINES.values()))
    ap.add_argument("--peer-decode", type=int, default=8, help="decode tokens for llama.cpp (slow under the limit)")
    ap.add_argument("--threads", type=int, default=1, help="1 on a shared 2-core machine (no spin-wait)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine run")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "offload_gguf.json"))
    ap.add_argument("--work-dir", default=str(work_dir()), help="where the checkpoint and GGUFs are made")
    ap.add_argument("--clean", action="store_true", help="delete the benchmark's files and exit")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier runs' JSON files into --out")
    args = ap.parse_args()
    WORK["dir"] = args.work_dir
    if args.clean:
        clean()
        return
    result = merge(args.merge) if args.merge else run(args)
    result["summary"] = summarize(result)
    write_json_atomic(args.out, result)
    print_table(result, result["summary"])


if __name__ == "__main__":
    main()
