"""Where measurements land and how they are stamped: the machine, versions, commit and date of every record, and
the cost records docs/results/<name>.json that benchmarks/<name>.py scripts write and the results page reads."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def machine() -> dict[str, Any]:
    import transformers

    import loracl

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "versions": {"loracl": loracl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }

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
