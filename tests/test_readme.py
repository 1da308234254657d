"""The README is the contract with users: its commands run as written. The offline section runs for real, in order;
every other command line is parsed by its script (a flag the script does not know fails here); and what the
commands write stays out of git."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
OUTPUT_FLAGS = {"--output", "--output_dir", "--download_dir", "--cache_dir", "--data", "--model_dir"}


def bash_blocks() -> list[list[str]]:
    """The commands of each bash block, continuation lines joined."""
    return [[line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
            for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def commands() -> list[str]:
    return [command for block in bash_blocks() for command in block]


def test_the_readme_is_short_and_installs_pytorch_before_the_first_command():
    assert len(README.splitlines()) <= 450 and len(README.encode()) <= 40_000
    assert README.index("https://pytorch.org/get-started/locally/") < README.index("```bash")


def test_the_two_contract_commands_are_there():
    assert "pip install -r requirements.txt && python prepare.py && python bertcls.py" in commands()
    test_command = "pip install -r requirements.txt pytest && python -m pytest -q"
    assert test_command in commands()
    ci = (REPO / ".ci/run").read_text()
    assert test_command in ci  # CI runs exactly the README's test command


def test_the_offline_section_runs_as_written(tmp_path):
    """The commands of the block after 「ダウンロードなしで試す」, one after another in a fresh directory."""
    block = next(b for b in bash_blocks() if b[0].startswith("python scripts/make_tiny.py"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"]}
    for name in ("prepare.py", "bertcls.py", "predict.py", "sweep.py", "compare.py", "common.py", "data.py",
                 "models.py", "scripts"):
        (tmp_path / name).symlink_to(REPO / name)
    for command in block:
        command = command.replace("python ", f"{shlex.quote(sys.executable)} ", 1)
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert '"label": "tech"' in result.stdout  # the last command classifies a text about a phone as tech


@pytest.mark.parametrize("command", [c for c in commands() if re.match(r"(cat .*\| )?(python|torchrun) ", c)])
def test_every_command_line_is_accepted_by_its_script(command, monkeypatch):
    words = shlex.split(command.split("|")[-1].split(">")[0], comments=True)
    script = next(w for w in words if w.endswith(".py"))
    if script.startswith("scripts/") or words[:2] == ["python", "-m"]:
        return  # tools and pytest: run elsewhere in the suite
    module = importlib.import_module(script.removesuffix(".py"))
    flags = words[words.index(script) + 1:]
    try:
        module.parse_args(flags)
    except SystemExit as e:
        pytest.fail(f"{script} refused {flags}: exit {e.code}")


def test_files_the_commands_write_are_ignored_by_git():
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(REPO), "rev-parse"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("needs git and a git checkout to ask which paths .gitignore ignores")
    written = {"data/", "datasets/livedoor/", "datasets/tiny/", "outputs/", ".cache/bertcls/", "models/tiny-bert/",
               "data/tiny.jsonl"}
    for command in commands():
        words = shlex.split(command, comments=True)
        written |= {after for word, after in zip(words, words[1:]) if word in OUTPUT_FLAGS or word == ">"}
    written = {p for p in written if "<" not in p and not p.startswith(("/", "$"))}
    assert "results/all.csv" in written and "predictions.jsonl" in written
    kept = [p for p in written if subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", p],
                                                 capture_output=True).returncode != 0]
    assert kept == []
