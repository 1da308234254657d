"""sweep.py on a cluster: --list, --task_index (a Slurm job array emulated by parallel processes), --slurm, and
leases shared by several "hosts" (BERTCLS_HOSTNAME) on one output directory.

Everything runs with tests/fake_bertcls.py as the child: it writes real run directories in milliseconds. The
--slurm script is run by bash as Slurm would run an array task, with the real sweep.py, on a finished grid."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sweep
from conftest import REPO, finished_runs, read_only_mount_prefix

FAKE = Path(__file__).resolve().with_name("fake_bertcls.py")
MODEL = "org/m"
# the grid: lr x seed, in the order --list numbers it
GRID = [(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]
# a sweep process whose child is the fake bertcls.py; the checks of the real dataset and models made before any
# run (sweep.check_dataset, sweep.unloadable_models) are off: these tests are about scheduling
SWEEP_WITH_FAKE = (f"import pathlib, sys; sys.path.insert(0, {str(REPO)!r}); import sweep; "
                   f"sweep.BERTCLS = pathlib.Path({str(FAKE)!r}); "
                   "sweep.check_datasets = lambda *a: None; sweep.unloadable_models = lambda *a: set(); "
                   "sys.exit(sweep.main(sys.argv[1:]))")


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    """sweep.py runs fake_bertcls.py; returns the file where each of its runs is recorded."""
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_BERTCLS_DEFAULTS", json.dumps(sweep.resolve_bertcls_args([])))
    monkeypatch.setenv("FAKE_BERTCLS_COMPUTED", json.dumps(sweep.computed_on(sweep.resolve_bertcls_args([]))))
    monkeypatch.setenv("FAKE_BERTCLS_CALLS", str(calls))
    monkeypatch.setattr(sweep, "BERTCLS", FAKE)
    monkeypatch.setattr(sweep, "check_datasets", lambda *args: None)  # see SWEEP_WITH_FAKE
    monkeypatch.setattr(sweep, "unloadable_models", lambda *args: set())
    return calls


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def run_dirs(out: Path) -> set[Path]:
    return {p.parent for p in out.glob("*/*/*/config.json")}


def grid_argv(out: Path, *extra: str) -> list[str]:
    return ["--model_names", MODEL, "--lrs", "1e-3", "3e-3", "--seeds", "1", "2", "--output_dir", str(out),
            "--epochs", "2", "--dataset_dir", "data dir/it's", *extra]


def runs_made(calls: Path) -> list[tuple[float, int]]:
    """(lr, seed) of each run the fake bertcls.py was started for."""
    if not calls.exists():
        return []
    made = []
    for line in calls.read_text().splitlines():
        argv = json.loads(line)["argv"]
        made.append((float(argv[argv.index("--lr") + 1]), int(argv[argv.index("--seed") + 1])))
    return made


def finished_of(out: Path) -> list[tuple[float, int]]:
    args = [json.loads((d / "config.json").read_text())["args"] for d in finished_runs(out)]
    return sorted((a["lr"], a["seed"]) for a in args)


def sweep_process(argv: list[str], host: str, err: Path, **env: str) -> subprocess.Popen:
    with open(err, "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", SWEEP_WITH_FAKE, *argv], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, env={**os.environ, "BERTCLS_HOSTNAME": host, **env})


def wait_for_child(lock: Path, process: subprocess.Popen, err: Path) -> list[int]:
    """The [sweep, child] pids in lock once the sweep process has started its child."""
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            pids = json.loads(lock.read_text())["pids"]
            if len(pids) == 2:
                return pids
        assert process.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.02)


# ----------------------------------------------------------------------------------- --list, --task_index


def test_task_index_runs_one_combination_and_list_shows_the_grid(tmp_path, fake, capsys, monkeypatch):
    out = tmp_path / "outputs"
    assert sweep.main(grid_argv(out, "--task_index", "1")) == 0
    stdout, stderr = capsys.readouterr()
    assert runs_made(fake) == [GRID[1]] and finished_of(out) == [GRID[1]]
    assert f"task 1 of 0-3: {MODEL} lr 0.001 seed 2" in stderr
    [row] = csv_rows(stdout)
    assert (float(row["lr"]), int(row["seed"])) == GRID[1]
    [run_dir] = finished_runs(out)
    # a finished combination: nothing runs, the same row is printed (resubmitting an array is idempotent)
    assert sweep.main(grid_argv(out, "--task_index", "1")) == 0
    again, stderr = capsys.readouterr()
    assert again == stdout and "1 combinations, 1 already finished, 0 to run" in stderr
    assert runs_made(fake) == [GRID[1]]

    # combination 2 is being run by a sweep on another host (a fresh lease)
    combos = sweep.grid(sweep.parse_args(grid_argv(out)), out)
    lock = sweep.lock_path(out, combos[2])
    lock.write_text(json.dumps({"pids": [4242, 4243], "host": "host-b"}))
    expected = [{"index": i, "model_name": MODEL, "lr": lr, "seed": seed, "state": state, "run_dir": run, "holder": by}
                for i, ((lr, seed), state, run, by) in enumerate(zip(
                    GRID, ["to do", "finished", "running", "to do"], [None, str(run_dir), None, None],
                    [None, None, "pid 4242, 4243 on host-b", None]))]
    assert sweep.main(grid_argv(out, "--list", "json")) == 0
    listed, stderr = capsys.readouterr()
    assert json.loads(listed) == expected and len(listed.splitlines()) == 2 + 4  # one combination per line
    assert stderr == "sweep.py: 4 combinations: 1 finished, 1 running, 2 to do\n"
    assert sweep.main(grid_argv(out, "--list", "tsv")) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out), delimiter="\t"))
    assert rows == [{k: "" if v is None else str(v) for k, v in row.items()} for row in expected]
    assert sweep.main(grid_argv(out, "--list")) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["index", "model_name", "lr", "seed", "state", "run_dir", "holder"]
    state_at = table[0].index("state")  # columns are aligned
    assert [line[state_at:].split("  ")[0].strip() for line in table[1:]] == [r["state"] for r in expected]
    assert table[2].split()[:4] == ["1", MODEL, "0.001", "2"] and table[2].split()[5] == str(run_dir)
    # another host's lease that has not been refreshed for longer than --lease_timeout is not running
    long_ago = time.time() - 1000
    os.utime(lock, (long_ago, long_ago))
    assert sweep.main(grid_argv(out, "--list", "json", "--lease_timeout", "600")) == 0
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["to do", "finished", "to do", "to do"]
    assert not (out / ".locks" / ".mutex").exists() and runs_made(fake) == [GRID[1]]  # --list changes nothing


def test_array_emulation_every_combination_finishes_exactly_once(tmp_path, fake, capsys):
    """A job array: one process per index, all at once, indices 0 and 3 twice (a resubmitted array)."""
    out = tmp_path / "outputs"
    indices = [0, 1, 2, 3, 0, 3]
    processes = [sweep_process(grid_argv(out, "--task_index", str(i), "--lease_timeout", "1"), "node-1",
                               tmp_path / f"task-{n}.err", FAKE_BERTCLS_SECONDS="1")
                 for n, i in enumerate(indices)]
    for n, process in enumerate(processes):
        stdout, _ = process.communicate(timeout=300)
        assert process.returncode == 0, (tmp_path / f"task-{n}.err").read_text()
        [row] = csv_rows(stdout)
        assert (float(row["lr"]), int(row["seed"])) == GRID[indices[n]]
    assert sorted(runs_made(fake)) == GRID  # each run once
    assert finished_of(out) == GRID and len(run_dirs(out)) == 4
    assert list((out / ".locks").iterdir()) == []
    assert sweep.main(["--no_run", "--output_dir", str(out)]) == 0
    assert sorted((float(r["lr"]), int(r["seed"])) for r in csv_rows(capsys.readouterr().out)) == GRID


def test_task_index_out_of_range_or_without_slurm_is_a_one_line_error(tmp_path, fake, capsys, monkeypatch):
    out = tmp_path / "outputs"
    assert sweep.main(grid_argv(out, "--task_index", "4")) == 1
    assert capsys.readouterr().err == ("sweep.py: error: --task_index 4 is out of range: the grid has 4 combinations "
                                       "(0-3); see them with --list\n")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert sweep.main(grid_argv(out, "--task_index", "slurm")) == 1
    assert capsys.readouterr().err == ("sweep.py: error: --task_index slurm: SLURM_ARRAY_TASK_ID is not set; run it "
                                       "as a task of an sbatch --array job (see --slurm), or pass an index\n")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert sweep.main(grid_argv(out, "--task_index", "slurm")) == 1
    assert capsys.readouterr().err == ("sweep.py: error: SLURM_ARRAY_TASK_ID 7 is out of range: the grid has 4 "
                                       "combinations (0-3); see them with --list\n")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert sweep.main(grid_argv(out, "--task_index", "slurm")) == 0
    assert runs_made(fake) == [GRID[2]]


@pytest.mark.parametrize("argv, message", [
    (["--task_index", "-1"], "argument --task_index: expected a combination index (0, 1, ...) or slurm, got '-1'"),
    (["--list", "--no_run"], "--no_run and --list cannot be used together"),
    (["--slurm", "--task_index", "0"], "--slurm and --task_index cannot be used together"),
    (["--max_running", "2"], "--sbatch and --max_running go with --slurm"),
    (["--slurm", "--devices", "0,1"], "--slurm gives each array task one GPU of its own"),
    (["--list", "csv"], "argument --list: invalid choice: 'csv'"),
])
def test_bad_cluster_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --slurm


def test_slurm_script_is_bash_runs_the_array_and_passes_the_flags_through(tmp_path, fake, capsys, monkeypatch):
    out = tmp_path / "outputs"
    assert sweep.main(grid_argv(out)) == 0
    table = capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    argv = [*grid_argv(out), "--slurm", "--max_running", "2", "--sbatch=--partition gpu --time 4:00:00",
            "--sbatch", "--comment 'a # in quotes' --mem=16G"]
    assert sweep.main(argv) == 0
    script, stderr = capsys.readouterr()
    path = tmp_path / "sweep.sbatch"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    # sbatch reads #SBATCH lines until the first command, splitting them like a shell
    options = [shlex.split(line.removeprefix("#SBATCH"), comments=True) for line in lines if line.startswith("#SBATCH")]
    assert options == [["--job-name=bertcls-sweep"], ["--array=0-3%2"], ["--ntasks=1"], ["--gres=gpu:1"],
                       [f"--chdir={tmp_path}"], [f"--output={out}/sweep-logs/slurm-%A_%a.log"],
                       ["--partition", "gpu", "--time", "4:00:00"], ["--comment", "a # in quotes", "--mem=16G"]]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert lines.index(commands[0]) > max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert [shlex.split(c) for c in commands] == [
        ["exec", sys.executable, str(REPO / "sweep.py"), "--task_index", "slurm", *grid_argv(out)]]
    assert (out / "sweep-logs").is_dir()
    assert "sbatch script for 4 combinations (array 0-3)" in stderr
    # what Slurm would run for array task 3 (the real bertcls.py, were it not finished): the flags reach it
    # unchanged, so it finds the finished run and exits at once
    before = run_dirs(out)
    task = subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "SLURM_ARRAY_TASK_ID": "3"})
    assert task.returncode == 0, task.stderr
    assert "1 combinations, 1 already finished, 0 to run" in task.stderr
    [row] = csv_rows(task.stdout)
    assert row in csv_rows(table) and (float(row["lr"]), int(row["seed"])) == GRID[3]
    assert run_dirs(out) == before


def test_task_argv_drops_only_the_slurm_flags():
    argv = ["--slurm", "--sbatch", "-p gpu", "--lrs", "1e-5", "--max_running=3", "--sbatch=--time 1:00:00",
            "--epochs", "3", "--max_running", "2"]
    assert sweep.task_argv(argv) == ["--lrs", "1e-5", "--epochs", "3"]


# ------------------------------------------------------------------------------------ leases across hosts


def test_a_live_lease_on_another_host_is_waited_for_beyond_the_timeout(tmp_path, fake, capsys, monkeypatch):
    """Host a runs combination 0 for ~6 s, refreshing its lease; host b's sweep, whose --lease_timeout is 3 s,
    waits for it instead of taking it over, then counts a's result."""
    out, err = tmp_path / "outputs", tmp_path / "host-a.err"
    a = sweep_process(grid_argv(out, "--task_index", "0", "--lease_timeout", "3"), "host-a", err,
                      FAKE_BERTCLS_SECONDS="6")
    lock = sweep.lock_path(out, sweep.grid(sweep.parse_args(grid_argv(out)), out)[0])
    wait_for_child(lock, a, err)
    monkeypatch.setenv("BERTCLS_HOSTNAME", "host-b")
    started = time.monotonic()
    assert sweep.main(grid_argv(out, "--task_index", "0", "--lease_timeout", "3")) == 0
    waited = time.monotonic() - started
    assert a.wait(timeout=120) == 0, err.read_text()
    stderr = capsys.readouterr().err
    assert waited > 3, "host a finished before host b's lease timeout passed: the test proved nothing"
    assert f"waiting for another sweep (pid {a.pid}, " in stderr
    assert " on host-a) running org/m lr 0.001 seed 1" in stderr
    assert "finished by another sweep: org/m lr 0.001 seed 1" in stderr and "taking over" not in stderr
    assert runs_made(fake) == [GRID[0]] and finished_of(out) == [GRID[0]]


def test_a_dead_hosts_lease_is_taken_over_after_the_timeout_and_run_once(tmp_path, fake, capsys, monkeypatch):
    out, err = tmp_path / "outputs", tmp_path / "host-a.err"
    a = sweep_process(grid_argv(out, "--task_index", "0"), "host-a", err, FAKE_BERTCLS_SECONDS="600")
    lock = sweep.lock_path(out, sweep.grid(sweep.parse_args(grid_argv(out)), out)[0])
    sweep_pid, child_pid = wait_for_child(lock, a, err)
    while not run_dirs(out):  # host a's run has begun
        assert a.poll() is None, err.read_text()
        time.sleep(0.02)
    for pid in (sweep_pid, child_pid):  # host a dies: nothing refreshes its lease any more
        os.kill(pid, signal.SIGKILL)
    a.wait()
    monkeypatch.setenv("BERTCLS_HOSTNAME", "host-b")
    notes = []
    assert sweep.acquire_lock(lock, notes.append, lease_timeout=3600) == f"pid {sweep_pid}, {child_pid} on host-a"
    while time.time() - lock.stat().st_mtime <= 1.5:  # let the lease age past a 1 s timeout
        time.sleep(0.1)
    assert sweep.main(grid_argv(out, "--task_index", "0", "--lease_timeout", "1")) == 0
    stderr = capsys.readouterr().err
    assert (f"sweep.py: taking over stale lock {lock}: pid {sweep_pid}, {child_pid} on host-a: not refreshed for"
            in stderr)
    assert runs_made(fake) == [GRID[0], GRID[0]]  # host a's run (killed) and host b's
    assert finished_of(out) == [GRID[0]] and len(run_dirs(out)) == 2 and not lock.exists()


def test_a_lock_with_garbage_is_taken_over_with_a_warning(tmp_path, fake, capsys):
    out = tmp_path / "outputs"
    lock = sweep.lock_path(out, sweep.grid(sweep.parse_args(grid_argv(out)), out)[3])
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"\x00\xffnot a lock")
    assert sweep.main(grid_argv(out, "--task_index", "3")) == 0
    assert f"sweep.py: warning: taking over stale lock {lock}: no valid lock record in it (JSONDecodeError" \
        in capsys.readouterr().err
    assert runs_made(fake) == [GRID[3]] and finished_of(out) == [GRID[3]]


def race_for(lock: Path, host: str, go, results) -> None:
    os.environ["BERTCLS_HOSTNAME"] = host
    go.wait()
    results.put((host, sweep.acquire_lock(lock, lambda _: None, lease_timeout=60)))


def test_of_many_hosts_taking_over_one_stale_lock_at_once_exactly_one_wins(tmp_path):
    lock = tmp_path / ".locks" / "x.lock"
    lock.parent.mkdir()
    for _ in range(3):
        lock.write_text(json.dumps({"pids": [1], "host": "dead-host"}))
        long_ago = time.time() - 1000
        os.utime(lock, (long_ago, long_ago))
        context = multiprocessing.get_context("fork")
        go, results = context.Event(), context.Queue()
        racers = [context.Process(target=race_for, args=(lock, f"host-{n}", go, results)) for n in range(6)]
        for racer in racers:
            racer.start()
        go.set()
        outcomes = dict(results.get(timeout=60) for _ in racers)
        for racer in racers:
            racer.join()
        winners = [host for host, holder in outcomes.items() if holder is None]
        assert len(winners) == 1, outcomes
        record = json.loads(lock.read_text())
        assert record["host"] == winners[0]
        losers = {holder for holder in outcomes.values() if holder is not None}
        assert losers <= {f"pid {record['pids'][0]} on {winners[0]}", "another sweep, which took it just now"}
        assert sorted(p.name for p in lock.parent.iterdir()) == ["x.lock"]


def test_a_stale_lock_is_removed_only_by_its_one_claimant_and_only_while_it_is_the_lock_judged(tmp_path):
    lock, private = tmp_path / "x.lock", tmp_path / ".mine.tmp"
    private.write_text("me")
    lock.write_text(json.dumps({"pids": [1], "host": "host-b"}))
    judged = sweep.read_lock(lock)
    now = time.time()
    # its sweep refreshed it after we judged it stale: it stays
    os.utime(lock, ns=(judged.mtime_ns + 10**9, judged.mtime_ns + 10**9))
    assert sweep.remove_stale(lock, judged, private, now, 60) is False
    assert sweep.read_lock(lock).mtime_ns == judged.mtime_ns + 10**9
    # another sweep claimed this stale lock first: it stays, for that sweep to remove
    judged = sweep.read_lock(lock)
    claim = tmp_path / f".x.lock.claim-{judged.inode}-{judged.mtime_ns}"
    claim.write_text("another sweep")
    assert sweep.remove_stale(lock, judged, private, now, 60) is False and lock.exists() and claim.exists()
    # ... unless that sweep died while taking over: its claim goes after the lease timeout
    os.utime(claim, (now - 100, now - 100))
    assert sweep.remove_stale(lock, judged, private, now, 60) is False and not claim.exists()
    assert sweep.remove_stale(lock, judged, private, now, 60) is True
    assert sorted(os.listdir(tmp_path)) == [".mine.tmp"] and private.stat().st_nlink == 1


def test_lease_keeper_refreshes_its_locks_and_warns_once_when_one_is_lost(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTCLS_HOSTNAME", "host-a")
    lock, notes = tmp_path / "x.lock", []
    lock.write_text(sweep.lock_record(os.getpid(), 12345))
    os.utime(lock, (1000, 1000))
    keeper = sweep.LeaseKeeper(lambda: [lock], 0.05, notes.append).start()
    try:
        deadline = time.monotonic() + 60
        while lock.stat().st_mtime < time.time() - 600:
            assert time.monotonic() < deadline, "the lease was never refreshed"
            time.sleep(0.02)
        lock.write_text(json.dumps({"pids": [7], "host": "host-b"}))  # taken over after our lease lapsed
        os.utime(lock, (1000, 1000))
        while not notes:
            assert time.monotonic() < deadline, "losing the lock went unnoticed"
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        keeper.stop()
    assert notes == [f"sweep.py: warning: lost lock {lock} to pid 7 on host-b: its lease lapsed and another sweep "
                     "took it over, so this combination may run twice (the newest run counts)"]
    assert lock.stat().st_mtime == 1000  # another sweep's lock is not refreshed
    sweep.release_lock(lock)
    assert lock.exists()  # nor removed


# ------------------------------------------------------------------------------- read-only file system


def test_a_lock_path_that_is_a_directory_is_one_line_before_any_run(tmp_path, fake, capsys):
    out = tmp_path / "outputs"
    lock = sweep.lock_path(out, sweep.grid(sweep.parse_args(grid_argv(out)), out)[2])
    lock.mkdir(parents=True)
    for argv in (grid_argv(out), grid_argv(out, "--list")):
        assert sweep.main(argv) == 1
        stdout, err = capsys.readouterr()
        assert stdout == "" and err.endswith(f"sweep.py: error: {lock} is a directory where sweep.py keeps a lock "
                                             "file (no sweep makes one): remove it\n"), err
    assert runs_made(fake) == []


READ_ONLY_SWEEPS = """
import contextlib, io, json, pathlib, sys
sys.path.insert(0, {repo!r})
import sweep
sweep.BERTCLS = pathlib.Path({fake!r})
sweep.check_datasets = lambda *a: None  # as SWEEP_WITH_FAKE
sweep.unloadable_models = lambda *a: set()
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = sweep.main(argv)
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def test_output_dir_on_a_read_only_file_system(tmp_path, fake, capsys):
    out = tmp_path / "outputs"
    assert sweep.main(grid_argv(out, "--task_index", "0")) == 0
    finished = capsys.readouterr().out
    prefix = read_only_mount_prefix(out)
    if prefix is None:
        pytest.skip("cannot mount a read-only file system here (needs unshare --mount: root or user namespaces)")
    argvs = [grid_argv(out, "--list", "json"), ["--no_run", "--output_dir", str(out)],
             grid_argv(out, "--task_index", "0"), grid_argv(out, "--task_index", "1"), grid_argv(out)]
    code = READ_ONLY_SWEEPS.format(repo=str(REPO), fake=str(FAKE))
    done = subprocess.run([*prefix, sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    listed, aggregated, finished_task, task, whole = json.loads(done.stdout)
    # reading works: --list, --no_run, and a finished task, which has nothing to write
    assert listed[0] == 0 and [r["state"] for r in json.loads(listed[1])] == ["finished", "to do", "to do", "to do"]
    assert aggregated[:2] == [0, finished] and finished_task[:2] == [0, finished]
    # running needs a lock: one line, exit 1, nothing run
    for rc, stdout, stderr in (task, whole):
        assert (rc, stdout) == (1, "") and stderr.endswith(
            f"sweep.py: error: cannot write in {out / '.locks'} (Read-only file system): --output_dir must be on a "
            "writable file system\n"), stderr
    assert runs_made(fake) == [GRID[0]]
