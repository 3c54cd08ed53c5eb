"""The paper's own setting: single-task fine-tuning, MetaLoRA-CP and -TR against LoRA at equal trainable parameters.

Settings: two text tasks on all-MiniLM-L6-v2 (query/value slots) and the digits ResNet (`digits-resnet`, block
convolutions), whose random-init backbone is first trained fully as a base session on digits 0-4 (like the
digits ViT); the single task is then digits 5-9 with the backbone frozen. Every run is task-incremental with one
adapted task, so the accuracy is that task's test accuracy. MetaLoRA runs with `cl_mode: single`; its mapping
width is solved so that its adapter has as many parameters as the LoRA it is compared with (closest width).

Also reports the serving cost on the text stream from the runs of `stream_benchmark.py` in --stream-runs
(eval samples per second and train step time of metalora relative to seq_lora), when they exist.

    python benchmarks/metalora_single_task.py --out runs/bench_metalora_single
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from stream_benchmark import wait_for_the_machine  # noqa: E402

from loracl.backbones.classifier import ContinualClassifier  # noqa: E402
from loracl.backbones.registry import load_backbone  # noqa: E402
from loracl.config import HeadConfig, TrainConfig, validate_config  # noqa: E402
from loracl.data.stream import Split, Task  # noqa: E402
from loracl.engine import run_experiment  # noqa: E402
from loracl.methods.base import MethodContext  # noqa: E402
from loracl.methods.registry import create_method  # noqa: E402


def adapter_parameters(backbone: str, name: str, options: dict[str, Any]) -> int:
    """Trainable parameters one task adds, without the head rows."""
    model = ContinualClassifier(load_backbone(backbone, seed=0))
    method = create_method(name, options, MethodContext(HeadConfig(), TrainConfig(), seed=0))
    method.attach(model)
    method.begin_task(Task("probe", 0, [0], Split([], []), Split([], [])))
    return sum(p.numel() for p in method.trainable_parameters()) - (model.backbone.hidden_size + 1)


def matched_width(backbone: str, options: dict[str, Any], target: int) -> tuple[int, int]:
    """The mapping width whose MetaLoRA adapter size is closest to `target` (size is affine in the width)."""
    one = adapter_parameters(backbone, "metalora", {**options, "mapping_width": 1})
    two = adapter_parameters(backbone, "metalora", {**options, "mapping_width": 2})
    slope, intercept = two - one, one - (two - one)
    width = max(1, round((target - intercept) / slope))
    return width, intercept + slope * width


# Slots: LoRA's "auto" (query/value) for MiniLM; for the ResNet the residual-block convolutions, which LoRA's
# "auto" would miss (it falls back to all-linear), so both methods name them explicitly.
TARGETS = {"digits-resnet": r".*\.layer\.\d+\.convolution"}


def method_entries(backbone: str, lora_rank: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    targets = {"target_modules": TARGETS[backbone]} if backbone in TARGETS else {}
    lora = {"name": "seq_lora", "label": f"lora_r{lora_rank}", "rank": lora_rank, **targets}
    target = adapter_parameters(backbone, "seq_lora", {"rank": lora_rank, **targets})
    entries, sizes = [lora], {lora["label"]: target}
    for decomposition in ("cp", "tr"):
        options = {"decomposition": decomposition, "cl_mode": "single", **targets}
        width, size = matched_width(backbone, options, target)
        label = f"metalora_{decomposition}"
        entries.append({"name": "metalora", "label": label, "mapping_width": width, **options})
        sizes[label] = size
    return entries, sizes


def step_seconds(run: dict[str, Any], task_position: int) -> float:
    """Mean optimizer-step time of the adapted task only (not the base session)."""
    record = run["per_task"][task_position]
    return record["train_s"] / record["steps"]


def eval_seconds(run: dict[str, Any], task_position: int) -> float:
    """Seconds per test sample in the evaluation after the adapted task."""
    record = run["per_task"][task_position]
    return record["eval_s"] / record["eval_samples"]


def run_setting(name: str, data: dict[str, Any], lora_rank: int, task_position: int, out: Path) -> list[list[str]]:
    backbone = data["backbone"]["name"]
    entries, sizes = method_entries(backbone, lora_rank)
    config = validate_config({**data, "method": entries})
    results = [result.results for result in run_experiment(config, out / name)]
    reference = results[0]
    rows = []
    for run in results:
        accuracy = run["accuracy_matrix"][task_position][task_position]
        step_ratio = step_seconds(run, task_position) / step_seconds(reference, task_position)
        eval_ratio = eval_seconds(run, task_position) / eval_seconds(reference, task_position)
        options = run["method_options"]
        knobs = f"rank {options['rank']}" if run["method"] == "seq_lora" else f"R {options[options['decomposition'] + '_rank']}, h {options['mapping_width']}"
        rows.append(
            [name, run["label"], knobs, str(sizes[run["label"]]), f"{accuracy:.3f}", f"{step_seconds(run, task_position) * 1000:.1f}",
             f"{step_ratio:.2f}x", f"{eval_ratio:.2f}x"]
        )
    return rows


def stream_cost(folder: Path) -> list[list[str]]:
    """Train-step and eval-time ratios of metalora vs seq_lora on the text stream runs, if present."""
    paths = {label: folder / label / "results.json" for label in ("seq_lora", "metalora")}
    if not all(path.is_file() for path in paths.values()):
        return []
    runs = {label: json.loads(path.read_text()) for label, path in paths.items()}  # one run's flat results.json
    base = runs["seq_lora"]
    rows = []
    for label, run in runs.items():
        rows.append(
            [label, f"{run['train_step_s'] / base['train_step_s']:.2f}x", f"{run['eval_samples_per_s']:.1f}",
             f"{base['eval_samples_per_s'] / run['eval_samples_per_s']:.2f}x", str(run["trainable_params_per_task"][-1]),
             str(run["stored_bytes_per_task"][-1]), str(run["method_metrics"].get("routing_accuracy", "—"))]
        )
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default="../shared/data/cl_benchmark", help="json_dir with the text tasks")
    parser.add_argument("--text-tasks", nargs="+", default=["sst2", "mnli"])
    parser.add_argument("--max-train", type=int, default=300)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--text-epochs", type=int, default=2)
    parser.add_argument("--text-lora-rank", type=int, default=12)
    parser.add_argument("--digits-epochs", type=int, default=10)
    parser.add_argument("--digits-lora-rank", type=int, default=4)
    parser.add_argument("--base-epochs", type=int, default=30)
    parser.add_argument("--stream-runs", default="runs/bench_metalora_text")
    args = parser.parse_args()
    out = Path(args.out)
    lock = wait_for_the_machine(Path(__file__).resolve().parent.parent / "runs" / ".benchmark.lock")  # one benchmark at a time
    common = {"seed": 0, "head": {"type": "linear"}}
    rows: list[list[str]] = []
    for task in args.text_tasks:
        data = {
            **common,
            "backbone": {"name": "minilm-l6"},
            "stream": {"source": "json_dir", "path": args.data, "tasks": [task], "scenario": "task_incremental",
                       "max_train_per_task": args.max_train, "max_test_per_task": args.max_test},
            "train": {"epochs": args.text_epochs, "batch_size": 16, "eval_batch_size": 64, "lr": 1e-3, "head_lr": 1e-2,
                      "max_length": 128, "progress": False},
        }
        rows += run_setting(f"text {task}", data, args.text_lora_rank, 0, out)
    digits = {
        **common,
        "backbone": {"name": "digits-resnet"},
        "stream": {"source": "digits", "classes_per_task": 5, "scenario": "task_incremental"},
        "train": {"epochs": args.digits_epochs, "batch_size": 32, "eval_batch_size": 64, "lr": 1e-3, "head_lr": 1e-2,
                  "base_session_epochs": args.base_epochs, "base_session_lr": 1e-3, "progress": False},
    }
    rows += run_setting("digits-resnet 5-9", digits, args.digits_lora_rank, 1, out)
    lock.close()
    parts = [
        f"Text: {args.max_train} train / {args.max_test} test examples per task, {args.text_epochs} epochs, MiniLM query/value "
        f"slots. Digits: `digits-resnet` base-trained {args.base_epochs} epochs on digits 0-4, then {args.digits_epochs} "
        "epochs on digits 5-9 with the backbone frozen, block convolutions adapted. Adapter parameters exclude the "
        "head; step and eval time are relative to the LoRA row of the same setting (eval time includes MetaLoRA's "
        "frozen feature pass).",
        "",
        table(["setting", "method", "knobs", "adapter params", "accuracy", "train step ms", "step time vs LoRA",
               "eval time vs LoRA"], rows),
        "",
    ]
    cost = stream_cost(Path(args.stream_runs))
    if cost:
        parts += [
            f"Serving cost on the text stream (runs in `{args.stream_runs}`, section `metalora_text_stream`): eval time "
            "ratio = seq_lora eval samples/s over the method's (target <= 1.5x).",
            "",
            table(["method", "train step vs seq_lora", "eval samples/s", "eval time vs seq_lora", "trainable params (last task)",
                   "stored bytes (last task)", "routing accuracy"], cost),
            "",
        ]
    body = "\n".join(parts)
    path = write_section("metalora_single_task", "MetaLoRA single-task (the paper's setting) and serving cost", body)
    print(body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
