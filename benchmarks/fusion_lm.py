"""Fusion of language-model LoRAs (issue 23): one LoRA per instruction task on SmolLM2-135M-Instruct, fused by every
merge baseline and by ICM-Fusion, each task scored by greedy exact match with the fused adapter and normalised by
that task's own LoRA.

    python benchmarks/fusion_lm.py run    [--seeds 0 1 2] [--icm KEY=VALUE ...]
    python benchmarks/fusion_lm.py render
    python benchmarks/fusion_lm.py finish --seeds 0 --stopped-after-min 60   # a stopped run's measured rows

`run` writes docs/results/fusion_lm/seed<k>.json (skipping seeds already there; the task LoRAs resume from
runs/fusion_lm/); `render` writes docs/results/fusion_lm.md. Rows: no LoRA, each task's own LoRA, every merge,
LoRAHub, ICM-Fusion (with the knobs given by --icm, reported on the page).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, ROOT, machine, mean_std, spread_rule, timed_alone  # noqa: E402

NAME = "fusion_lm"
SETUP: dict[str, Any] = {
    "data": "../shared/data/cl_benchmark",
    "tasks": ["sst2", "mnli", "qqp", "wic"],
    "train": 64,
    "test": 40,
    "examples": 16,  # per task, from its training split: the support set of LoRAHub and ICM-Fusion
    "backbone": "smollm2-135m",
    "lora": {"name": "seq_lora", "rank": 8, "alpha": 32.0, "dropout": 0.1},
    "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 20, "lr": 1.0e-3, "max_length": 160, "progress": False},
}
MERGES = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic"]


def task_config(task: str, seed: int) -> Any:
    from loracl.config import validate_config

    return validate_config({
        "seed": seed,
        "backbone": {"name": SETUP["backbone"]},
        "stream": {"source": "json_dir", "path": str((ROOT / SETUP["data"]).resolve()), "tasks": [task],
                   "max_train_per_task": SETUP["train"], "max_test_per_task": SETUP["test"]},
        "task_model": {"kind": "language", "scoring": "generate", "max_new_tokens": 8},
        "train": SETUP["training"],
        "method": [SETUP["lora"]],
    })


def train_task_loras(seed: int) -> list[Path]:
    """One seq_lora per task (resumable), exported as PEFT folders."""
    from loracl.engine import run_experiment
    from loracl.engine.export import export_run_task

    folders = []
    for task in SETUP["tasks"]:
        out = ROOT / "runs" / NAME / f"seed{seed}" / task
        adapter = out / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            run_experiment(task_config(task, seed), out)
            export_run_task(out / "seq_lora", -1, adapter)
        folders.append(adapter)
    return folders


def run_seed(seed: int, icm_overrides: dict[str, Any], partial: Path | None = None) -> dict[str, Any]:
    from loracl.backbones.registry import load_backbone
    from loracl.config import TaskModelConfig
    from loracl.data.build import load_stream
    from loracl.fusion import FUSION_METHODS, LoraHost, TaskSupport, fuse, read_adapter
    from loracl.task_models.language import LanguageTaskModel

    started = time.perf_counter()
    folders = train_task_loras(seed)
    adapters = [read_adapter(folder, name=task) for folder, task in zip(folders, SETUP["tasks"])]
    config = task_config(SETUP["tasks"][0], seed)
    stream_config = config.stream.model_copy(update={"tasks": SETUP["tasks"]})
    stream = load_stream(stream_config, seed)
    backbone = load_backbone(SETUP["backbone"], max_length=SETUP["training"]["max_length"], seed=seed)
    model = LanguageTaskModel(backbone, TaskModelConfig(kind="language", max_new_tokens=8)).eval()
    host = LoraHost(backbone, sorted(adapters[0].pairs))
    supports = [
        TaskSupport(model.collate(task.train, list(range(min(SETUP["examples"], len(task.train)))), task, True), answer_model=model)
        for task in stream.tasks
    ]

    @torch.no_grad()
    def score(pairs: dict | None) -> list[float]:
        """Exact match on every task's test split with `pairs` as the only LoRA (None: the bare model)."""
        if pairs is None:
            host.remove()
            for layer in host.layers.values():
                layer.disabled_branches = set(layer.branches)
        else:
            host.set_adapter(pairs)
        accuracies = []
        for task in stream.tasks:
            correct = 0.0
            for start in range(0, len(task.test), SETUP["training"]["eval_batch_size"]):
                indices = list(range(start, min(start + SETUP["training"]["eval_batch_size"], len(task.test))))
                batch = {
                    "inputs": model.collate(task.test, indices, task, False),
                    "labels": torch.tensor([task.test.labels[i] for i in indices]),
                    "example_keys": [(task.name, "test", i) for i in indices],
                }
                predictions = model.predict(batch)
                correct += float(model.example_scores(predictions, batch, task, stream.scenario)["accuracy"].sum())
            accuracies.append(correct / len(task.test))
        host.remove()
        return accuracies

    # rows already measured for this seed (a killed run keeps them: ICM-Fusion alone can take most of an hour on CPU)
    done = json.loads(partial.read_text()) if partial is not None and partial.exists() else {}
    rows: dict[str, Any] = done.get("rows", {})
    reports = done.get("reports", {})

    def keep() -> None:
        if partial is not None:
            partial.write_text(json.dumps({"rows": rows, "reports": reports}))

    if "no_lora" not in rows:
        rows["no_lora"] = {"per_task": score(None)}
        keep()
    if "own_lora" not in rows:
        rows["own_lora"] = {"per_task": [score(adapter.pairs)[index] for index, adapter in enumerate(adapters)]}
        keep()
    methods = [method for method in MERGES if method in FUSION_METHODS] + ["lorahub", "icm"]
    for method in methods:
        if method in rows:
            continue
        options = {"icm": icm_overrides} if method == "icm" else {}
        uses_examples = method in ("lorahub", "icm")
        outcome = fuse(adapters, method, options, host=host if uses_examples else None, supports=supports if uses_examples else None)
        rows[method] = {"per_task": score(outcome.adapter), "fusion_s": outcome.report.get("fusion_s")}
        reports[method] = {key: value for key, value in outcome.report.items() if isinstance(value, (int, float, str)) and key != "method"}
        print(f"seed {seed} {method}: {rows[method]['per_task']}", flush=True)
        keep()
    return seed_record(seed, icm_overrides, rows, reports, time.perf_counter() - started)


def seed_record(seed: int, icm_overrides: dict[str, Any], rows: dict[str, Any], reports: dict[str, Any], wall_s: float | None) -> dict[str, Any]:
    """One seed's result file: every measured row normalised by each task's own LoRA; rows not measured (a run
    stopped by `finish`) are listed under `unfinished`."""
    own = rows["own_lora"]["per_task"]
    for row in rows.values():
        row["normalised"] = [acc / base if base > 0 else None for acc, base in zip(row["per_task"], own)]
        valid = [value for value in row["normalised"] if value is not None]
        row["mean_normalised"] = statistics.mean(valid) if valid else None
        row["mean_accuracy"] = statistics.mean(row["per_task"])
    expected = ["no_lora", "own_lora", *MERGES, "lorahub", "icm"]
    return {"seed": seed, "setup": SETUP, "icm_options": icm_overrides, "rows": rows, "reports": reports,
            "unfinished": [label for label in expected if label not in rows], "wall_s": wall_s, **machine()}


def command_run(args: argparse.Namespace) -> None:
    from loracl.config import parse_override

    overrides: dict[str, Any] = {}
    for text in args.icm:
        path, value = parse_override(text)
        overrides[path[0]] = value
    folder = RESULTS / NAME
    folder.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        target = folder / f"seed{seed}.json"
        if target.exists():
            continue
        partial = ROOT / "runs" / NAME / f"seed{seed}" / "rows.json"
        partial.parent.mkdir(parents=True, exist_ok=True)
        record = run_seed(seed, overrides, partial)
        if args.shared_cpu:
            record["shared_cpu"] = True
        target.write_text(json.dumps(record, indent=1) + "\n")


def command_finish(args: argparse.Namespace) -> None:
    """Write the result file of a seed whose run was stopped, from the rows it kept (the rest listed as unfinished)."""
    from loracl.config import parse_override

    overrides = {parse_override(text)[0][0]: parse_override(text)[1] for text in args.icm}
    for seed in args.seeds:
        partial = ROOT / "runs" / NAME / f"seed{seed}" / "rows.json"
        target = RESULTS / NAME / f"seed{seed}.json"
        if target.exists() or not partial.exists():
            continue
        done = json.loads(partial.read_text())
        record = seed_record(seed, overrides, done["rows"], done.get("reports", {}), None)
        record["stopped_after_min"] = args.stopped_after_min
        target.write_text(json.dumps(record, indent=1) + "\n")
        print(f"seed {seed}: wrote {target} (unfinished: {record['unfinished']})")


def fusion_table(records: list[dict[str, Any]]) -> list[str]:
    """Mean ± sd over seeds of each row: mean normalised accuracy, mean raw accuracy, fusion seconds."""
    labels = list(records[0]["rows"])
    lines = ["| row | seeds | normalised accuracy | exact match | fusion s (seeds timed alone) |", "|---|---|---|---|---|"]
    for label in labels:
        values = [r["rows"][label] for r in records if label in r["rows"]]
        seconds = [r["rows"][label]["fusion_s"] for r in timed_alone(records) if r["rows"].get(label, {}).get("fusion_s") is not None]
        lines.append(f"| {label} | {len(values)} | {mean_std([v['mean_normalised'] for v in values])} | "
                     f"{mean_std([v['mean_accuracy'] for v in values])} | {mean_std(seconds) if seconds else '-'} |")
    return lines


def load_records() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted((RESULTS / NAME).glob("seed*.json"))]


def verdict(records: list[dict[str, Any]]) -> list[str]:
    """ICM-Fusion against the 0.90 target and against the best merge, by the spread rule."""
    if not records:
        return []
    if any("icm" not in record["rows"] for record in records):
        stopped = [record for record in records if "icm" not in record["rows"]][0]
        return [f"- ICM-Fusion: not measured. Its run was stopped after {stopped.get('stopped_after_min')} minutes on this 2-core"
                f" CPU before ICM-Fusion finished (rows not measured: {', '.join(stopped.get('unfinished', []))}); the 0.90"
                " target is unmeasured. The table shows the rows that were."]
    normalised = {label: [r["rows"][label]["mean_normalised"] for r in records] for label in records[0]["rows"]}
    merges = [label for label in normalised if label not in ("no_lora", "own_lora", "icm")]
    best = max(merges, key=lambda label: statistics.mean(normalised[label]))
    delta, rule = spread_rule(normalised["icm"], normalised[best])
    below = [label for label in merges if spread_rule(normalised["icm"], normalised[label])[0] < 0]
    state = target_state(normalised["icm"])
    return [
        f"- ICM-Fusion: {mean_std(normalised['icm'])} of each task's own LoRA (target {TARGET:.2f}: {state}).",
        f"- Best other fusion `{best}`: {mean_std(normalised[best])}; ICM-Fusion minus it: {delta:+.3f} ({rule}).",
        f"- ICM-Fusion's mean is below {len(below)} of the {len(merges)} other fusions ({', '.join(f'`{label}`' for label in below) or 'none'}).",
        f"- No LoRA: {mean_std(normalised['no_lora'])}.",
        *spread_line(normalised, merges),
        *generator_fit(records, in_the_way=not state.startswith("reached")),
    ]


def spread_line(normalised: dict[str, list[float]], merges: list[str]) -> list[str]:
    """ICM-Fusion's seed-to-seed spread beside the other fusions' (nothing with one seed)."""
    if len(normalised["icm"]) < 2:
        return []
    spreads = [statistics.stdev(normalised[label]) for label in merges]
    return [f"- Seed spread (standard deviation of the normalised accuracy): ICM-Fusion ±{statistics.stdev(normalised['icm']):.3f},"
            f" the other fusions ±{min(spreads):.3f} to ±{max(spreads):.3f}."]


TARGET = 0.90  # the target for ICM-Fusion's mean normalised accuracy


def target_state(values: list[float]) -> str:
    """Whether the target is reached, by the spread rule: the mean's one-standard-deviation band wholly above it,
    wholly below it, or across it (undecided); one seed decides nothing."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{'above' if mean >= TARGET else 'below'} it on one seed: undecided"
    spread = statistics.stdev(values)
    if mean - spread >= TARGET:
        return "reached beyond the spread"
    if mean + spread < TARGET:
        return "not reached, beyond the spread"
    return f"the mean is {'above' if mean >= TARGET else 'below'} it and the spread (±{spread:.3f}) crosses it: undecided"


# Below this share of its training LoRAs' variance the F-VAE's decoded LoRAs are called blurred: a round trip that
# loses a tenth of the variance already moves a LoRA by a third of its norm.
GENERATOR_FIT = 0.9


def generator_fit(records: list[dict[str, Any]], in_the_way: bool = True) -> list[str]:
    """How much of its training LoRAs' variance the F-VAE reproduces (what stands in the way, while the target is not
    reached beyond the spread), and what a fusion costs."""
    from loracl.fusion.icm_fusion import IcmFusionOptions

    fitted = [record for record in records if "final_reconstruction_mse" in record.get("reports", {}).get("icm", {})]
    if not fitted:
        return []
    reports = [record["reports"]["icm"] for record in fitted]
    mse = [report["final_reconstruction_mse"] for report in reports]
    scale = [report["final_target_mean_square"] for report in reports]
    explained = [1 - error / square for error, square in zip(mse, scale)]
    schedules = {(options.warm_start_steps, options.meta_steps) for options in
                 (IcmFusionOptions(**record.get("icm_options", {})) for record in fitted)}
    steps = " or ".join(f"{warm} warm-start and {meta} meta" for warm, meta in sorted(schedules))
    seconds = [record["reports"]["icm"]["fusion_s"] for record in timed_alone(fitted)]
    blurred = statistics.mean(explained) < GENERATOR_FIT
    lines = [
        f"- {'What stands in the way: the' if blurred and in_the_way else 'The'} F-VAE after {steps} steps reproduces its training LoRAs with mean squared error {mean_std(mse)} against their mean"
        f" square {mean_std(scale)} (z-scored weights): it keeps {mean_std(explained)} of their variance"
        + (f", below {GENERATOR_FIT}, so what it decodes is a blurred LoRA before any fusion rule acts." if blurred else "."),
    ]
    if seconds:
        machines = sorted({record["machine"] for record in timed_alone(fitted)})
        lines.append(f"- The whole ICM-Fusion (F-VAE training, task vectors, in-context steps through the model) took {mean_std(seconds)} s"
                     f" per fusion on {', '.join(machines)} ({len(seconds)} seed(s) not flagged as sharing the CPU).")
    return lines


def command_render(args: argparse.Namespace) -> None:
    records = load_records()
    if not records:
        print("no results yet")
        return
    lines = [
        "# fusion_lm: fusing language-model LoRAs, measured",
        "",
        "Generated by `python benchmarks/fusion_lm.py render` from `docs/results/fusion_lm/seed*.json`. One seq_lora per task",
        f"({', '.join(SETUP['tasks'])}; {SETUP['train']} train / {SETUP['test']} test, rank {SETUP['lora']['rank']} on q/v, 1 epoch) on"
        f" `{SETUP['backbone']}`; each fused adapter is scored on every task by greedy exact match and divided by that task's",
        f"own LoRA (normalised accuracy, mean over tasks). LoRAHub and ICM-Fusion see {SETUP['examples']} training examples per task"
        " (ICM-Fusion's in-context steps on the answer loss).",
        f"ICM-Fusion options beyond its defaults: {records[0].get('icm_options') or 'none'}.",
        "",
        "## Verdict",
        "",
        *verdict(records),
        "",
        "## Every row",
        "",
        *fusion_table(records),
        "",
    ]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))
    print("wrote", RESULTS / f"{NAME}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "render", "finish"])
    parser.add_argument("--stopped-after-min", type=int, default=None, help="finish: how long the stopped run ran")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--icm", nargs="*", default=[], help="ICM-Fusion options as KEY=VALUE (e.g. warm_start_steps=100)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shared-cpu", action="store_true", help="run: the seed shares the CPU with other work; its times are left out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"run": command_run, "render": command_render, "finish": command_finish}[args.command](args)


if __name__ == "__main__":
    main()
