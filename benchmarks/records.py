"""What every benchmark script shares: how speeds are timed (interleaved rounds), how records are stamped (machine,
versions, commit, date) and where the cost records docs/results/<name>.json land. Imports nothing that needs
pydantic, so that gpu_speed.py runs on a GPU image without it."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def machine() -> dict[str, Any]:
    """Where and with what a measurement ran: machine, threads, device, versions, commit and date."""
    import transformers

    import loracl

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on the machine (a GPU image): the record says so rather than losing the measurement
        commit = "unknown"
    return {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "versions": {"loracl": loracl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def interleaved_rounds(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each run in each round, the order reversed every other round, so that drift in the machine's
    speed falls on every side alike (how every speed comparison here is measured)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds):
        for name in (list(runs) if round_index % 2 == 0 else list(runs)[::-1]):
            started = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def load_record(name: str, results: Path = RESULTS) -> dict[str, Any] | None:
    """The record docs/results/<name>.json written by benchmarks/<name>.py, or None when it was never written."""
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_record(name: str, record: dict[str, Any], results: Path = RESULTS) -> Path:
    """Print a cost record and write it, stamped with machine(), as docs/results/<name>.json (what load_record reads)."""
    record = {**record, **machine()}
    text = json.dumps(record, indent=1)
    print(text)
    target = results / f"{name}.json"
    target.write_text(text + "\n")
    return target


def provenance(record: dict[str, Any], script: str) -> str:
    """Where a record comes from: its machine and date, and the command that writes it."""
    return f"{record['machine']}, {record['date']}; `python benchmarks/{script}.py`"
