"""One check of bertcls on a CUDA machine, in one call of about 7 minutes; on a CPU it runs its CPU parts.

    PYTHONUNBUFFERED=1 python scripts/gpu_check.py                           # logs to $OUT, else ./gpu-check/
    python scripts/gpu_check.py --hf_baseline ../shared/bench/hf_trainer_baseline.py --budget_s 360

1. the machine; why compiling a whole model loses the fused attention (the aten ops its compiled graph holds, with
   attention dropout 0.1 and 0)
2. a random model of BERT-base's shape (scripts/make_tiny.py: 12 layers, hidden 768, vocab 32000) and 2,400 synthetic
   articles that all fill 512 tokens, split by prepare.py
3. scripts/bench.py at 512 tokens, bf16: eager and compiled layers at batch 32 and 128; for each examples/s, MFU of
   the measured bf16 matmul peak, memory, the share of GPU time in fused attention kernels against softmax kernels,
   and for compiled ones the compile seconds of one step per length (cold, then warm from the compiler's disk cache)
4. bertcls.py end to end (2 epochs of 1,920 articles, evaluation included) against the HF Trainer with --bf16 on the
   same data and model, as a ratio; and whether compiling pays on a livedoor-sized run (5,895 x 20 epochs)
5. tests/test_cuda.py (after the end-to-end parts; batch 128 and the warm compile come last)
Parts run in order of need and are cut short to keep to --budget_s; the summary comes last, also in summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
BERT_BASE = ["--layers", "12", "--hidden", "768", "--heads", "12", "--vocab_size", "32000"]
BENCH = ["--max_seq_len", "512", "--dtype", "bf16", "--steps", "20", "--warmup", "3", "--profile_steps", "3"]
LIVEDOOR_EXAMPLES = 5895 * 20  # a default bertcls.py run on livedoor: train examples x epochs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.environ.get("OUT") or "gpu-check", help="logs and summary.json")
    p.add_argument("--hf_baseline", default=str(REPO.parent / "shared/bench/hf_trainer_baseline.py"),
                   help="the HF Trainer anchor script (default: ../shared/bench/hf_trainer_baseline.py)")
    p.add_argument("--budget_s", type=float, default=400, help="seconds after which no part starts (default: 400)")
    return p.parse_args(argv)


def run(name: str, command: list[str], out_dir: Path, timeout: float) -> tuple[int | None, str, float]:
    """A part in its own process (and process group, killed on timeout); its output goes to <out_dir>/<name>.log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, rc = process.communicate(timeout=max(1, timeout))[0], process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            output, rc = process.communicate()[0], None
    (out_dir / f"{name}.log").write_text(output)
    return rc, output, time.monotonic() - start


def last_json(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        try:
            return json.loads(line) if line.startswith("{") else {}
        except json.JSONDecodeError:
            continue
    return {}


def attention_probe() -> dict[str, list[str]]:
    """The attention ops in the graph torch.compile traces of a whole BERT training step (bf16 autocast), per
    attention dropout: a fused SDPA op, or the math fallback (softmax between matmuls)."""
    import torch
    from torch._functorch.aot_autograd import aot_module_simplified
    from transformers import BertConfig, BertForSequenceClassification
    found = {}
    for dropout in (0.1, 0.0):
        ops: set[str] = set()

        def record(gm: Any, inputs: Any) -> Any:
            def graph(g: Any, _: Any) -> Any:
                ops.update(str(n.target) for n in g.graph.nodes if n.op == "call_function"
                           and any(k in str(n.target) for k in ("attention", "softmax")))
                return g
            return aot_module_simplified(gm, inputs, fw_compiler=graph, bw_compiler=graph)

        torch._dynamo.reset()
        config = BertConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=2, intermediate_size=3072,
                            attention_probs_dropout_prob=dropout, attn_implementation="sdpa")
        model = BertForSequenceClassification(config).cuda().train()
        compiled = torch.compile(model, backend=record, dynamic=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            compiled(input_ids=torch.randint(0, 1000, (8, 512), device="cuda")).logits.float().sum().backward()
        found[f"attention dropout {dropout}"] = sorted(ops)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    start = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    summary: dict[str, Any] = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if cuda
                                           else None}}
    import transformers
    summary["machine"]["transformers"] = transformers.__version__
    print(f"== machine: {json.dumps(summary['machine'])}", flush=True)
    left = lambda: args.budget_s - (time.monotonic() - start)  # noqa: E731
    skipped = []
    if cuda:
        try:
            summary["attention_probe"] = attention_probe()
        except Exception as e:  # a diagnosis: never lose the rest over it
            summary["attention_probe"] = f"failed: {type(e).__name__}: {e}"[:300]
        print(f"== whole-model compile, attention ops traced: {summary['attention_probe']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bertcls-gpu-check-") as tmp:
        work = Path(tmp)
        shape = BERT_BASE if cuda else []
        corpus = ["--per_category", "800", "--min_sentences", "24", "--max_sentences", "32"] if cuda else \
            ["--per_category", "40", "--min_sentences", "3", "--max_sentences", "6"]
        for name, command in [("make_tiny", [sys.executable, "scripts/make_tiny.py", "--model_dir", str(work / "model"),
                                             "--data", str(work / "long.jsonl"), *shape, *corpus]),
                              ("prepare", [sys.executable, "prepare.py", "--input", str(work / "long.jsonl"),
                                           "--text_fields", "title,body", "--label_field", "category",
                                           "--output_dir", str(work / "dataset")])]:
            rc, output, _ = run(name, command, out_dir, 120)
            if rc != 0:
                print(f"{name} failed:\n{output[-2000:]}")
                return 1
        base = ["--model_name", str(work / "model"), "--dataset_dir", str(work / "dataset"),
                "--cache_dir", str(work / "cache"), "--output_dir", str(work / "outputs")]
        settings = [("eager b32", ["--batch_size", "32"], 60),
                    ("compiled b32", ["--compile", "--batch_size", "32", "--bucket_lengths", "128", "512"], 150),
                    ("end to end", [], 90), ("HF Trainer bf16", [], 90), ("end to end compiled", ["--compile"], 120),
                    ("tests", [], 150), ("eager b128", ["--batch_size", "128"], 60),
                    ("compiled b128", ["--compile", "--batch_size", "128"], 120),
                    ("compile warm", ["--compile", "--batch_size", "32", "--bucket_lengths", "128", "512", "--steps",
                                      "1", "--warmup", "0", "--profile_steps", "0"], 60)] if cuda else \
            [("eager cpu", ["--max_seq_len", "64", "--batch_size", "8", "--steps", "3", "--warmup", "1"], 120)]
        rows = []
        for name, flags, needs in settings:
            if left() < needs and rows:
                skipped.append(f"{name} (needs ~{needs} s, {left():.0f} s left)")
                continue
            if name.startswith("end to end"):
                command = [sys.executable, "bertcls.py", *base, "--epochs", "2", "--batch_size", "32", "--lr", "5e-5",
                           "--num_warmup_epochs", "0.2", "--output_dir", str(work / name.replace(" ", "-")), *flags]
            elif name == "tests":
                command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"]
            elif name == "HF Trainer bf16":
                if not Path(args.hf_baseline).is_file():
                    skipped.append(f"{name} (no {args.hf_baseline})")
                    continue
                command = [sys.executable, args.hf_baseline, "--model_name", str(work / "model"), "--dataset_dir",
                           str(work / "dataset"), "--epochs", "2", "--batch_size", "32", "--max_seq_len", "512",
                           "--bf16", "--lr", "5e-5"]
            else:
                command = [sys.executable, "scripts/bench.py", *base, *(BENCH if cuda else []), *flags]
            rc, output, seconds = run(name.replace(" ", "-"), command, out_dir, min(needs * 2, max(left(), needs)))
            row = {"name": name, "rc": rc, "process_s": round(seconds, 1), **last_json(output)}
            if name == "tests":
                summary["test_cuda"] = output.strip().splitlines()[-1] if output.strip() else f"exit {rc}"
                print(f"== tests/test_cuda.py ({seconds:.0f} s):\n{output[-3000:]}", flush=True)
                continue
            if name.startswith("end to end") and rc == 0:
                run_dir = next((work / name.replace(" ", "-")).rglob("test-metrics.json")).parent
                val, config = (json.loads((run_dir / f).read_text()) for f in ("val-metrics.json", "config.json"))
                row.update(examples_per_s=round(2 * config["examples"]["train"] / val["train_seconds"], 1),
                           compile=config["args"]["compile"], train_seconds=val["train_seconds"])
            if name == "HF Trainer bf16" and rc == 0:
                row["examples_per_s"] = row.get("train_loop_examples_per_s")
            rows.append(row)
            print(f"== {name}: exit {rc} in {seconds:.0f} s: " + json.dumps({k: row.get(k) for k in (
                "examples_per_s", "mfu", "peak_mem_mb", "fused_attention_share", "softmax_share", "gpu_idle_fraction",
                "warmup_s", "compile_s_by_length", "compile")}), flush=True)
            if rc != 0:
                print(output[-2500:], flush=True)
        summary["rows"] = rows
    by = {r["name"]: r for r in rows}
    if "end to end" in by and "HF Trainer bf16" in by and by["HF Trainer bf16"].get("examples_per_s"):
        hf = by["HF Trainer bf16"]["examples_per_s"]
        summary["end_to_end_vs_hf"] = {n: round(by[n]["examples_per_s"] / hf, 3)
                                       for n in ("end to end", "end to end compiled")
                                       if by.get(n, {}).get("examples_per_s")}
    eager, compiled = by.get("eager b32", {}), by.get("compiled b32", {})
    if eager.get("examples_per_s") and compiled.get("examples_per_s"):
        compile_s = sum(compiled.get("compile_s_by_length", {}).values())
        summary["livedoor_projection_s"] = {"eager": round(LIVEDOOR_EXAMPLES / eager["examples_per_s"]),
                                            "compiled": round(compile_s + LIVEDOOR_EXAMPLES
                                                              / compiled["examples_per_s"])}
    if not cuda:
        skipped.append("without CUDA: tests/test_cuda.py, the attention probe, BERT-base's shape at 512 tokens eager "
                       "and compiled at batch 32 and 128, compile seconds, bertcls.py against the HF Trainer")
    summary.update(skipped=skipped, seconds=round(time.monotonic() - start))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("== summary\n" + json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    for r in rows:
        print(f"{r['name']:<16} exit {r['rc']}  {r.get('examples_per_s')} ex/s  MFU {r.get('mfu')}  mem "
              f"{r.get('peak_mem_mb')} MB  fused attention {r.get('fused_attention_share')}  softmax "
              f"{r.get('softmax_share')}  GPU idle {r.get('gpu_idle_fraction')}  warm-up {r.get('warmup_s')} s  "
              f"compile {r.get('compile_s_by_length')}  process {r['process_s']} s")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
