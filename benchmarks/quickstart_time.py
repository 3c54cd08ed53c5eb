"""Wall time of the embedded default (`loracl run` with no config), as a new user runs it; writes docs/results/legacy.md.

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
from _results import write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/loracl_quickstart")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run, not a resume
    started = time.perf_counter()
    subprocess.run(["loracl", "run", "--out", args.out, "--set", "train.progress=false"], check=True)
    wall = time.perf_counter() - started
    runs = json.loads((Path(args.out) / "results.json").read_text())["runs"]
    rows = [f"| {run['label']} | {run['avg_accuracy']:.3f} | {run['forgetting'] if run['forgetting'] is None else round(run['forgetting'], 3)} | {run['wall_s']:.0f} |" for run in runs]
    body = "\n".join(
        [
            f"`loracl run` (the embedded quickstart: 4 packaged text tasks, MiniLM-L6, 5 method entries) took "
            f"**{wall:.0f} s** wall time end to end (target: under 300 s on 2 CPU cores: {'met' if wall < 300 else 'NOT met'}).",
            "",
            "| method | avg acc | forgetting | wall s |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    write_section("quickstart_time", "The embedded default run (benchmarks/quickstart_time.py)", body)


if __name__ == "__main__":
    main()
