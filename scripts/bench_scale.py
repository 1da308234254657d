"""bertcls on a dataset 100x livedoor (about 737k articles), end to end: time and memory of each stage.

    python scripts/bench_scale.py                                   # full scale (see the README for how long)
    python scripts/bench_scale.py --copies 3 --ratio_examples 4000  # a first look in a few minutes

What it builds, under --work_dir (full scale: about 11 GB of disk):
  corpus     the livedoor articles (--corpus: the tarball, or a JSONL with id, category, title, body) repeated
             --copies times, each copy with a distinct id and light edits (a body line dropped, a marker line
             added), as one JSONL; and the same with one copy, to compare against
  datasets   prepare.py's output for each
  tokenizers a MeCab one (BertJapaneseTokenizer, unidic-lite, a WordPiece vocabulary of the corpus's words, as
             cl-tohoku/bert-base-japanese-v3) and a cheap one (BertTokenizer over the corpus's characters, no MeCab)

What it measures and prints (a Markdown table, then one JSON line):
  1. prepare.py: wall time and peak resident memory (its ru_maxrss)
  2. tokenization with the MeCab tokenizer of the first --ratio_examples training examples, with 1 process and
     with --tokenize_workers (their start included): times and their ratio, and apart, the one-time start of
     the fork server the workers come from (MeCab runs about 300 articles/s per core, so the whole corpus would
     take about 40 minutes per core: the ratio is measured on a subset)
  3. bertcls.py up to its first optimizer step on a tiny random BERT with the cheap tokenizer (the memory
     figures do not depend on the tokenizer, and it tokenizes the whole corpus in minutes), for both corpus
     sizes: alone with a cold cache (tokenization time with every worker, cache size on disk), alone with
     the warm cache, and under torchrun with 2 CPU processes (gloo) and a cold cache (rank 0 tokenizes with its
     workers while rank 1 waits). For each: peak RSS (VmHWM) and, at the first step, private memory
     (RssAnon) and the resident pages of the mapped cache (shared by the processes of a node). Linux only: the
     figures come from /proc.

Figures depend on the machine and on what else runs on it: quote them with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from common import jsonl_line, positive_int, read_jsonl, run_cli  # noqa: E402

SHARED_CORPUS = REPO.parent / "shared" / "data" / "livedoor" / "ldcc-20140209.tar.gz"
DOWNLOADED_CORPUS = REPO / "data" / "ldcc-20140209.tar.gz"  # where prepare.py downloads it
MIB = 2**20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    import data
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHARED_CORPUS if SHARED_CORPUS.is_file() else DOWNLOADED_CORPUS),
                   help="livedoor tarball, or a JSONL of articles with id, category, title, body "
                        "(default: %(default)s)")
    p.add_argument("--copies", type=positive_int, default=100,
                   help="copies of each article in the large corpus (default: %(default)s, about 737k articles)")
    p.add_argument("--ratio_examples", type=positive_int, default=20000,
                   help="training examples tokenized with MeCab for the 1-vs-all-workers ratio (default: %(default)s)")
    p.add_argument("--tokenize_workers", type=positive_int, default=data.default_tokenize_workers(),
                   help="worker processes to compare with 1 (default: %(default)s, the cores available)")
    p.add_argument("--max_seq_len", type=positive_int, default=512, help="(default: %(default)s)")
    p.add_argument("--work_dir", default=".cache/bench_scale", help="(default: %(default)s)")
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------------- corpus


def source_articles(corpus: Path, work: Path) -> list[dict]:
    """id, category, title, body of each article of the livedoor tarball (read by prepare.py, run as users run it:
    nothing imports prepare.py), or of a JSONL of such rows."""
    if corpus.suffix != ".jsonl":
        subprocess.run([sys.executable, str(REPO / "prepare.py"), "--input", str(corpus), "--output_dir",
                        str(work / "livedoor")], check=True, stdout=subprocess.DEVNULL)
        corpus = work / "livedoor" / "all.jsonl"
    return [{k: r[k] for k in ("id", "category", "title", "body")} for r in read_jsonl(corpus)]


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


# ---------------------------------------------------------------------------------------- tokenizers


def mecab_tokenizer(directory: Path, articles: list[dict], vocab_size: int = 32768) -> Any:
    """BertJapaneseTokenizer (MeCab + unidic-lite, WordPiece) with the corpus's most frequent words, like v3's."""
    import fugashi
    import unidic_lite

    import families
    tagger = fugashi.GenericTagger(f'-d "{unidic_lite.DICDIR}" -r "{os.path.join(unidic_lite.DICDIR, "mecabrc")}"')
    sample = [t for a in articles[:3000] for t in (a["title"], a["body"])]
    words = Counter(w.surface for text in sample for w in tagger(text))
    chars = sorted({c for text in sample for c in text if not c.isspace()})
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    budget = max(0, vocab_size - len(special) - 2 * len(chars))
    vocab = list(dict.fromkeys(special + [w for w, _ in words.most_common(budget)] + chars + ["##" + c for c in chars]))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertJapaneseTokenizer", "word_tokenizer_type": "mecab",
        "mecab_kwargs": {"mecab_dic": "unidic_lite"}, "subword_tokenizer_type": "wordpiece",
        "do_lower_case": False, "model_max_length": 512}), encoding="utf-8")
    # a model directory is what bertcls loads tokenizers from: the config of a BERT this vocabulary would feed
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(vocab)}),
                                           encoding="utf-8")
    return families.load_tokenizer(str(directory), log=lambda message: None)


def char_bert(directory: Path, articles: list[dict]) -> Path:
    """make_tiny.py's random 2-layer BERT, with a WordPiece vocabulary of the corpus's characters."""
    import make_tiny
    vocab = make_tiny.wordpiece_vocab([t for a in articles[:3000] for t in (a["title"], a["body"])], 0)
    make_tiny.build_model(directory, vocab, argparse.Namespace(layers=2, hidden=64, heads=2, seed=0,
                                                               max_position_embeddings=512))
    return directory


# ---------------------------------------------------------------------------------------- measuring


def run_measured(command: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run a command; its wall time and peak resident memory (the child's ru_maxrss). Output goes to log_path."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"bench_scale.py: {command[1:4]} failed ({process.returncode}):\n" + "\n".join(tail))
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def memory_status(cache_dir: Path) -> dict:
    """This process's peak resident memory (VmHWM), its private memory (RssAnon), and the resident pages of the
    tokenization cache it maps (from /proc/self/smaps: shared with every process that maps the same file)."""
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M))
    cache_kib, in_cache = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header: address perms offset dev inode path
            in_cache = line.split()[-1].startswith(str(cache_dir))
        elif in_cache and line.startswith("Rss:"):
            cache_kib += int(line.split()[1])
    return {"peak_rss_mib": round(int(fields["VmHWM"]) / 1024, 1),
            "rss_anon_mib": round(int(fields["RssAnon"]) / 1024, 1), "cache_rss_mib": round(cache_kib / 1024, 1)}


def probe(out_dir: str, bertcls_args: list[str]) -> int:
    """bertcls.py, stopped at its first optimizer step after writing this rank's memory figures to out_dir."""
    import torch

    import bertcls
    cache_dir = Path(bertcls.parse_args(bertcls_args).cache_dir).resolve()
    build_optimizer = bertcls.build_optimizer

    def first_step(*_: Any) -> None:
        rank = int(os.environ.get("RANK", "0"))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(memory_status(cache_dir)))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            torch.distributed.barrier()  # every rank has written its figures
        sys.stderr.flush()
        os._exit(0)

    def build_and_watch(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = build_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(first_step)
        return optimizer

    bertcls.build_optimizer = build_and_watch
    return bertcls.main(bertcls_args)


def bertcls_run(name: str, work: Path, model: Path, dataset: Path, cache: Path, args: argparse.Namespace,
                processes: int = 1) -> dict:
    """One bertcls.py run up to its first optimizer step: the memory figures of each rank, and its log's facts."""
    out_dir = work / "probes" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rank*.json"):
        old.unlink()
    flags = ["--model_name", str(model), "--dataset_dir", str(dataset), "--output_dir", str(work / "outputs"),
             "--cache_dir", str(cache), "--epochs", "1", "--batch_size", "16", "--max_seq_len", str(args.max_seq_len),
             "--device", "cpu", "--dtype", "fp32", "--tokenize_workers", str(args.tokenize_workers)]
    script = [str(Path(__file__).resolve()), "--probe", str(out_dir), "--"]
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"  # what torchrun sets anyway, said here so that it does not warn
    log_path = work / "probes" / f"{name}.log"
    result = run_measured(launcher + script + flags, log_path, env)
    log = log_path.read_text(encoding="utf-8", errors="replace")
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(processes)]
    tokenized = re.search(r"tokenized train: (\d+) examples in ([0-9.]+)s \((\d+) process", log)
    return {"seconds": result["seconds"], "ranks": ranks,
            "tokenize_train_s": float(tokenized.group(2)) if tokenized else None,
            "tokenize_processes": int(tokenized.group(3)) if tokenized else None,
            "cache_mib": round(sum(p.stat().st_size for p in cache.glob("*.pt")) / MIB, 1)}


def tokenization_ratio(tokenizer: Any, dataset: Path, n: int, workers: int, max_len: int, work: Path) -> dict:
    """Seconds to tokenize the first n training examples with 1 process and with `workers` (worker start-up
    included), and the one-time start of the fork server the workers are forked from (bertcls.py pays it once)."""
    import data
    from common import Progress
    train = data.read_split(dataset, "train", data.load_label2id(dataset))
    n = min(n, len(train.labels))
    if n < data.PARALLEL_MIN_EXAMPLES:
        raise SystemExit(f"bench_scale.py: --ratio_examples must be at least {data.PARALLEL_MIN_EXAMPLES}")
    subset = train._replace(labels=train.labels[:n], starts=train.starts[:n + 1])
    spec = data.InputSpec(max_len, True)
    started = time.perf_counter()
    server = data.worker_context(type(tokenizer).__module__).Process(target=os.getpid)
    server.start()  # starts the fork server (importing torch and the tokenizer's module), then forks from it
    server.join()
    figures = {"examples": n, "workers": workers, "fork_server_start_s": round(time.perf_counter() - started, 1)}
    for processes in (1, workers):
        path = work / f"ratio-{processes}.pt"
        started = time.perf_counter()
        with Progress(n, f"tokenizing {n} examples, {processes} process(es)") as progress:
            data.tokenize_split(tokenizer, subset, spec, processes, path, progress)
        figures[f"seconds_{'1' if processes == 1 else 'workers'}"] = round(time.perf_counter() - started, 1)
        path.unlink()
    figures["speedup"] = round(figures["seconds_1"] / figures["seconds_workers"], 2)
    return figures


# ------------------------------------------------------------------------------------------- report


def table(report: dict) -> str:
    ratio = report["tokenization_ratio"]
    lines = ["| | " + " | ".join(f"x{c} ({report[f'x{c}']['examples']} articles)" for c in report["copies"]) + " |",
             "|---|" + "---|" * len(report["copies"])]

    def row(label: str, value) -> None:
        lines.append(f"| {label} | " + " | ".join(str(value(report[f"x{c}"])) for c in report["copies"]) + " |")

    row("prepare.py: time / peak RSS", lambda r: f"{r['prepare']['seconds']} s / {r['prepare']['peak_rss_mib']} MiB")
    row("tokenization of train, cheap tokenizer, all workers",
        lambda r: f"{r['alone_cold']['tokenize_train_s']} s ({r['alone_cold']['tokenize_processes']} process(es))")
    row("cache on disk", lambda r: f"{r['alone_cold']['cache_mib']} MiB")
    for key, label in [("alone_cold", "bertcls.py alone, cold cache"), ("alone_warm", "bertcls.py alone, warm cache"),
                       ("torchrun_cold", "torchrun 2 processes, cold cache")]:
        row(f"{label}: peak RSS (private / cache pages at step 1), MiB", lambda r, key=key: ", ".join(
            f"{m['peak_rss_mib']} ({m['rss_anon_mib']} / {m['cache_rss_mib']})" for m in r[key]["ranks"]))
    lines.append(f"\nMeCab tokenization of {ratio['examples']} examples: {ratio['seconds_1']} s with 1 process, "
                 f"{ratio['seconds_workers']} s with {ratio['workers']} worker processes: {ratio['speedup']}x "
                 f"(and {ratio['fork_server_start_s']} s once per run to start the fork server they come from)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--probe"]:  # internal: bench_scale.py --probe OUT_DIR -- <bertcls.py flags>
        return probe(argv[1], argv[3:])
    args = parse_args(argv)
    if args.tokenize_workers < 2:
        raise SystemExit("bench_scale.py: --tokenize_workers must be 2 or more: it is compared with 1")
    return run_cli("bench_scale.py", lambda: bench(args))


def bench(args: argparse.Namespace) -> int:
    work = Path(args.work_dir).resolve()
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    articles = source_articles(Path(args.corpus), work)
    copies = sorted({1, args.copies})
    report: dict[str, Any] = {"copies": copies, "cpus": os.cpu_count(), "corpus": args.corpus,
                              "max_seq_len": args.max_seq_len, "tokenize_workers": args.tokenize_workers}
    for c in copies:
        corpus = work / f"corpus-x{c}.jsonl"
        report[f"x{c}"] = {"examples": write_corpus(articles, c, corpus), "corpus_mib": round(
            corpus.stat().st_size / MIB, 1)}
        say(f"wrote {corpus} ({report[f'x{c}']['examples']} articles)")
        report[f"x{c}"]["prepare"] = run_measured(
            [sys.executable, str(REPO / "prepare.py"), "--input", str(corpus), "--text_fields", "title,body",
             "--label_field", "category", "--output_dir", str(work / f"dataset-x{c}")], work / f"prepare-x{c}.log")
        say(f"prepare.py x{c}: {report[f'x{c}']['prepare']}")
    tokenizer = mecab_tokenizer(work / "mecab-tokenizer", articles)
    report["tokenization_ratio"] = tokenization_ratio(tokenizer, work / f"dataset-x{copies[-1]}", args.ratio_examples,
                                                      args.tokenize_workers, args.max_seq_len, work)
    say(f"MeCab tokenization: {report['tokenization_ratio']}")
    model = char_bert(work / "char-bert", articles)
    for c in copies:
        dataset = work / f"dataset-x{c}"
        for name, cache, processes in [("alone_cold", f"cache-x{c}-alone", 1), ("alone_warm", f"cache-x{c}-alone", 1),
                                       ("torchrun_cold", f"cache-x{c}-torchrun", 2)]:
            if name.endswith("cold"):
                for old in (work / cache).glob("*.pt"):
                    old.unlink()
            report[f"x{c}"][name] = bertcls_run(f"x{c}-{name}", work, model, dataset, work / cache, args, processes)
            say(f"bertcls.py x{c} {name}: {report[f'x{c}'][name]}")
    print(table(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
