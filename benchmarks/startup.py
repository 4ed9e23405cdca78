"""Start-up time of the light commands, this tree against an older revision, side by side.

What a user waits for before anything happens: ``fedfleet --help``, ``fedfleet certs --help`` and
``import fedfleet.errors`` (what a model-less tool pays to catch fedfleet's errors). The older revision
(default: 61043b0, before the package's public names became lazy) is extracted with ``git archive`` into a
temporary folder and run with the same interpreter and packages; runs alternate between the two trees, and
each figure is the median wall time of a fresh interpreter.

    python benchmarks/startup.py            # 15 runs each
    python benchmarks/startup.py --quick    # 5 runs each; prints one JSON line last
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "help": ["-c", "import sys; from fedfleet.cli.main import main; sys.argv=['fedfleet','--help']; main()"],
    "certs_help": [
        "-c",
        "import sys; from fedfleet.cli.main import main; sys.argv=['fedfleet','certs','--help']; main()",
    ],
    "import_errors": ["-c", "import fedfleet.errors, sys; assert 'fedfleet.errors' in sys.modules"],
    "torch_loaded": ["-c", "import fedfleet.errors, sys; print(int('torch' in sys.modules))"],
}


def extract(revision: str, into: Path) -> Path:
    """The revision's ``src`` folder, unpacked under ``into``."""
    archive = into / "rev.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run_once(src: Path, args: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(src)}  # shadows the editable install
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode not in (0,):
        raise RuntimeError(f"{args} failed in {src}: {done.stderr[-500:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 runs of each command (under a minute)")
    parser.add_argument("--baseline", default="61043b0", help="the older revision to compare with")
    parser.add_argument("--runs", type=int, default=None)
    opts = parser.parse_args()
    runs = opts.runs or (5 if opts.quick else 15)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": extract(opts.baseline, Path(tmp)), "after": ROOT / "src"}
        result: dict[str, object] = {"benchmark": "startup", "baseline": opts.baseline, "runs": runs}
        for name, args in COMMANDS.items():
            if name == "torch_loaded":
                for side, src in trees.items():
                    result[f"{name}_{side}"] = bool(int(run_once(src, args)[1].strip() or 0))
                continue
            times: dict[str, list[float]] = {side: [] for side in trees}
            run_once(trees["after"], args)  # warm the file cache for both
            run_once(trees["before"], args)
            for _ in range(runs):
                for side, src in trees.items():
                    times[side].append(run_once(src, args)[0])
            before, after = statistics.median(times["before"]), statistics.median(times["after"])
            result[f"{name}_before_s"] = round(before, 3)
            result[f"{name}_after_s"] = round(after, 3)
            result[f"{name}_speedup_x"] = round(before / after, 1)
            print(f"{name:14s} before {before:6.3f} s   after {after:6.3f} s   {before / after:5.1f}x", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
