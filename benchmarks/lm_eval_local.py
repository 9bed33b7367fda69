"""lm-evaluation-harness against `strata serve`: a local multiple-choice task scored by lm-eval's
`local-completions` model (HTTP, echo + logprobs, the remote tokenizer found through /tokenizer_info) and by
lm-eval's own `hf` backend (transformers) on the same model; per-choice loglikelihoods and accuracy compared.

    .venv/bin/pip install -e '.[eval]'
    .venv/bin/python benchmarks/lm_eval_local.py                       # the bundled model, float32
    .venv/bin/python benchmarks/lm_eval_local.py --model PATH --json docs/benchmarks/lm_eval_local.json

The task (40 items, no hub access): 24 additions with four numeric choices and 16 hand-written everyday
questions, written to a temporary folder as JSONL with a task YAML that lm-eval loads through `include_path`.
Both sides run in float32 so the comparison measures the serving path, not rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port, wait_healthy

TASK = "strata_local_mc"

EVERYDAY = [
    ("What do you use to cut paper?", ["scissors", "a spoon", "a pillow", "a cup"], 0),
    ("Where do fish live?", ["in trees", "in water", "in the sky", "in a desert"], 1),
    ("What color is grass?", ["blue", "red", "green", "purple"], 2),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], 3),
    ("Which animal says moo?", ["a cow", "a cat", "a dog", "a duck"], 0),
    ("What falls from clouds when it rains?", ["sand", "water", "leaves", "stones"], 1),
    ("What do you wear on your feet?", ["a hat", "gloves", "shoes", "a scarf"], 2),
    ("Which season is the coldest?", ["summer", "spring", "autumn", "winter"], 3),
    ("What do you drink when you are thirsty?", ["water", "bread", "salt", "rice"], 0),
    ("What shines in the sky during the day?", ["the moon", "the sun", "a lamp", "a star map"], 1),
    ("What do you sleep on?", ["a table", "a door", "a bed", "a window"], 2),
    ("Which one can fly?", ["a rock", "a fish", "a horse", "a bird"], 3),
    ("What do you read?", ["a book", "a fork", "a shoe", "a chair"], 0),
    ("How many legs does a dog have?", ["two", "four", "six", "eight"], 1),
    ("What is ice made of?", ["sugar", "glass", "frozen water", "paper"], 2),
    ("What do you use to open a locked door?", ["a spoon", "a feather", "a towel", "a key"], 3),
]


def items() -> list[dict]:
    out = []
    for i in range(24):
        a, b = 3 + (7 * i) % 40, 2 + (5 * i) % 30
        answer = a + b
        choices = [answer, answer + 1 + i % 3, answer - 2 - i % 2, answer + 10]
        k = i % 4  # rotate the answer's place
        choices = choices[1 : k + 1] + [answer] + choices[k + 1 :]
        out.append({"question": f"Question: What is {a} plus {b}?\nAnswer:", "choices": [f" {c}" for c in choices],
                    "answer": k})
    for q, choices, answer in EVERYDAY:
        out.append({"question": f"Question: {q}\nAnswer:", "choices": [f" {c}" for c in choices], "answer": answer})
    return out


def write_task(folder: Path) -> None:
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items()))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")


def start_server(model: str, port: int, num_threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "strata.cli", "serve", model, "--port", str(port), "--dtype", "float32",
           "--served-model-name", "strata-model", "--log-level", "warning"]
    if num_threads:
        cmd += ["--num-threads", str(num_threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    wait_healthy(f"http://127.0.0.1:{port}", proc)
    return proc


def _loglikelihoods(result: dict) -> dict[tuple[int, int], float]:
    """{(doc_id, choice): loglikelihood} from lm-eval's logged samples."""
    out = {}
    for s in result["samples"][TASK]:
        for j, resp in enumerate(s["resps"]):
            out[(s["doc_id"], j)] = float(resp[0][0])
    return out


def run(model: str, num_threads: int | None = None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp))
        tm = TaskManager(include_path=tmp)
        port = free_port()
        proc = start_server(model, port, num_threads)
        try:
            t0 = time.perf_counter()
            served = lm_eval.simple_evaluate(
                model="local-completions", tasks=[TASK], task_manager=tm, log_samples=True,
                model_args={"base_url": f"http://127.0.0.1:{port}/v1/completions", "model": "strata-model"})
            served_s = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(60)
        t0 = time.perf_counter()
        hf = lm_eval.simple_evaluate(model="hf", tasks=[TASK], task_manager=tm, log_samples=True,
                                     model_args={"pretrained": model, "dtype": "float32", "device": "cpu"})
        hf_s = time.perf_counter() - t0
    a, b = _loglikelihoods(served), _loglikelihoods(hf)
    assert a.keys() == b.keys(), "the two runs scored different requests"
    diff = max(abs(a[k] - b[k]) for k in a)
    return {"model": os.path.basename(os.path.normpath(model)), "num_items": len(items()),
            "num_loglikelihoods": len(a), "acc_strata": served["results"][TASK]["acc,none"],
            "acc_hf": hf["results"][TASK]["acc,none"], "max_abs_loglikelihood_diff": diff,
            "seconds_strata": round(served_s, 1), "seconds_hf": round(hf_s, 1)}


def main() -> int:
    from strata.engine.llm_engine import BUNDLED_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=BUNDLED_MODEL, help="HF model folder (default: the bundled model)")
    ap.add_argument("--num-threads", type=int, default=None, help="the server's torch threads")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    r = run(args.model, args.num_threads)
    print(f"| model | items | acc (strata serve) | acc (hf) | max abs loglikelihood diff |\n|---|---|---|---|---|\n"
          f"| {r['model']} | {r['num_items']} | {r['acc_strata']:.3f} | {r['acc_hf']:.3f} | "
          f"{r['max_abs_loglikelihood_diff']:.2e} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(r, f, indent=1)
        os.replace(tmp, args.json)
    return 0 if r["max_abs_loglikelihood_diff"] < 1e-3 and r["acc_strata"] == r["acc_hf"] else 1


if __name__ == "__main__":
    sys.exit(main())
