"""Continual instruction tuning benchmark: experiments as data, results as JSON, the table rendered from them.

    python benchmarks/instruct.py run    benchmarks/experiments/instruct_stream.yaml [--only LABEL ...] [--seeds 0 1]
    python benchmarks/instruct.py peft   benchmarks/experiments/instruct_stream.yaml [--seeds 0]
    python benchmarks/instruct.py speed  benchmarks/experiments/instruct_stream.yaml [--rounds 5 --steps 4]
    python benchmarks/instruct.py render benchmarks/experiments/instruct_stream.yaml

`run` trains every row x seed not yet measured and writes docs/results/<name>/<label>/seed<k>.json (metrics,
matrices, costs, machine, versions, commit, date); a killed run resumes from its checkpoints under
runs/<name>/. `peft` writes the PEFT sequential LoRA rows the same way, `speed` the interleaved training-speed
rounds, and `render` turns every JSON file into docs/results/<name>.md (mean and standard deviation over seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def load_experiment(path: str) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def row_config(experiment: dict[str, Any], row: dict[str, Any], seed: int) -> dict[str, Any]:
    """The loracl config of one row and seed (the experiment's base with the row's method entry)."""
    config = copy.deepcopy(experiment["base"])
    config["seed"] = seed
    config["stream"]["path"] = str((ROOT / experiment["data"]).resolve())
    config["method"] = [{"name": row["name"], "label": row["label"], **row.get("options", {})}]
    return config


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


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """What the page needs from a results.json: metrics, matrices, costs (no per-task records)."""
    keys = [
        "method", "label", "seed", "accuracy_matrix", "test_sizes", "avg_accuracy", "forgetting", "bwt",
        "trainable_params_per_task", "stored_bytes_cumulative", "train_samples_per_s", "eval_samples_per_s",
        "peak_memory_bytes", "wall_s", "method_options",
    ]
    out = {key: results.get(key) for key in keys}
    out["rouge_l_rows"] = [record.get("metric_rows", {}).get("rouge_l") for record in results["per_task"]]
    return out


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
    jobs.append(((False, False, 1, -1), "peft_seq_lora", 0))
    for _, label, seed in sorted(jobs):
        if (args.only and label not in args.only) or (args.seeds and seed not in args.seeds):
            continue
        if result_path(experiment["name"], label, seed).exists():
            continue
        verb = "peft" if label == "peft_seq_lora" else "one"
        command = [sys.executable, __file__, verb, args.experiment, "--only", label, "--seeds", str(seed)]
        if subprocess.run(command).returncode != 0:  # one failing row must not stop the others
            print(f"{label} seed {seed}: failed (its traceback is above)", flush=True)


def command_one(args: argparse.Namespace) -> None:
    """One row and seed: train, evaluate, write its result file."""
    from loracl.config import validate_config
    from loracl.engine import run_experiment

    experiment = load_experiment(args.experiment)
    [row] = [row for row in experiment["rows"] if row["label"] == args.only[0]]
    [seed] = args.seeds
    config = validate_config(row_config(experiment, row, seed))
    started = time.perf_counter()
    [result] = run_experiment(config, ROOT / "runs" / experiment["name"] / f"seed{seed}")
    target = result_path(experiment["name"], row["label"], seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {**compact(result.results), "config": row_config(experiment, row, seed), **machine()}
    target.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{row['label']} seed {seed}: {result.results['avg_accuracy']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)


# ----- PEFT, written the way a PEFT user writes a sequential LoRA run ---------------------------------------
def peft_sequential(experiment: dict[str, Any], seed: int, keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """get_peft_model on q_proj/v_proj, `model(**batch, labels=...)`, AdamW per task, greedy generate. The batches
    (order, prompts, answer-only labels) and the LoRA start weights are loracl's, so that the two runs can be
    compared matrix for matrix; everything that trains is PEFT's."""
    from peft import LoraConfig, get_peft_model

    from loracl import metrics
    from loracl.config import validate_config
    from loracl.data.build import load_stream
    from loracl.engine.runner import MethodRun
    from loracl.seeding import derived_seed

    row = next(row for row in experiment["rows"] if row["name"] == "seq_lora")
    config = validate_config(row_config(experiment, row, seed))
    stream = load_stream(config.stream, seed)
    run = MethodRun(config, config.method[0], stream, None)
    method = run.build()
    method.attach(copy.deepcopy(run.model))  # only to read seq_lora's start weights, handed to PEFT below
    method.begin_task(stream.tasks[0])
    start = {name: (layer.branches["default"].lora_A.detach().clone(), layer.branches["default"].lora_B.detach().clone()) for name, layer in method.layers.items()}
    options = method.options
    del method
    backbone = run.model.backbone
    peft_model = get_peft_model(
        backbone.model,
        LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in start and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(start[key][0])
                module.lora_B["default"].weight.copy_(start[key][1])
    task_model = run.model
    matrix, train_samples, train_s = [], 0, 0.0
    for task in stream.tasks:
        torch.manual_seed(derived_seed(seed, task.index))
        parameters = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.train.lr, weight_decay=0.0)
        loader = run.loader(task.train, task, train=True)
        peft_model.train()
        started = time.perf_counter()
        for batch in loader:
            inputs = batch["inputs"]
            loss = peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["target_ids"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_samples += len(batch["labels"])
        train_s += time.perf_counter() - started
        peft_model.eval()
        row_accuracy = []
        with torch.no_grad():
            for seen in stream.tasks[: task.index + 1]:
                correct = 0.0
                for batch in run.loader(seen.test, seen, train=False):
                    predictions = task_model.predict(batch)  # the PEFT-wrapped model inside the task model
                    correct += float(task_model.example_scores(predictions, batch, seen, stream.scenario)["accuracy"].sum())
                row_accuracy.append(correct / len(seen.test))
        matrix.append(row_accuracy + [None] * (len(stream.tasks) - task.index - 1))
    sizes = [len(task.test) for task in stream.tasks]
    if keep is not None:  # a caller comparing weights gets the trained PEFT model
        keep["model"] = peft_model
    return {"method": "peft_seq_lora", "label": "peft_seq_lora", "seed": seed, "accuracy_matrix": matrix, "test_sizes": sizes,
            **metrics.summarize(matrix, sizes, None), "train_samples_per_s": train_samples / train_s}


def command_peft(args: argparse.Namespace) -> None:
    experiment = load_experiment(args.experiment)
    for seed in args.seeds or [0]:
        target = result_path(experiment["name"], "peft_seq_lora", seed)
        if target.exists():
            continue
        record = {**peft_sequential(experiment, seed), **machine()}
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=1) + "\n")
        print("peft seed", seed, record["avg_accuracy"], flush=True)


# ----- render ---------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def spread_rule(first: list[float], second: list[float]) -> tuple[float, str]:
    """Difference of means and the verdict: a difference only when it exceeds the sum of the two standard
    deviations (one-sigma bands that do not overlap); one seed on either side decides nothing."""
    delta = statistics.mean(first) - statistics.mean(second)
    if len(first) < 2 or len(second) < 2:
        return delta, "one seed: undecided"
    spread = statistics.stdev(first) + statistics.stdev(second)
    return delta, ("beyond the spread" if abs(delta) > spread else f"within the spread (±{spread:.3f})")


def command_render(args: argparse.Namespace) -> None:
    experiment = load_experiment(args.experiment)
    name = experiment["name"]
    folder = RESULTS / name
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*/seed*.json")):
        rows.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    order = [row["label"] for row in experiment["rows"]] + ["peft_seq_lora"]
    ablations = {row["label"]: row["ablates"] for row in experiment["rows"] if "ablates" in row}
    reference = rows.get("seq_lora", [])
    ref_train = statistics.mean(r["train_samples_per_s"] for r in reference) if reference else None
    ref_eval = statistics.mean(r["eval_samples_per_s"] for r in reference if r.get("eval_samples_per_s")) if reference else None
    accuracy = {label: [r["avg_accuracy"] for r in records] for label, records in rows.items()}
    forgetting = {label: [r["forgetting"] for r in records if r.get("forgetting") is not None] for label, records in rows.items()}
    base = experiment["base"]
    lines = [
        f"# {name}: continual instruction tuning, measured",
        "",
        f"Generated by `python benchmarks/instruct.py render {args.experiment}` from the JSON files in",
        f"`docs/results/{name}/`; nothing here is typed by hand. Stream: {', '.join(base['stream']['tasks'])}"
        f" ({base['stream']['max_train_per_task']} train / {base['stream']['max_test_per_task']} test per task, "
        f"{base['train']['epochs']} epoch, batch {base['train']['batch_size']}, lr {base['train']['lr']}), "
        f"`{base['backbone']['name']}`, greedy exact match.",
        "",
    ]
    if reference and len(reference) > 0:
        lines += ["## Verdict", ""]
        verdicts = []
        for label in order:
            if label in ("seq_lora", "zero_shot", "joint", "peft_seq_lora") or label in ablations or label not in rows:
                continue
            delta, verdict = spread_rule(accuracy[label], accuracy["seq_lora"])
            halved = (
                statistics.mean(forgetting[label]) <= 0.5 * statistics.mean(forgetting["seq_lora"])
                if forgetting.get(label) and forgetting.get("seq_lora") else None
            )
            verdicts.append((delta, f"- `{label}`: average accuracy {delta:+.3f} against seq_lora ({verdict}); forgetting "
                             f"{mean_std(forgetting.get(label, []))} against {mean_std(forgetting['seq_lora'])}"
                             f"{' (halved)' if halved else ' (not halved)' if halved is not None else ''}."))
        lines += [text for _, text in sorted(verdicts, key=lambda item: -item[0])]
        if "joint" in rows and verdicts:
            best = max((label for label in rows if label not in ablations and label not in ("joint", "peft_seq_lora", "zero_shot")),
                       key=lambda label: statistics.mean(accuracy[label]))
            delta, verdict = spread_rule(accuracy[best], accuracy["joint"])
            lines.append(f"- Best continual row `{best}` against joint (the upper bound): {delta:+.3f} ({verdict}).")
        lines.append("")
    lines += [
        "## Every row",
        "",
        "Mean ± standard deviation over the seeds listed (one value: one seed, no spread known). Average accuracy =",
        "mean of the last row of the accuracy matrix; forgetting and BWT as in loracl.metrics; ROUGE-L of the last row;",
        "stored bytes after the last task; train and generation samples/s relative to seq_lora's mean; peak RSS.",
        "",
        "| row | seeds | avg accuracy | forgetting | BWT | ROUGE-L | stored MB | train x | generate x | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in order + sorted(set(rows) - set(order)):
        records = rows.get(label)
        if not records:
            continue
        rouge = [statistics.mean(r["rouge_l_rows"][-1]) for r in records if r.get("rouge_l_rows") and r["rouge_l_rows"][-1]]
        stored = [r["stored_bytes_cumulative"][-1] / 1e6 for r in records if r.get("stored_bytes_cumulative")]
        train_x = [r["train_samples_per_s"] / ref_train for r in records if r.get("train_samples_per_s") and ref_train]
        eval_x = [r["eval_samples_per_s"] / ref_eval for r in records if r.get("eval_samples_per_s") and ref_eval]
        memory = [r["peak_memory_bytes"] / 1e9 for r in records if r.get("peak_memory_bytes")]
        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in records)} | {mean_std(accuracy[label])}"
            f" | {mean_std([r.get('forgetting') for r in records])} | {mean_std([r.get('bwt') for r in records])}"
            f" | {mean_std(rouge)} | {mean_std(stored)} | {mean_std(train_x)} | {mean_std(eval_x)} | {mean_std(memory)} |"
        )
    if ablations:
        lines += ["", "## Mechanisms switched off", "",
                  "Each ablation against its full method over the same seeds; the rule above decides.", ""]
        for label, full in ablations.items():
            if label in rows and full in rows:
                seeds = {r["seed"] for r in rows[label]}
                full_same = [r["avg_accuracy"] for r in rows[full] if r["seed"] in seeds]
                delta, verdict = spread_rule(full_same, accuracy[label])
                lines.append(f"- `{full}` minus `{label}`: {delta:+.3f} average accuracy (seeds {sorted(seeds)}; {verdict}).")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "one", "peft", "speed", "render"])
    parser.add_argument("experiment")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    {"run": command_run, "one": command_one, "peft": command_peft, "render": command_render, "speed": command_speed}[args.command](args)


def command_speed(args: argparse.Namespace) -> None:
    """Training samples/s of loracl's seq_lora against PEFT's LoRA on the same batches, in interleaved rounds in one
    process (ours, PEFT, ours, ...) so that machine load hits both alike; the median round of each is reported."""
    from peft import LoraConfig, get_peft_model

    from loracl.config import validate_config
    from loracl.data.build import load_stream
    from loracl.engine.runner import MethodRun

    experiment = load_experiment(args.experiment)
    row = next(row for row in experiment["rows"] if row["name"] == "seq_lora")
    config = validate_config(row_config(experiment, row, 0))
    stream = load_stream(config.stream, 0)
    run = MethodRun(config, config.method[0], stream, None)
    method = run.build()
    clean = copy.deepcopy(run.model.backbone.model)
    method.attach(run.model)
    task = stream.tasks[1]  # mnli: the longest prompts of the stream
    method.begin_task(task)
    batches = [batch for _, batch in zip(range(args.steps), run.loader(task.train, task, train=True))]
    options = method.options
    peft_model = get_peft_model(
        clean, LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=["q_proj", "v_proj"])
    )
    ours_parameters = method.trainable_parameters()
    ours_optimizer = torch.optim.AdamW(ours_parameters, lr=config.train.lr)
    peft_parameters = [p for p in peft_model.parameters() if p.requires_grad]
    peft_optimizer = torch.optim.AdamW(peft_parameters, lr=config.train.lr)
    run.model.train_adapters()
    peft_model.train()

    def ours() -> None:
        for batch in batches:
            loss = method.task_loss(method.forward(batch), batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ours_parameters, 1.0)
            ours_optimizer.step()
            ours_optimizer.zero_grad(set_to_none=True)

    def theirs() -> None:
        for batch in batches:
            inputs = batch["inputs"]
            loss = peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["target_ids"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(peft_parameters, 1.0)
            peft_optimizer.step()
            peft_optimizer.zero_grad(set_to_none=True)

    samples = sum(len(batch["labels"]) for batch in batches)
    timings: dict[str, list[float]] = {"ours": [], "peft": []}
    ours(), theirs()  # warm-up
    for _ in range(args.rounds):
        for name, function in (("ours", ours), ("peft", theirs)):
            started = time.perf_counter()
            function()
            timings[name].append(samples / (time.perf_counter() - started))
    record = {
        "ours_samples_per_s": statistics.median(timings["ours"]),
        "peft_samples_per_s": statistics.median(timings["peft"]),
        "rounds": args.rounds, "steps": args.steps, "batch_size": config.train.batch_size, "timings": timings,
        **machine(),
    }
    record["ratio"] = record["ours_samples_per_s"] / record["peft_samples_per_s"]
    target = RESULTS / experiment["name"] / "speed.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("ours_samples_per_s", "peft_samples_per_s", "ratio")}))


if __name__ == "__main__":
    main()
