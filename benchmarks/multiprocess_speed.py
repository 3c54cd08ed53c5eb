"""Training samples/s with two CPU processes (DDP over gloo) against one, on the text stream with MiniLM-L6.

    python benchmarks/multiprocess_speed.py [--tasks sst2 mnli] [--train 200]

Runs seq_lora once in one process and once under `accelerate launch --multi_gpu --num_processes 2` (torchrun; the
engine joins the processes over gloo on CPU), each with the same global batch, and writes
docs/results/multiprocess_speed.json. On a 2-core machine the two processes share the cores that one process
already uses, so this measures the overhead of the distributed path there, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import ROOT, write_record  # noqa: E402


def config(tasks: list[str], train: int) -> dict:
    return {
        "seed": 0,
        "backbone": {"name": "minilm-l6"},
        "stream": {"source": "json_dir", "path": str((ROOT / "../shared/data/cl_benchmark").resolve()), "tasks": tasks,
                   "max_train_per_task": train, "max_test_per_task": 50},
        "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "lr": 1.0e-3, "head_lr": 1.0e-2, "max_length": 128, "progress": False},
        "method": [{"name": "seq_lora"}],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=["sst2", "mnli"])
    parser.add_argument("--train", type=int, default=200)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    record = {"tasks": args.tasks, "train_per_task": args.train, "global_batch": 16}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(config(args.tasks, args.train)))
        for processes in (1, 2):
            out = Path(folder) / f"out{processes}"
            command = [sys.executable, "-m", "loracl.cli", "run", str(path), "--out", str(out)]
            if processes > 1:
                command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), "-m", "loracl.cli", "run", str(path), "--out", str(out)]
            subprocess.run(command, check=True, env=env, capture_output=True)
            result = json.loads((out / "seq_lora" / "results.json").read_text())
            record[f"processes_{processes}"] = {"train_samples_per_s": result["train_samples_per_s"], "avg_accuracy": result["avg_accuracy"]}
    record["ratio_2_over_1"] = record["processes_2"]["train_samples_per_s"] / record["processes_1"]["train_samples_per_s"]
    write_record("multiprocess_speed", record)


if __name__ == "__main__":
    main()
