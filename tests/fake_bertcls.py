"""A stand-in for bertcls.py in sweep.py's scheduling tests: it trains nothing and starts in milliseconds.

It writes a run directory in bertcls.py's format (outputs/<model>/<date>/<time>/ with config.json first and
test-metrics.json last), so sweep.py finds, matches and aggregates it like a real run. Its args are
FAKE_BERTCLS_DEFAULTS (bertcls.py's defaults as JSON) updated by its --flag value pairs, converted to the
default's type. It appends {"pid", "argv"} as one JSON line to FAKE_BERTCLS_CALLS (when set), so tests count
the runs, and sleeps FAKE_BERTCLS_SECONDS (default 0) between config.json and the metrics. The device type and
dtype it records are FAKE_BERTCLS_COMPUTED's (what bertcls.py would compute in here, as sweep.computed_on says).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path


def parse(argv: list[str], defaults: dict) -> dict:
    args, i = dict(defaults), 0
    while i < len(argv):
        name = argv[i][2:]
        default = defaults.get(name)
        if isinstance(default, bool):  # a switch
            args[name], i = True, i + 1
            continue
        value = argv[i + 1]
        args[name] = type(default)(value) if default is not None else value
        i += 2
    return args


def write(path: Path, obj: dict) -> None:
    """As bertcls.py writes its files: whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    args = parse(sys.argv[1:], json.loads(os.environ["FAKE_BERTCLS_DEFAULTS"]))
    if os.environ.get("FAKE_BERTCLS_CALLS"):
        with open(os.environ["FAKE_BERTCLS_CALLS"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:]}) + "\n")
    now = datetime.datetime.now()
    model_dir = args["model_name"].strip("/").removeprefix("./").replace("/", "__")  # common.safe_name (no torch here)
    run_dir = Path(args["output_dir"]) / model_dir / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S.%f")
    run_dir.mkdir(parents=True)
    computed = json.loads(os.environ["FAKE_BERTCLS_COMPUTED"])
    write(run_dir / "config.json", {"args": args, **computed, "params": 1000})
    time.sleep(float(os.environ.get("FAKE_BERTCLS_SECONDS", "0")))
    f1 = round(0.5 + args["lr"] * 1000 + args["seed"] / 1000, 6)  # distinct per combination
    write(run_dir / "val-metrics.json", {"best_epoch": 1, "f1": f1, "train_seconds": 1.0})
    write(run_dir / "test-metrics.json", {"loss": 1.0, "accuracy": f1, "precision": f1, "recall": f1, "f1": f1})


if __name__ == "__main__":
    main()
