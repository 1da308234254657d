"""A tokenizer that misbehaves inside tokenization worker processes, to test what bertcls.py does then.

It is a module of its own, not a test file, because worker processes unpickle the tokenizer by importing it.
Run as a script, it is bertcls.py with that tokenizer and worker processes even for tiny splits:

    python tests/tokenizer_faults.py --fault kill --trigger 殺 -- <bertcls.py flags>
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]


class FaultyTokenizer:
    """Behaves as `inner` until a text holds `trigger`, then: kill (its own process dies of SIGKILL, as the
    out-of-memory killer does it), hang (notes its pid in pid_dir, then sleeps), or raise (a ValueError)."""

    def __init__(self, inner: Any, trigger: str, fault: str, pid_dir: str = ""):
        self.inner, self.trigger, self.fault, self.pid_dir = inner, trigger, fault, pid_dir

    def __call__(self, text: str, text_pair: str | None = None, **kwargs: Any) -> Any:
        if self.trigger in text or self.trigger in (text_pair or ""):
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "hang":
                Path(self.pid_dir, str(os.getpid())).touch()
                time.sleep(600)
            else:
                raise ValueError(f"cannot tokenize {self.trigger!r}")
        return self.inner(text, text_pair, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet while unpickling
            raise AttributeError(name)
        return getattr(self.inner, name)


def use_faulty_tokenizer(trigger: str, fault: str, pid_dir: str = "", set_attr: Any = setattr) -> None:
    """Make bertcls load FaultyTokenizers, and use worker processes for splits of any size in chunks of 10."""
    import bertcls
    import data
    import families

    def load_tokenizer(*args: Any, **kwargs: Any) -> FaultyTokenizer:
        return FaultyTokenizer(families.load_tokenizer(*args, **kwargs), trigger, fault, pid_dir)

    set_attr(bertcls, "load_tokenizer", load_tokenizer)
    set_attr(data, "PARALLEL_MIN_EXAMPLES", 0)
    set_attr(data, "TOKENIZE_CHUNK", 10)


if __name__ == "__main__":  # worker processes import this file again: nothing may run then
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", choices=("kill", "hang", "raise"), required=True)
    parser.add_argument("--trigger", required=True)
    parser.add_argument("--pid_dir", default="")
    parser.add_argument("bertcls_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    import bertcls
    use_faulty_tokenizer(args.trigger, args.fault, args.pid_dir)
    sys.exit(bertcls.main(args.bertcls_args[1:] if args.bertcls_args[:1] == ["--"] else args.bertcls_args))
