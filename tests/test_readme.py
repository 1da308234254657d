"""The README is the contract with users: its commands run in order as written, and what they write stays out of git."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess

import pytest

import bertcls
import prepare
import sweep
from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
# flags whose value is a path that a command writes (make_tiny.py's --data and --model_dir are its outputs)
OUTPUT_FLAGS = {"--output", "--output_dir", "--download_dir", "--cache_dir"}
MAKE_TINY_OUTPUT_FLAGS = {"--data", "--model_dir"}
DIRECTORY_FLAGS = {"--output_dir", "--download_dir", "--cache_dir", "--model_dir"}


def readme_commands() -> list[str]:
    """Commands of the README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def docstring_commands() -> list[str]:
    """The usage lines at the top of each script's docstring."""
    lines = []
    for path in [*REPO.glob("*.py"), *REPO.glob("scripts/*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        lines += [line for line in doc.replace("\\\n", " ").splitlines()
                  if re.match(r"\s+(cat .*\| )?(python|torchrun) ", line)]
    return lines


def written_paths(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    flags = OUTPUT_FLAGS | (MAKE_TINY_OUTPUT_FLAGS if any(w.endswith("make_tiny.py") for w in words) else set())
    paths = [after + ("/" if word in DIRECTORY_FLAGS and not after.endswith("/") else "")  # as git matches dirs
             for word, after in zip(words, words[1:]) if word in flags or word == ">"]
    return [p for p in paths if not p.startswith(("/", "$")) and "<" not in p and "..." not in p]


def default_paths() -> list[str]:
    """Where the scripts write when a README command names no path (directories end in "/", as git matches them)."""
    bertcls_args, sweep_args, prepare_args = bertcls.parse_args([]), sweep.parse_args([]), prepare.parse_args([])
    return [f"{bertcls_args.output_dir}/", f"{bertcls_args.cache_dir}/", f"{sweep_args.output_dir}/",
            f"{prepare_args.download_dir}/", "datasets/livedoor/", "datasets/tiny/", "models/tiny-bert/",
            "data/tiny.jsonl"]


def test_readme_says_to_install_pytorch_before_the_first_command():
    first_command = README.index("```bash")
    assert README.index("https://pytorch.org/get-started/locally/") < first_command
    assert README.index("Install the PyTorch build for your platform") < first_command


def test_files_the_documented_commands_write_are_ignored_by_git():
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(REPO), "rev-parse"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("needs git and a git checkout of the repository to ask which paths .gitignore ignores")
    paths = sorted({p for c in readme_commands() + docstring_commands() for p in written_paths(c)} |
                   set(default_paths()))
    # the parsing finds predict.py's --output and the sweep's redirections
    assert any(p.endswith("predictions.jsonl") for p in paths) and "results/all.csv" in paths
    not_ignored = [p for p in paths if subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", p],
                                                      capture_output=True).returncode != 0]
    assert not_ignored == []
