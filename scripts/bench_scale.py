"""bertcls on a dataset 100x livedoor (about 737k articles), end to end: time and memory of each stage.

    python scripts/bench_scale.py                                   # full scale (see the README for how long)
    python scripts/bench_scale.py --copies 3 --ratio_examples 4000  # a first look in a few minutes

Builds under --work_dir (full scale: about 11 GB of disk) the livedoor articles (--corpus: the tarball, or a JSONL
with id, category, title, body) repeated --copies times, each copy with a distinct id and light edits (a body line
dropped, a marker line added), and the same with one copy; prepare.py's dataset of each; a MeCab tokenizer
(BertJapaneseTokenizer, unidic-lite, a WordPiece vocabulary of the corpus's words, as cl-tohoku/bert-base-japanese-v3)
and a tiny random BERT with a cheap one (BertTokenizer over the corpus's characters). Measures, and prints as a
Markdown table and then one JSON line:
  1. prepare.py: wall time and peak resident memory (its ru_maxrss)
  2. data.tokenize_split with the MeCab tokenizer on the first --ratio_examples training examples, in this process
     and with --tokenize_workers processes (their start from a fork server included, as bertcls.py pays it): times
     and their ratio (MeCab runs about 300 articles/s per core: the whole corpus would take 40 minutes per core)
  3. bertcls.py up to its first optimizer step with the tiny BERT (memory does not depend on the tokenizer), for
     both sizes: alone with a cold cache (train's tokenization time, the cache's size), alone with the warm cache,
     and under torchrun with 2 CPU processes and a cold cache (rank 0 tokenizes while rank 1 waits). For each rank:
     peak RSS (VmHWM) and, at the first step, private memory (RssAnon) and the resident pages of the mapped cache
     (shared by the processes of a node). Linux only: the figures come from /proc.
Figures depend on the machine and on what else runs on it: quote them with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import make_tiny  # noqa: E402
from common import Progress, UserError, iter_jsonl, jsonl_line, log, positive_int, run_cli  # noqa: E402

SHARED_CORPUS = REPO.parent / "shared" / "data" / "livedoor" / "ldcc-20140209.tar.gz"
DOWNLOADED_CORPUS = REPO / "data" / "ldcc-20140209.tar.gz"  # where prepare.py downloads it
MIB = 2**20
BERTCLS_RUNS = {"alone_cold": ("bertcls.py alone, cold cache", "alone", 1),  # what, which cache, processes
                "alone_warm": ("bertcls.py alone, warm cache", "alone", 1),
                "torchrun_cold": ("torchrun 2 processes, cold cache", "torchrun", 2)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    import bertcls
    import data
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHARED_CORPUS if SHARED_CORPUS.is_file() else DOWNLOADED_CORPUS),
                   help="livedoor tarball, or a JSONL of id, category, title, body (default: %(default)s)")
    p.add_argument("--copies", type=positive_int, default=100,
                   help="copies of each article in the large corpus (default: %(default)s, about 737k articles)")
    p.add_argument("--ratio_examples", type=positive_int, default=20000,
                   help="training examples tokenized with MeCab for the 1-vs-workers ratio (default: %(default)s)")
    p.add_argument("--tokenize_workers", type=positive_int, default=bertcls.parse_args([]).tokenize_workers,
                   help="worker processes, compared with 1 (default: bertcls.py's, here %(default)s)")
    p.add_argument("--max_seq_len", type=positive_int, default=512, help="(default: %(default)s)")
    p.add_argument("--work_dir", default=".cache/bench_scale", help="(default: %(default)s)")
    args = p.parse_args(argv)
    if args.tokenize_workers < 2:
        p.error("--tokenize_workers must be 2 or more: it is compared with 1")
    if args.ratio_examples < data.POOL_MIN_EXAMPLES:
        p.error(f"--ratio_examples must be at least {data.POOL_MIN_EXAMPLES}: bertcls starts no workers for fewer")
    return args


def source_articles(corpus: Path, work: Path) -> list[dict]:
    """id, category, title, body of each article of the livedoor tarball (read by prepare.py, run as users run it),
    or of a JSONL of such rows."""
    if corpus.suffix != ".jsonl":
        run_measured([sys.executable, str(REPO / "prepare.py"), "--input", str(corpus), "--output_dir",
                      str(work / "livedoor")], work / "prepare-livedoor.log")
        corpus = work / "livedoor" / "all.jsonl"
    return [{k: r[k] for k in ("id", "category", "title", "body")} for *_, r in iter_jsonl(corpus)]


def edited(article: dict, copy: int, rng: random.Random) -> dict:
    """Copy `copy` of an article: a distinct id, one body line dropped (when it has 3+), a marker line added."""
    if copy == 0:
        return article
    lines = article["body"].split("\n")
    if len(lines) >= 3:
        del lines[rng.randrange(len(lines))]
    lines.insert(rng.randrange(len(lines) + 1), f"（写し{copy}）")
    return {"id": f"{article['id']}-{copy}", "category": article["category"], "title": article["title"],
            "body": "\n".join(lines)}


def write_corpus(articles: list[dict], copies: int, path: Path) -> int:
    rng = random.Random(copies)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for copy in range(copies):
            f.writelines(jsonl_line(edited(a, copy, rng)) for a in articles)
    return copies * len(articles)


def mecab_tokenizer(directory: Path, articles: list[dict], vocab_size: int = 32768) -> Any:
    """BertJapaneseTokenizer (MeCab + unidic-lite, WordPiece) with the corpus's most frequent words, like v3's."""
    from transformers import BertJapaneseTokenizer
    from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer
    mecab = MecabTokenizer(mecab_dic="unidic_lite")
    sample = [t for a in articles[:3000] for t in (a["title"], a["body"])]
    words = Counter(w for text in sample for w in mecab.tokenize(text))
    chars = sorted({c for text in sample for c in text if not c.isspace()})
    budget = max(0, vocab_size - len(make_tiny.SPECIAL_TOKENS) - 2 * len(chars))
    vocab = list(dict.fromkeys([*make_tiny.SPECIAL_TOKENS, *(w for w, _ in words.most_common(budget)), *chars,
                                *("##" + c for c in chars)]))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertJapaneseTokenizer(str(directory / "vocab.txt"), word_tokenizer_type="mecab",
                                 mecab_kwargs={"mecab_dic": "unidic_lite"}, model_max_length=512)


def run_measured(command: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run a command; its wall time and peak resident memory (the child's ru_maxrss). Output goes to log_path."""
    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = code = os.waitstatus_to_exitcode(status)  # waited for here (for its rusage), not by Popen
    if code:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise UserError(f"{' '.join(command[1:3])} ... failed (exit {code}; log {log_path}):\n" + "\n".join(tail))
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def tokenization_ratio(tokenizer: Any, dataset: Path, n: int, workers: int, max_len: int, work: Path) -> dict:
    """Seconds of data.tokenize_split on the first n training examples in this process and with `workers`
    processes (their start from the fork server included: bertcls.py pays it once per split it tokenizes)."""
    import data
    train = data.load_dataset(dataset, lambda message: None)[1]["train"]
    if (n := min(n, len(train.labels))) < data.POOL_MIN_EXAMPLES:
        raise UserError(f"{dataset}: {n} training examples are fewer than the {data.POOL_MIN_EXAMPLES} that bertcls "
                        "gives to worker processes: use a larger corpus")
    subset = train._replace(labels=train.labels[:n], starts=train.starts[:n + 1])
    seconds = {}
    for processes in (1, workers):
        with tempfile.TemporaryDirectory(dir=work) as tmp, \
                Progress(n, f"tokenizing {n} examples, {processes} process(es)") as progress:
            started = time.perf_counter()
            data.tokenize_split(subset, tokenizer, data.InputSpec(max_len, True), processes, Path(tmp), progress)
            seconds[processes] = time.perf_counter() - started
    return {"examples": n, "workers": workers, "seconds_1": round(seconds[1], 2),
            "seconds_workers": round(seconds[workers], 2), "speedup": round(seconds[1] / seconds[workers], 2)}


def memory_status(cache_dir: Path) -> dict:
    """This process's peak resident memory (VmHWM), its private memory (RssAnon), and the resident pages of the
    tokenization cache it maps (from /proc/self/smaps: shared with every process that maps the same file)."""
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M))
    cache_kib, in_cache = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header: address perms offset dev inode path
            in_cache = line.split()[-1].startswith(f"{cache_dir}{os.sep}")
        elif in_cache and line.startswith("Rss:"):
            cache_kib += int(line.split()[1])
    return {"peak_rss_mib": round(int(fields["VmHWM"]) / 1024, 1),
            "rss_anon_mib": round(int(fields["RssAnon"]) / 1024, 1), "cache_rss_mib": round(cache_kib / 1024, 1)}


def probe(out_dir: str, bertcls_args: list[str]) -> int:
    """bertcls.py, stopped at its first optimizer step after writing this rank's memory figures to out_dir."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import bertcls
    cache_dir = Path(bertcls.parse_args(bertcls_args).cache_dir).resolve()

    def first_step(*_: Any) -> None:
        Path(out_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(memory_status(cache_dir)))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its figures
        sys.stderr.flush()
        os._exit(0)

    with register_optimizer_step_post_hook(first_step):  # after the step of any optimizer
        return bertcls.main(bertcls_args)


def bertcls_run(name: str, work: Path, model: Path, dataset: Path, cache: Path, args: argparse.Namespace,
                processes: int = 1) -> dict:
    """One bertcls.py run up to its first optimizer step: each rank's memory figures, the seconds it took to
    tokenize train (None: the cache held it) and the size of the cache."""
    out_dir = work / "probes" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    flags = ["--model_name", str(model), "--dataset_dir", str(dataset), "--output_dir", str(work / "outputs"),
             "--cache_dir", str(cache), "--epochs", "1", "--batch_size", "16", "--max_seq_len", str(args.max_seq_len),
             "--device", "cpu", "--dtype", "fp32", "--tokenize_workers", str(args.tokenize_workers)]
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"  # what torchrun sets anyway, said here so that it does not warn
    log_path = work / "probes" / f"{name}.log"
    script = [str(Path(__file__).resolve()), "--probe", str(out_dir), "--"]
    result = run_measured([*launcher, *script, *flags], log_path, env)
    tokenized = re.search(r"tokenized train: \d+ examples in ([0-9.]+)s", log_path.read_text(errors="replace"))
    return {"seconds": result["seconds"], "tokenize_train_s": float(tokenized[1]) if tokenized else None,
            "cache_mib": round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / MIB, 1),
            "ranks": [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(processes)]}


def table(report: dict) -> str:
    sizes = [report[f"x{c}"] for c in report["copies"]]
    lines = ["| | " + " | ".join(f"x{c} ({r['examples']} articles)" for c, r in zip(report["copies"], sizes)) + " |",
             "|---|" + "---|" * len(sizes)]

    def row(label: str, value: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(map(value, sizes)) + " |")

    row("prepare.py: time / peak RSS", lambda r: f"{r['prepare']['seconds']} s / {r['prepare']['peak_rss_mib']} MiB")
    row(f"tokenization of train, cheap tokenizer, --tokenize_workers {report['tokenize_workers']}",
        lambda r: f"{r['alone_cold']['tokenize_train_s']} s")
    row("cache on disk", lambda r: f"{r['alone_cold']['cache_mib']} MiB")
    for key, (label, *_) in BERTCLS_RUNS.items():
        row(f"{label}: peak RSS (private / cache pages at step 1), MiB", lambda r, key=key: ", ".join(
            f"{m['peak_rss_mib']} ({m['rss_anon_mib']} / {m['cache_rss_mib']})" for m in r[key]["ranks"]))
    ratio = report["tokenization_ratio"]
    lines.append(f"\nMeCab tokenization of {ratio['examples']} examples: {ratio['seconds_1']} s in 1 process, "
                 f"{ratio['seconds_workers']} s with {ratio['workers']} worker processes (their start included): "
                 f"{ratio['speedup']}x")
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> int:
    work, started = Path(args.work_dir).resolve(), time.perf_counter()

    def say(message: str) -> None:
        log(f"[{time.perf_counter() - started:7.1f} s] {message}")

    articles = source_articles(Path(args.corpus), work)
    copies = sorted({1, args.copies})
    report: dict[str, Any] = {"copies": copies, "cpus": os.cpu_count(), "corpus": args.corpus,
                              "max_seq_len": args.max_seq_len, "tokenize_workers": args.tokenize_workers}
    for c in copies:
        corpus = work / f"corpus-x{c}.jsonl"
        report[f"x{c}"] = {"examples": write_corpus(articles, c, corpus), "corpus_mib": round(
            corpus.stat().st_size / MIB, 1)}
        report[f"x{c}"]["prepare"] = run_measured(
            [sys.executable, str(REPO / "prepare.py"), "--input", str(corpus), "--text_fields", "title,body",
             "--label_field", "category", "--output_dir", str(work / f"dataset-x{c}")], work / f"prepare-x{c}.log")
        say(f"x{c}: {report[f'x{c}']['examples']} articles, prepare.py {report[f'x{c}']['prepare']}")
    tokenizer = mecab_tokenizer(work / "mecab-tokenizer", articles)
    report["tokenization_ratio"] = tokenization_ratio(tokenizer, work / f"dataset-x{copies[-1]}", args.ratio_examples,
                                                      args.tokenize_workers, args.max_seq_len, work)
    say(f"MeCab tokenization: {report['tokenization_ratio']}")
    # make_tiny.py's random 2-layer BERT, with a WordPiece vocabulary of the corpus's characters
    model, texts = work / "char-bert", [t for a in articles[:3000] for t in (a["title"], a["body"])]
    make_tiny.build_model(model, make_tiny.wordpiece_vocab(texts, 0), make_tiny.parse_args([]))
    for c in copies:
        for name, (_, cache, processes) in BERTCLS_RUNS.items():
            if name.endswith("cold"):
                shutil.rmtree(work / f"cache-x{c}-{cache}", ignore_errors=True)
            report[f"x{c}"][name] = bertcls_run(f"x{c}-{name}", work, model, work / f"dataset-x{c}",
                                                work / f"cache-x{c}-{cache}", args, processes)
            say(f"bertcls.py x{c} {name}: {report[f'x{c}'][name]}")
    print(table(report))
    print(json.dumps(report), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--probe"]:  # internal: bench_scale.py --probe OUT_DIR -- <bertcls.py flags>
        return probe(argv[1], argv[3:])
    args = parse_args(argv)
    return run_cli("bench_scale.py", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
