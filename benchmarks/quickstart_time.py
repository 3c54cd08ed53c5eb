"""Wall time of the embedded default (`loracl run` with no config), as a new user runs it; writes
docs/results/quickstart_time.json (rendered into docs/results.md's Costs section by `python benchmarks/bench.py summary`).

    python benchmarks/quickstart_time.py [--out /tmp/loracl_quickstart]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_record  # noqa: E402

TARGET_S = 300  # the quickstart's promise: under 5 minutes on 2 CPU cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/loracl_quickstart")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run, not a resume
    started = time.perf_counter()
    subprocess.run(["loracl", "run", "--out", args.out, "--set", "train.progress=false"], check=True)
    wall = time.perf_counter() - started
    runs = json.loads((Path(args.out) / "results.json").read_text())["runs"]
    record = {
        "wall_s": wall,
        "target_s": TARGET_S,
        "runs": [{key: run[key] for key in ("label", "avg_accuracy", "forgetting", "wall_s")} for run in runs],
    }
    write_record("quickstart_time", record)


if __name__ == "__main__":
    main()
