"""Benchmarks as data: an experiment file in benchmarks/experiments/ names a base config, rows (method entries) and
seeds; every row x seed is one run whose results land as JSON in docs/results/<experiment>/<label>/seed<k>.json
(metrics, matrices, costs, machine, versions, commit, date); pages are rendered from those files alone.

    python benchmarks/bench.py run     benchmarks/experiments/text_stream.yaml [--only LABEL ...] [--seeds 0 1]
    python benchmarks/bench.py render  benchmarks/experiments/text_stream.yaml
    python benchmarks/bench.py summary            # docs/results.md, its figures, the README's headline, the method pages' blocks
    python benchmarks/bench.py methods            # only the measured blocks of docs/methods/*.md

`run` skips what is measured and resumes a killed run from its checkpoints under runs/<experiment>/.

A row may carry `ablates: <label>` (its method's mechanism switched off, judged against that row), `lever: true`
(a knob tried to reach a target, kept out of the headline) and `priority: true` (all its seeds first). An
experiment may list `pairs` (single-task rows against a reference that then belongs to its partner's page) or
`matched_floors` (a row against the floor with its own router and budget, in the Verdict section), and may say
`readme: false` (a lever experiment: on docs/results.md, not in the README's headline).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from loracl.report.compare import halving_rule, mean_std, spread_rule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from costs import costs_section, several_processes_section  # noqa: E402
from records import RESULTS, ROOT, interleaved_rounds, machine  # noqa: E402, F401 - interleaved_rounds re-exported for instruct.py


def load_experiment(path: str) -> dict[str, Any]:
    """An experiment file, its `matched_floors` checked to be pairs of the file's row labels."""
    experiment = yaml.safe_load(Path(path).read_text())
    labels = {row["label"] for row in experiment["rows"]} | {"peft_seq_lora"}
    for entry in experiment.get("matched_floors", []):
        if not (isinstance(entry, list) and len(entry) == 2 and set(map(str, entry)) <= labels):
            raise SystemExit(f"{path}: matched_floors entry {entry!r} is not a pair [row, floor] of this file's row labels")
    return experiment


def row_config(experiment: dict[str, Any], row: dict[str, Any], seed: int) -> dict[str, Any]:
    """The loracl config of one row and seed (the experiment's base with the row's method entry)."""
    config = copy.deepcopy(experiment["base"])
    config["seed"] = seed
    if "data" in experiment:  # a folder of task folders, relative to the repository root
        config["stream"]["path"] = str((ROOT / experiment["data"]).resolve())
    config["method"] = [{"name": row["name"], "label": row["label"], **row.get("options", {})}]
    config["stream"].update(row.get("stream", {}))  # a row may train on its own tasks (single-task comparisons)
    return config


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """What the page needs from a results.json: metrics, matrices, costs (no per-task records)."""
    keys = [
        "method", "label", "seed", "accuracy_matrix", "test_sizes", "avg_accuracy", "forgetting", "bwt",
        "trainable_params_per_task", "stored_bytes_cumulative", "train_samples_per_s", "eval_samples_per_s",
        "peak_memory_bytes", "wall_s", "method_options",
    ]
    out = {key: results.get(key) for key in keys}
    if any("metric_rows" in record for record in results["per_task"]):
        out["rouge_l_rows"] = [record.get("metric_rows", {}).get("rouge_l") for record in results["per_task"]]
    # the scalars a method reports about its own mechanism (O-LoRA's final subspace overlap, MetaLoRA's routing
    # accuracy): they show whether a switch changed what it is meant to change, beside what it did to accuracy
    diagnostics = {key: value for key, value in (results.get("method_metrics") or {}).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if diagnostics:
        out["diagnostics"] = diagnostics
    return out


def timed_alone(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records not flagged `shared_cpu` (runs with --shared-cpu): the only ones whose speeds enter a ratio."""
    return [record for record in records if not record.get("shared_cpu")]


def result_path(name: str, label: str, seed: int) -> Path:
    return RESULTS / name / label / f"seed{seed}.json"


def command_run(args: argparse.Namespace) -> None:
    """Every row x seed without a result file, each in its own process (so peak memory is that run's alone)."""
    experiment = load_experiment(args.experiment)
    # seed by seed, so that every row has its first seed before any row has its third; single-seed ablations and
    # the PEFT comparison after the headline rows' seeds
    jobs = []
    for index, row in enumerate(experiment["rows"]):
        for seed in row["seeds"]:
            key = (len(row["seeds"]) == 1 and "ablates" in row, seed > 0 and not row.get("priority", False), seed, index)
            jobs.append((key, row["label"], seed))
    if experiment.get("peft_row"):  # the PEFT sequential LoRA written as a PEFT user writes it (instruct.py peft)
        jobs.append(((False, False, 1, -1), "peft_seq_lora", 0))
    for _, label, seed in sorted(jobs):
        if (args.only and label not in args.only) or (args.seeds and seed not in args.seeds):
            continue
        if result_path(experiment["name"], label, seed).exists():
            continue
        script = str(Path(__file__).with_name("instruct.py")) if label == "peft_seq_lora" else __file__
        verb = "peft" if label == "peft_seq_lora" else "one"
        command = [sys.executable, script, verb, args.experiment, "--only", label, "--seeds", str(seed)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.shared_cpu:
            command.append("--shared-cpu")
        if subprocess.run(command).returncode != 0:  # one failing row must not stop the others
            print(f"{label} seed {seed}: failed (its traceback is above)", flush=True)


def command_one(args: argparse.Namespace) -> None:
    """One row and seed: train, evaluate, write its result file."""
    from loracl.config import validate_config
    from loracl.engine import run_experiment

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    experiment = load_experiment(args.experiment)
    [row] = [row for row in experiment["rows"] if row["label"] == args.only[0]]
    [seed] = args.seeds
    config = validate_config(row_config(experiment, row, seed))
    started = time.perf_counter()
    [result] = run_experiment(config, ROOT / "runs" / experiment["name"] / f"seed{seed}")
    target = result_path(experiment["name"], row["label"], seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {**compact(result.results), "config": row_config(experiment, row, seed), **machine()}
    if getattr(args, "shared_cpu", False):
        record["shared_cpu"] = True
    target.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{row['label']} seed {seed}: {result.results['avg_accuracy']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)


# ----- render (mean_std and spread_rule: loracl.report.compare, shared with `loracl report A B ...`) ----------
def setting_line(experiment: dict[str, Any]) -> str:
    """One sentence naming the stream, its size, the training budget and the model."""
    base = experiment["base"]
    stream, train = base["stream"], base["train"]
    tasks = ", ".join(stream["tasks"]) if "tasks" in stream else f"{stream['source']} tasks"
    own = list(dict.fromkeys(task for row in experiment["rows"] for task in row.get("stream", {}).get("tasks", [])))
    if own:  # rows that train on their own tasks (single-task comparisons)
        tasks = "each row on one task of " + ", ".join(list(dict.fromkeys(stream.get("tasks", []) + own)))
    sizes = f"{stream.get('max_train_per_task', 'all')} train / {stream.get('max_test_per_task', 'all')} test per task"
    session = f", a base session of {train['base_session_epochs']} epochs" if train.get("base_session_epochs") else ""
    return (
        f"Stream: {tasks} ({sizes}, {train['epochs']} epoch(s), batch {train['batch_size']}, lr {train['lr']}{session}),"
        f" `{base['backbone']['name']}`, {experiment.get('metric', 'accuracy')}."
    )


def load_rows(name: str, results: Path = RESULTS) -> dict[str, list[dict[str, Any]]]:
    """label -> the result records of every measured seed of an experiment."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((results / name).glob("*/seed*.json")):
        rows.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    return rows


def present(records: list[dict[str, Any]], key: str) -> list[float]:
    """The records' values under `key`, nulls left out (joint has no forgetting)."""
    return [r[key] for r in records if r.get(key) is not None]


def compare_on_shared_seeds(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> tuple[list[int], float, str, str]:
    """First minus second over their shared seeds: the seeds, the accuracy difference and verdict, and a
    '; forgetting D (verdict)' suffix where both rows have forgetting."""
    seeds = sorted({r["seed"] for r in first} & {r["seed"] for r in second})
    first = [r for r in first if r["seed"] in seeds]
    second = [r for r in second if r["seed"] in seeds]
    delta, verdict = spread_rule([r["avg_accuracy"] for r in first], [r["avg_accuracy"] for r in second])
    # a mechanism against forgetting may show there and not in accuracy (a row that keeps more but learns less)
    forgetting = ""
    if present(first, "forgetting") and present(second, "forgetting"):
        delta_f, verdict_f = spread_rule(present(first, "forgetting"), present(second, "forgetting"))
        forgetting = f"; forgetting {delta_f:+.3f} ({verdict_f})"
    return seeds, delta, verdict, forgetting


def ablation_verdicts(experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]], labels: set[str] | None = None) -> list[str]:
    """Each measured ablation (`ablates` rows; those in `labels` when given) against its full row over their shared seeds."""
    lines = []
    for row in experiment["rows"]:
        label, full = row["label"], row.get("ablates")
        if full is None or (labels is not None and label not in labels) or label not in rows or full not in rows:
            continue
        seeds, delta, verdict, forgetting = compare_on_shared_seeds(rows[full], rows[label])
        lines.append(f"- `{full}` minus `{label}`: {delta:+.3f} average accuracy (seeds {seeds}; {verdict}){forgetting}.")
    return lines


def matched_floor_verdicts(experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """`matched_floors: [[row, floor], ...]`: a row against the floor with its own router and budget, over shared seeds."""
    lines = []
    for label, floor in experiment.get("matched_floors", []):
        if label not in rows or floor not in rows:
            continue
        seeds, delta, verdict, forgetting = compare_on_shared_seeds(rows[label], rows[floor])
        lines.append(f"- `{label}` against its matched floor `{floor}` (seeds {seeds}): average accuracy {delta:+.3f}"
                     f" ({verdict}){forgetting}.")
    return lines


def diagnostic_lines(order: list[str], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One table line per row and method diagnostic, over the records that carry it."""
    lines = []
    for label in order + sorted(set(rows) - set(order)):
        records = [r for r in rows.get(label, []) if r.get("diagnostics")]
        for key in sorted({key for r in records for key in r["diagnostics"]}):
            carrying = [r for r in records if key in r["diagnostics"]]
            seeds = ",".join(str(r["seed"]) for r in carrying)
            lines.append(f"| {label} | {seeds} | {key} | {mean_std([r['diagnostics'][key] for r in carrying])} |")
    return lines


def command_render(args: argparse.Namespace) -> None:
    experiment = load_experiment(args.experiment)
    name = experiment["name"]
    folder = RESULTS / name
    rows = load_rows(name)
    order = [row["label"] for row in experiment["rows"]] + ["peft_seq_lora"]
    ablations = {row["label"]: row["ablates"] for row in experiment["rows"] if "ablates" in row}
    reference = rows.get("seq_lora", [])
    ref_train = statistics.mean(r["train_samples_per_s"] for r in timed_alone(reference)) if timed_alone(reference) else None
    ref_eval = statistics.mean(r["eval_samples_per_s"] for r in timed_alone(reference) if r.get("eval_samples_per_s")) if timed_alone(reference) else None
    accuracy = {label: [r["avg_accuracy"] for r in records] for label, records in rows.items()}
    forgetting = {label: present(records, "forgetting") for label, records in rows.items()}
    lines = [
        f"# {name}: {experiment.get('title', 'measured')}",
        "",
        f"Generated by `python benchmarks/bench.py render {args.experiment}` from the JSON files in",
        f"`docs/results/{name}/`; nothing here is typed by hand. {setting_line(experiment)}",
        "",
    ]
    if reference and len(reference) > 0:
        lines += ["## Verdict", ""]
        verdicts = []
        for label in order:
            if label in ("seq_lora", "zero_shot", "joint", "peft_seq_lora") or label in ablations or label not in rows:
                continue
            delta, verdict = spread_rule(accuracy[label], accuracy["seq_lora"])
            halved = (f" ({halving_rule(forgetting[label], forgetting['seq_lora'])})"
                      if forgetting.get(label) and forgetting.get("seq_lora") else "")
            verdicts.append((delta, f"- `{label}`: average accuracy {delta:+.3f} against seq_lora ({verdict}); forgetting "
                             f"{mean_std(forgetting.get(label, []))} against {mean_std(forgetting['seq_lora'])}{halved}."))
        lines += [text for _, text in sorted(verdicts, key=lambda item: -item[0])]
        if "joint" in rows and verdicts:
            best = max((label for label in rows if label not in ablations and label not in ("joint", "peft_seq_lora", "zero_shot")),
                       key=lambda label: statistics.mean(accuracy[label]))
            delta, verdict = spread_rule(accuracy[best], accuracy["joint"])
            lines.append(f"- Best continual row `{best}` against joint (the upper bound): {delta:+.3f} ({verdict}).")
        lines += matched_floor_verdicts(experiment, rows)
        lines.append("")
    pairs = pair_verdicts(experiment, rows) if experiment.get("pairs") else []  # single-task comparisons
    if pairs:
        lines += ["## Verdict", "", "Each row against its matched reference over the same seeds: a difference counts only beyond the sum of the two"
                  " standard deviations; training and generation speed relative to the reference.", "",
                  *pairs, ""]
    lines += [
        "## Every row",
        "",
        "Mean ± standard deviation over the seeds listed (one value: one seed, no spread known). Average accuracy =",
        "mean of the last row of the accuracy matrix; forgetting and BWT as in loracl.metrics; ROUGE-L of the last row;",
        "stored bytes after the last task; train and generation samples/s relative to seq_lora's mean (left out for runs",
        "that shared the CPU with other work); peak RSS.",
        "",
        "| row | seeds | avg accuracy | forgetting | BWT | ROUGE-L | stored MB | train x | eval x | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in order + sorted(set(rows) - set(order)):
        records = rows.get(label)
        if not records:
            continue
        rouge = [statistics.mean(r["rouge_l_rows"][-1]) for r in records if r.get("rouge_l_rows") and r["rouge_l_rows"][-1]]
        stored = [r["stored_bytes_cumulative"][-1] / 1e6 for r in records if r.get("stored_bytes_cumulative")]
        train_x = [r["train_samples_per_s"] / ref_train for r in timed_alone(records) if r.get("train_samples_per_s") and ref_train]
        eval_x = [r["eval_samples_per_s"] / ref_eval for r in timed_alone(records) if r.get("eval_samples_per_s") and ref_eval]
        memory = [r["peak_memory_bytes"] / 1e9 for r in records if r.get("peak_memory_bytes")]
        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in records)} | {mean_std(accuracy[label])}"
            f" | {mean_std([r.get('forgetting') for r in records])} | {mean_std([r.get('bwt') for r in records])}"
            f" | {mean_std(rouge)} | {mean_std(stored)} | {mean_std(train_x)} | {mean_std(eval_x)} | {mean_std(memory)} |"
        )
    if ablations:
        lines += ["", "## Mechanisms switched off", "",
                  "Each ablation against its full method over the same seeds; the rule above decides.", "",
                  *ablation_verdicts(experiment, rows)]
    diagnostics = diagnostic_lines(order, rows)
    if diagnostics:
        lines += ["", "## What each mechanism reports", "",
                  "The scalars a method records about its own mechanism (`method_metrics` in results.json), mean ± standard",
                  "deviation over the seeds whose records carry them; a row's ablation beside it shows whether the switch",
                  "changed what it is meant to change.", "",
                  "| row | seeds | diagnostic | value |", "|---|---|---|---|", *diagnostics]
    if "peft_seq_lora" in rows and reference:
        lines += ["", "## Against PEFT", ""]
        for record in rows["peft_seq_lora"]:
            ours = next((r for r in reference if r["seed"] == record["seed"]), None)
            if ours is not None:
                same = ours["accuracy_matrix"] == record["accuracy_matrix"]
                lines.append(f"- seed {record['seed']}: PEFT's sequential LoRA (the same batches and start weights) gives "
                             f"{'the same accuracy matrix as' if same else 'a different accuracy matrix from'} loracl's seq_lora.")
    speed = folder / "speed.json"
    if speed.exists():
        data = json.loads(speed.read_text())
        lines += [f"- Training speed, interleaved rounds in one process: loracl seq_lora {data['ours_samples_per_s']:.2f}"
                  f" samples/s, PEFT {data['peft_samples_per_s']:.2f} samples/s, ratio {data['ratio']:.2f} (median of"
                  f" {data['rounds']} rounds of {data['steps']} steps, batch {data['batch_size']}, mnli prompts; {data['machine']},"
                  f" {data['date']}). loracl computes vocabulary logits only at the answer positions."]
    lines += ["", "## Accuracy matrices (seed 0)", ""]
    for label in order:
        for record in rows.get(label, []):
            if record["seed"] != 0:
                continue
            size = len(record["accuracy_matrix"][0])
            lines += [f"**{label}**", "", "| after \\ on | " + " | ".join(f"task {j}" for j in range(size)) + " |",
                      "|---" * (size + 1) + "|"]
            for i, matrix_row in enumerate(record["accuracy_matrix"]):
                lines.append(f"| task {i} | " + " | ".join("" if v is None else f"{v:.2f}" for v in matrix_row) + " |")
            lines.append("")
    target = RESULTS / f"{name}.md"
    target.write_text("\n".join(lines) + "\n")
    print("wrote", target)




# ----- the results page: every experiment, verdict first ----------------------------------------------------
EXPERIMENTS = ROOT / "benchmarks" / "experiments"
FLOORS = ("zero_shot", "probe", "probe-prototype")


def experiment_paths(folder: Path = EXPERIMENTS) -> list[Path]:
    """The experiment files, in their `order` (the results page's order), then by name."""
    return sorted(folder.glob("*.yaml"), key=lambda path: (load_experiment(str(path)).get("order", 99), path.name))


def headline_labels(experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The rows a reader compares: floors, seq_lora, joint and every method with its defaults (no ablation, no lever)."""
    return [row["label"] for row in experiment["rows"] if "ablates" not in row and not row.get("lever") and row["label"] in rows]


def seen_task_curve(record: dict[str, Any]) -> list[float]:
    """Mean accuracy over the tasks seen so far, after each task (a joint run has one point)."""
    return [statistics.mean(value for value in row if value is not None) for row in record["accuracy_matrix"]]


def experiment_figures(experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The trade-off (accuracy against stored bytes) and the learning curves as PNG files; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    name = experiment["name"]
    labels = [label for label in headline_labels(experiment, rows) if rows[label][0].get("stored_bytes_cumulative")]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label in labels:
        accuracy = [r["avg_accuracy"] for r in rows[label]]
        stored = statistics.mean(r["stored_bytes_cumulative"][-1] for r in rows[label]) / 1e6
        error = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        axis.errorbar(max(stored, 1e-3), statistics.mean(accuracy), yerr=error, fmt="o", capsize=3)
        axis.annotate(label, (max(stored, 1e-3), statistics.mean(accuracy)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("stored after the last task (MB, log scale)")
    axis.set_ylabel("average accuracy (mean ± sd over seeds)")
    axis.set_title(f"{name}: accuracy against storage")
    figure.tight_layout()
    tradeoff = f"{name}_tradeoff.png"
    figure.savefig(RESULTS / tradeoff, dpi=110)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label in headline_labels(experiment, rows):
        curves = [seen_task_curve(r) for r in rows[label]]
        if len(curves[0]) < 2:
            continue
        mean = [statistics.mean(values) for values in zip(*curves)]
        axis.plot(range(1, len(mean) + 1), mean, marker="o", label=label)
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_xlabel("tasks trained")
    axis.set_ylabel("mean accuracy over the tasks seen")
    axis.set_title(f"{name}: accuracy after each task (mean over seeds)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    curves = f"{name}_curves.png"
    figure.savefig(RESULTS / curves, dpi=110)
    plt.close(figure)
    return [tradeoff, curves]


def headline_table(experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]], labels: list[str] | None = None) -> list[str]:
    """Mean ± sd of each headline row: accuracy, forgetting, BWT, storage and speed relative to seq_lora."""
    reference = timed_alone(rows.get("seq_lora", []))
    ref_train = statistics.mean(r["train_samples_per_s"] for r in reference) if reference else None
    ref_eval = statistics.mean(r["eval_samples_per_s"] for r in reference) if reference else None
    lines = ["| row | seeds | avg accuracy | forgetting | BWT | stored MB | train x | eval x |", "|---|---|---|---|---|---|---|---|"]
    for label in labels or headline_labels(experiment, rows):
        records = rows[label]
        train_x = [r["train_samples_per_s"] / ref_train for r in timed_alone(records) if r.get("train_samples_per_s") and ref_train]
        eval_x = [r["eval_samples_per_s"] / ref_eval for r in timed_alone(records) if r.get("eval_samples_per_s") and ref_eval]
        stored = [r["stored_bytes_cumulative"][-1] / 1e6 for r in records if r.get("stored_bytes_cumulative")]
        lines.append(
            f"| {label} | {len(records)} | {mean_std([r['avg_accuracy'] for r in records])} | {mean_std([r.get('forgetting') for r in records])}"
            f" | {mean_std([r.get('bwt') for r in records])} | {mean_std(stored)} | {mean_std(train_x)} | {mean_std(eval_x)} |"
        )
    return lines


def which_method_when(experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Statements derived from the numbers of one setting: the best continual row, what beats sequential LoRA
    beyond the spread, the cheapest row as good as the best, and what the floor and the upper bound say."""
    title = experiment.get("title", experiment["name"])
    labels = headline_labels(experiment, rows)
    methods = [label for label in labels if label not in FLOORS and label not in ("joint",)]
    if not methods:
        return []
    accuracy = {label: [r["avg_accuracy"] for r in rows[label]] for label in labels}
    best = max(methods, key=lambda label: statistics.mean(accuracy[label]))
    low, high = min(len(rows[label]) for label in methods), max(len(rows[label]) for label in methods)
    seeds = f"{low} seed{'s' if low > 1 else ''} per row" if low == high else f"{low}-{high} seeds per row"
    lines = [f"**{title}** (`{experiment['name']}`, {seeds}):"]
    lines.append(f"- Best continual row: `{best}` ({mean_std(accuracy[best])}).")
    if "seq_lora" in accuracy and best != "seq_lora":
        beats = [label for label in methods if label != "seq_lora" and "beyond" in spread_rule(accuracy[label], accuracy["seq_lora"])[1]
                 and statistics.mean(accuracy[label]) > statistics.mean(accuracy["seq_lora"])]
        lines.append(f"- Beyond the seed spread above sequential LoRA ({mean_std(accuracy['seq_lora'])}): "
                     f"{', '.join(f'`{label}`' for label in beats) if beats else 'none'}.")
    forgetting = {label: present(rows[label], "forgetting") for label in methods}
    if len(forgetting.get("seq_lora", [])) > 1:
        halved = [label for label in methods if label != "seq_lora" and halving_rule(forgetting[label], forgetting["seq_lora"]) == "halved"]
        def entry(label: str) -> str:
            # low forgetting is cheap for a row that learns little: say so where its accuracy trails beyond the spread
            delta, verdict = spread_rule(accuracy[label], accuracy["seq_lora"])
            trails = ", but accuracy below seq_lora's beyond the spread" if delta < 0 and "beyond" in verdict else ""
            return f"`{label}` ({mean_std(forgetting[label])}{trails})"

        lines.append(f"- Forgetting at most half sequential LoRA's ({mean_std(forgetting['seq_lora'])}; rows with two seeds or more): "
                     f"{', '.join(entry(label) for label in halved) if halved else 'none'}.")
    tied = [label for label in methods if label == best or "within" in spread_rule(accuracy[label], accuracy[best])[1]]
    stored = {label: statistics.mean(r["stored_bytes_cumulative"][-1] for r in rows[label]) for label in tied if rows[label][0].get("stored_bytes_cumulative")}
    if len(tied) > 1 and stored:
        cheapest = min(stored, key=stored.get)
        lines.append(f"- Not distinguishable from the best within the spread: {', '.join(f'`{label}`' for label in tied)};"
                     f" the one storing least is `{cheapest}` ({stored[cheapest] / 1e6:.2f} MB after the last task).")
        reference = timed_alone(rows.get("seq_lora", []))
        comparable = [label for label in tied if timed_alone(rows[label])]
        if reference and len(comparable) > 1:
            ref_eval = statistics.mean(r["eval_samples_per_s"] for r in reference)
            serving = {label: statistics.mean(r["eval_samples_per_s"] for r in timed_alone(rows[label])) / ref_eval for label in comparable}
            fastest = max(serving, key=serving.get)
            lines.append(f"- Cheapest to serve among those: `{fastest}` (evaluation {serving[fastest]:.2f}x seq_lora's speed;"
                         f" the slowest, `{min(serving, key=serving.get)}`, {min(serving.values()):.2f}x).")
    if "joint" in accuracy:
        delta, verdict = spread_rule(accuracy[best], accuracy["joint"])
        lines.append(f"- Against joint training (the upper bound, {mean_std(accuracy['joint'])}): {delta:+.3f} ({verdict}).")
    floors = [label for label in labels if label in FLOORS]
    for floor in floors:
        delta, verdict = spread_rule(accuracy[best], accuracy[floor])
        lines.append(f"- Floor `{floor}`: {mean_std(accuracy[floor])}; the best row against it {delta:+.3f} ({verdict}).")
    return lines


def pair_verdicts(experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """`pairs: [[row, reference], ...]`: each row's accuracy against its reference's, by the spread rule."""
    lines = []
    for label, reference in experiment["pairs"]:
        if label in rows and reference in rows:
            first = [r["avg_accuracy"] for r in rows[label]]
            second = [r["avg_accuracy"] for r in rows[reference]]
            delta, rule = spread_rule(first, second)
            mine, theirs = timed_alone(rows[label]), timed_alone(rows[reference])
            speeds = "speeds not comparable (measured on a shared CPU)"
            if mine and theirs:
                speed = statistics.mean(r["train_samples_per_s"] for r in mine) / statistics.mean(r["train_samples_per_s"] for r in theirs)
                serve = statistics.mean(r["eval_samples_per_s"] for r in mine) / statistics.mean(r["eval_samples_per_s"] for r in theirs)
                speeds = f"training {speed:.2f}x, generation {serve:.2f}x its speed"
            lines.append(f"- `{label}` against `{reference}`: {mean_std(first)} vs {mean_std(second)}, {delta:+.3f} ({rule}); {speeds}.")
    return lines


# ----- the method pages: a generated block per page, from the same JSON files ------------------------------
METHODS = ROOT / "docs" / "methods"
MEASURED_BEGIN, MEASURED_END = "<!-- measured:begin -->", "<!-- measured:end -->"
CONTEXT = (*FLOORS, "seq_lora", "joint")  # the rows a method's rows are read beside
# docs/methods/<page>.md -> the method names whose rows it reports (routed_inference: rows with the switch on)
PAGE_METHODS: dict[str, tuple[str, ...]] = {
    "baselines": ("seq_lora", "inc_lora", "joint", "o_lora", "inflora", "sd_lora"),
    "icm_fusion": ("icm_fusion",),
    "fm_lora": ("fm_lora",),
    "metalora": ("metalora",),
    "oa_adapter": ("oa_adapter",),
    "lorac_ipc": ("lorac_ipc",),
    "routed_inference": (),
}


def page_owns(page: str, row: dict[str, Any]) -> bool:
    """Whether an experiment row is reported on a method page: the row's method name, or its routed_inference switch."""
    if page == "routed_inference":
        return bool(row.get("options", {}).get("routed_inference"))
    return row["name"] in PAGE_METHODS[page]


def owned_labels(page: str, experiment: dict[str, Any]) -> list[str]:
    """The labels of an experiment that a page reports; a row that is only ever a pair's reference is its partner's."""
    references = {pair[1] for pair in experiment.get("pairs", [])} - {pair[0] for pair in experiment.get("pairs", [])}
    return [row["label"] for row in experiment["rows"] if page_owns(page, row) and row["label"] not in references]


def results_link(experiment: dict[str, Any]) -> str:
    """Where a method page points for the whole experiment: its own page, or results.md for single-task pairs."""
    if experiment.get("pairs"):
        return f"every row: [results.md](../results.md), section \"{experiment.get('title', experiment['name'])}\""
    return f"every row, the ablations and the accuracy matrices: [results/{experiment['name']}.md](../results/{experiment['name']}.md)"


def versus_seq_lora(labels: list[str], experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each non-ablation row's average accuracy against seq_lora's by the spread rule (none without seq_lora)."""
    if "seq_lora" not in rows:
        return []
    ablations = {row["label"] for row in experiment["rows"] if "ablates" in row}
    reference = [r["avg_accuracy"] for r in rows["seq_lora"]]
    lines = []
    for label in labels:
        if label in ablations or label in CONTEXT:
            continue
        delta, verdict = spread_rule([r["avg_accuracy"] for r in rows[label]], reference)
        lines.append(f"- `{label}` against `seq_lora`: {delta:+.3f} average accuracy ({verdict}).")
    return lines


def experiment_block(page: str, experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One experiment's part of a method page: the page's rows beside the floors, seq_lora and joint, the verdicts."""
    owned = owned_labels(page, experiment)
    if not owned:
        return []
    lines = [f"### {experiment.get('title', experiment['name'])} (`{experiment['name']}`)", ""]
    measured = [label for label in owned if label in rows]
    missing = [f"`{label}`" for label in owned if label not in rows]
    if not measured:
        return [*lines, f"- Not measured yet: {', '.join(missing)}.", ""]
    if experiment.get("pairs"):  # single-task comparisons: the page's rows beside their matched references
        pairs = [pair for pair in experiment["pairs"] if pair[0] in owned or pair[1] in owned]
        beside = {label for pair in pairs for label in pair}
        verdicts = pair_verdicts({**experiment, "pairs": pairs}, rows)
    else:  # single-task rows each name their own task, so only a stream's experiment gets the setting line
        lines += [setting_line(experiment), ""]
        floors = [pair for pair in experiment.get("matched_floors", []) if pair[0] in owned]
        beside = set(CONTEXT) | {floor for _, floor in floors}
        verdicts = (versus_seq_lora(measured, experiment, rows) + ablation_verdicts(experiment, rows, set(measured))
                    + matched_floor_verdicts({"matched_floors": floors}, rows))
    shown = [row["label"] for row in experiment["rows"] if row["label"] in rows and (row["label"] in beside or row["label"] in owned)]
    lines += [*headline_table(experiment, rows, shown), "", *verdicts]
    if missing:
        lines.append(f"- Not measured yet: {', '.join(missing)}.")
    return [*lines, "", f"Generated from `docs/results/{experiment['name']}/`; {results_link(experiment)}.", ""]


def fusion_lm_block(results: Path) -> list[str]:
    """ICM-Fusion on language-model LoRAs (benchmarks/fusion_lm.py), when its seed files exist."""
    paths = sorted((results / "fusion_lm").glob("seed*.json"))
    if not paths:
        return []
    import fusion_lm

    records = [json.loads(path.read_text()) for path in paths]
    return ["### Fusing language-model LoRAs (`fusion_lm`)", "", *fusion_lm.verdict(records), "",
            "Every row: [results/fusion_lm.md](../results/fusion_lm.md).", ""]


def method_block(page: str, experiments: list[dict[str, Any]], results: Path = RESULTS) -> list[str]:
    """The generated lines between a method page's markers: every experiment with rows of the page's methods."""
    lines = [
        "_Generated by `python benchmarks/bench.py summary` from the JSON files under `docs/results/`; nothing between",
        "these markers is typed by hand._ Mean ± standard deviation over seeds (one value: one seed); a difference counts",
        "only when it exceeds the sum of the two standard deviations, and one seed decides nothing. Speeds (train x,",
        "eval x) are relative to seq_lora in the same experiment, on a shared CPU: rough.",
        "",
    ]
    body = [line for experiment in experiments for line in experiment_block(page, experiment, load_rows(experiment["name"], results))]
    if page == "icm_fusion":
        body += fusion_lm_block(results)
    if not body:
        what = "routed" if page == "routed_inference" else ", ".join(f"`{name}`" for name in PAGE_METHODS[page])
        body = [f"No {what} rows in the current experiments; the single-seed history is in [results/legacy.md](../results/legacy.md).", ""]
    return lines + body


def replace_block(text: str, block: list[str]) -> str:
    """The page with the lines between its measured markers replaced by `block` (the markers and the rest unchanged)."""
    start = text.index(MEASURED_BEGIN) + len(MEASURED_BEGIN)
    end = text.index(MEASURED_END, start)
    return text[:start] + "\n" + "\n".join(block).rstrip("\n") + "\n" + text[end:]


def write_method_blocks(methods: Path = METHODS, experiments: Path = EXPERIMENTS, results: Path = RESULTS) -> list[Path]:
    """Regenerate the measured block of every method page that has the markers; returns the pages rewritten."""
    loaded = [load_experiment(str(path)) for path in experiment_paths(experiments)]
    written = []
    for page in PAGE_METHODS:
        path = methods / f"{page}.md"
        if not path.exists():
            continue
        text = path.read_text()
        if MEASURED_BEGIN not in text or MEASURED_END not in text:
            print(f"{path}: no {MEASURED_BEGIN} / {MEASURED_END} markers, left as it is")
            continue
        new = replace_block(text, method_block(page, loaded, results))
        if new != text:
            path.write_text(new)
            written.append(path)
    return written


def command_methods(args: argparse.Namespace) -> None:
    """The measured blocks of docs/methods/*.md."""
    for path in write_method_blocks():
        print("wrote", path)


def readme_lines(experiment: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The README headline for one experiment: floors, seq_lora, joint and the best other row; none for `readme: false`."""
    if not experiment.get("readme", True):
        return []
    keep = [label for label in ("zero_shot", "probe", "seq_lora", "joint") if label in rows]
    best = max((label for label in headline_labels(experiment, rows) if label not in FLOORS + ("joint", "seq_lora")),
               key=lambda label: statistics.mean(r["avg_accuracy"] for r in rows[label]), default=None)
    return [f"**{experiment.get('title', experiment['name'])}**", "", *headline_table(experiment, rows, keep + ([best] if best else [])), ""]


def command_summary(args: argparse.Namespace) -> None:
    """docs/results.md (verdict first, one table and two figures per setting) and the README's headline block."""
    sections, verdicts, readme = [], [], []
    for path in experiment_paths():
        experiment = load_experiment(str(path))
        rows = load_rows(experiment["name"])
        if not rows:
            continue
        name = experiment["name"]
        if experiment.get("pairs"):  # single-task comparisons: each row against its matched reference row
            lines = pair_verdicts(experiment, rows)
            verdicts += [f"**{experiment.get('title', name)}** (`{name}`):", *lines, ""]
            sections += [f"## {experiment.get('title', name)}", "", *headline_table(experiment, rows), "",
                         f"Experiment file: `{path.relative_to(ROOT)}`.", ""]
            continue
        figures = experiment_figures(experiment, rows)
        verdicts += which_method_when(experiment, rows) + [""]
        sections += [
            f"## {experiment.get('title', name)}", "", setting_line(experiment), "",
            *headline_table(experiment, rows), "",
            f"![accuracy against storage]({'results/' + figures[0]}) ![accuracy after each task]({'results/' + figures[1]})", "",
            f"Every row, the ablations and the accuracy matrices: [results/{name}.md](results/{name}.md); experiment file:"
            f" `{path.relative_to(ROOT)}`.", "",
        ]
        readme += readme_lines(experiment, rows)
        args_render = argparse.Namespace(experiment=str(path.relative_to(ROOT)))
        command_render(args_render)
    fusion_records = sorted((RESULTS / "fusion_lm").glob("seed*.json"))
    if fusion_records:
        import fusion_lm

        records = fusion_lm.load_records()
        verdicts += ["**Fusing language-model LoRAs** (`fusion_lm`):", *fusion_lm.verdict(records), ""]
        sections += ["## Fusing language-model LoRAs", "", *fusion_lm.fusion_table(records), "",
                     "Setup, options and every row: [results/fusion_lm.md](results/fusion_lm.md) (`python benchmarks/fusion_lm.py run`).", ""]
        fusion_lm.command_render(argparse.Namespace())
    sections += several_processes_section() + costs_section()
    page = [
        "# Measured results",
        "",
        "Generated by `python benchmarks/bench.py summary` from the JSON files under `docs/results/`; nothing here",
        "is typed by hand. Each setting is an experiment file in `benchmarks/experiments/`, run with",
        "`python benchmarks/bench.py run <file>`. Numbers are mean ± standard deviation over seeds (data order and",
        "initialisation); a difference is called one only when it exceeds the sum of the two standard deviations, and",
        "one seed decides nothing. Speeds are relative to seq_lora in the same setting (runs on a shared 2-core CPU:",
        "rough). The single-seed history of earlier measurements is in git and in [results/legacy.md](results/legacy.md).",
        "",
        "## Which method when",
        "",
        *verdicts,
        *sections,
    ]
    (ROOT / "docs" / "results.md").write_text("\n".join(page).rstrip() + "\n")
    readme_path = ROOT / "README.md"
    text = readme_path.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    if begin in text and end in text:
        block = [begin, "", *readme, "![accuracy after each task](docs/results/instruct_stream_curves.png)", "",
                 "Regenerate with `python benchmarks/bench.py summary`; every row and setting: [docs/results.md](docs/results.md).", "", end]
        text = text[: text.index(begin)] + "\n".join(block) + text[text.index(end) + len(end):]
        readme_path.write_text(text)
    print("wrote docs/results.md")
    command_methods(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "one", "render", "summary", "methods"])
    parser.add_argument("experiment", nargs="?")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (runs beside other work)")
    parser.add_argument("--shared-cpu", action="store_true",
                        help="the runs share the CPU with other work (give it too when resuming a run that did): their records say so"
                        " and the pages leave their speeds out")
    args = parser.parse_args()
    if args.command not in ("summary", "methods") and not args.experiment:
        parser.error(f"{args.command} needs an experiment file")
    commands = {"run": command_run, "one": command_one, "render": command_render, "summary": command_summary, "methods": command_methods}
    commands[args.command](args)


if __name__ == "__main__":
    main()
