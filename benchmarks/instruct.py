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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402 - the generic experiment runner beside this file
    RESULTS,
    command_one,
    command_render,
    command_run,
    interleaved_rounds,
    load_experiment,
    machine,
    result_path,
    row_config,
)


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
        if args.shared_cpu:
            record["shared_cpu"] = True
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=1) + "\n")
        print("peft seed", seed, record["avg_accuracy"], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "one", "peft", "speed", "render"])
    parser.add_argument("experiment")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shared-cpu", action="store_true", help="peft: the run shares the CPU; its record says so (bench.py run --shared-cpu)")
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
    ours(), theirs()  # warm-up
    seconds = interleaved_rounds({"ours": ours, "peft": theirs}, args.rounds)
    timings = {name: [samples / value for value in values] for name, values in seconds.items()}
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
