"""Run method entries on a stream config and write their accuracy matrices and metrics to docs/results/legacy.md.

Every method issue measures with this script, so all numbers come from one harness, same seed and budget:

    python benchmarks/stream_benchmark.py --config configs/text_stream.yaml --section text_stream_baselines \
        --title "Text stream: baselines" --method seq_lora --method inc_lora \
        --method '{name: probe, head: {type: prototype}}' --out runs/bench_text_baselines

A --method is a registry name or a YAML mapping (a method entry with knobs). Runs resume from --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from loracl.config import load_config  # noqa: E402
from loracl.data.build import load_stream  # noqa: E402
from loracl.engine import run_experiment  # noqa: E402
from loracl.report.render import markdown_table, matrix_rows, summary_header, summary_rows  # noqa: E402


def relative_step_time(runs: list[dict], reference: str) -> dict[str, float]:
    """Each run's mean optimizer-step time divided by the reference run's (e.g. seq_lora)."""
    by_label = {run["label"]: run for run in runs}
    if reference not in by_label or not by_label[reference].get("train_step_s"):
        return {}
    base = by_label[reference]["train_step_s"]
    return {run["label"]: run["train_step_s"] / base for run in runs if run.get("train_step_s")}


def render(runs: list[dict], reference: str) -> str:
    parts = [markdown_table(summary_header(runs), summary_rows(runs)), ""]
    ratios = relative_step_time(runs, reference)
    if ratios:
        rows = [[label, f"{ratio:.2f}x"] for label, ratio in ratios.items()]
        parts += [f"Train step time relative to `{reference}`:", "", markdown_table(["method", "step time"], rows), ""]
    cost_rows = []
    for run in runs:
        cost_rows.append(
            [
                run["label"],
                " / ".join(str(p) for p in run["trainable_params_per_task"]),
                " / ".join(str(b) for b in run["stored_bytes_per_task"]),
                " / ".join(str(b) for b in run["stored_bytes_cumulative"]),
            ]
        )
    parts += [
        "Cost per task (trainable parameters include the head rows trained on that task; stored bytes are every "
        "tensor beyond the frozen backbone):",
        "",
        markdown_table(["method", "trainable params", "stored bytes per task", "stored bytes cumulative"], cost_rows),
        "",
    ]
    for run in runs:
        header, rows = matrix_rows(run)
        parts += [f"**{run['label']}**", "", markdown_table(header, rows), ""]
        if run.get("method_metrics"):
            parts += [f"Method metrics: `{run['method_metrics']}`", ""]
    return "\n".join(parts)


def wait_for_the_machine(lock_path: Path):
    """Hold an exclusive lock while training: benchmarks run one at a time, or their timings mean nothing.

    On a small machine several benchmarks started at once thrash the CPU (each torch process spawns its own
    threads), so every one of them runs several times slower than the same runs in a queue.
    """
    import fcntl
    import os

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        print(
            f"another benchmark holds {lock_path} ({handle.read().strip()}); waiting for it to finish. "
            "Benchmarks run one at a time so that their speed figures are real.",
            flush=True,
        )
        fcntl.flock(handle, fcntl.LOCK_EX)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}: {' '.join(sys.argv[1:])[:300]}")
    handle.flush()
    return handle


def collect_run(folders: list[str], entry, stream_summary: dict, seed: int) -> dict:
    """A finished run's results.json from the first folder holding the entry's label, refused unless it ran this
    method with these options (defaults included: a changed default is a different run) on this stream."""
    label = entry.run_label
    for folder in folders:
        path = Path(folder) / label / "results.json"
        if path.is_file():
            run = json.loads(path.read_text(encoding="utf-8"))
            wanted = entry.options.model_dump(mode="json")
            defaults = type(entry.options)().model_dump(mode="json")
            stored = run["method_options"]
            # an option added after the run was made counts as its default there (the code path it now guards)
            changed = sorted(k for k in wanted if stored.get(k, defaults[k]) != wanted[k])
            if run["method"] != entry.name or changed:
                raise SystemExit(f"{path}: ran `{run['method']}` with other options than the entry ({', '.join(changed)})")
            for key in ("tasks", "train_sizes", "test_sizes"):
                if run["stream"].get(key) != stream_summary.get(key):
                    raise SystemExit(f"{path}: stream {key} {run['stream'].get(key)} differ from the config's")
            if run["seed"] != seed:
                raise SystemExit(f"{path}: seed {run['seed']} is not the config's {seed}")
            return run
    raise SystemExit(f"no finished run labelled {label!r} in {folders}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--method", action="append", required=True, help="registry name or YAML mapping")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--section", required=True, help="section id in docs/results/legacy.md")
    parser.add_argument("--title", required=True)
    parser.add_argument("--out", required=True, help="run folder (resumable)")
    parser.add_argument("--reference", default="seq_lora", help="label whose step time is 1.0x")
    parser.add_argument("--note", default="", help="a sentence printed under the table")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--no-queue", action="store_true", help="do not wait for other benchmarks (speed figures then share the CPU)"
    )
    parser.add_argument(
        "--collect",
        action="append",
        default=[],
        help="run folder(s) to read finished runs from (OUT/<label>/results.json) instead of training: "
        "a section that compares runs made by several benchmark invocations",
    )
    args = parser.parse_args()
    entries = [yaml.safe_load(item) if item.strip().startswith("{") else {"name": item} for item in args.method]
    config = load_config(args.config, [*args.set, "train.progress=false", f"method={yaml.safe_dump(entries, default_flow_style=True).strip()}"])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.collect:
        summary = load_stream(config.stream, config.seed).summary()
        runs = [collect_run(args.collect, entry, summary, config.seed) for entry in config.method]
    else:
        lock = None if args.no_queue else wait_for_the_machine(Path(__file__).resolve().parent.parent / "runs" / ".benchmark.lock")
        try:
            results = run_experiment(config, Path(args.out))
        finally:
            if lock is not None:
                lock.close()
        runs = [result.results for result in results]
    body = render(runs, args.reference)
    if args.note:
        body = args.note + "\n\n" + body
    path = write_section(args.section, args.title, body)
    print(body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
