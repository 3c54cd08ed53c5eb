"""Training samples/s of loracl's seq_lora LoRA against PEFT's LoRA, and merged-adapter inference against the bare model.

Both sides: all-MiniLM-L6-v2, rank 8 / alpha 16 on query and value, batch 16, max length 64, the same batches,
the same mean-pooling + linear head + cross-entropy + AdamW step. Measurements are interleaved in one process
(ours, PEFT, ours, PEFT, ...) so that machine load affects both alike; the figure is the median over rounds.

    python benchmarks/peft_speed.py [--rounds 7] [--steps 5]

Writes docs/results/peft_speed.json (rendered into docs/results.md's Costs section by `python benchmarks/bench.py summary`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import interleaved_rounds, write_record  # noqa: E402

from loracl.adapters import LoraLayer, inject_adapters, merge_adapters  # noqa: E402
from loracl.backbones.base import mean_pool  # noqa: E402
from loracl.backbones.registry import load_backbone  # noqa: E402
from loracl.data.sources.json_dir import load_json_dir  # noqa: E402
from loracl.resources import quickstart_data_dir  # noqa: E402

RANK, ALPHA, BATCH, LENGTH = 8, 16.0, 16, 64
TRAIN_TARGET, EVAL_TARGET = 1.0, 1.02  # train ratio at least, merged eval ratio at most


def batches(tokenizer, count: int) -> list[dict[str, torch.Tensor]]:
    [task] = load_json_dir(quickstart_data_dir(), ["sst2"])
    texts = [text for text, _ in task.train]
    out = []
    for index in range(count):
        chunk = texts[(index * BATCH) % len(texts) :][:BATCH]
        encoded = tokenizer(chunk, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")
        out.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return out


def make_step(model, head, parameters):
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    labels = torch.zeros(BATCH, dtype=torch.long)

    def step(batch):
        hidden = model(**batch).last_hidden_state
        loss = F.cross_entropy(head(mean_pool(hidden, batch["attention_mask"])), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(function, items) -> float:
    started = time.perf_counter()
    for item in items:
        function(item)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    backbone = load_backbone("minilm-l6")
    data = batches(backbone.tokenizer, args.steps)
    bare = backbone.model
    ours = copy.deepcopy(bare)
    layers = inject_adapters(ours, ["query", "value"], lambda module, name: LoraLayer(module, name))
    for layer in layers.values():
        layer.add_branch("default", RANK, ALPHA)
    theirs = get_peft_model(copy.deepcopy(bare), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"]))
    heads = [torch.nn.Linear(384, 2) for _ in range(2)]
    our_step = make_step(ours, heads[0], [p for p in ours.parameters() if p.requires_grad] + list(heads[0].parameters()))
    their_step = make_step(theirs, heads[1], [p for p in theirs.parameters() if p.requires_grad] + list(heads[1].parameters()))
    ours.train(), theirs.train()
    for step in (our_step, their_step):  # warm-up
        timed(step, data[:2])
    train_s = interleaved_rounds({"loracl": lambda: timed(our_step, data), "peft": lambda: timed(their_step, data)}, args.rounds)
    ours_s, theirs_s = train_s["loracl"], train_s["peft"]
    samples = args.steps * BATCH
    ours_rate, theirs_rate = samples / statistics.median(ours_s), samples / statistics.median(theirs_s)

    merge_adapters(ours)
    ours.eval(), bare.eval()
    with torch.inference_mode():
        forward = lambda model: (lambda batch: model(**batch))  # noqa: E731
        for model in (ours, bare):
            timed(forward(model), data[:2])
        eval_s = interleaved_rounds({"merged": lambda: timed(forward(ours), data), "bare": lambda: timed(forward(bare), data)}, args.rounds)
        merged_s, bare_s = eval_s["merged"], eval_s["bare"]
    eval_ratio = statistics.median(merged_s) / statistics.median(bare_s)
    train_ratio = ours_rate / theirs_rate
    record = {
        "setup": {"backbone": "minilm-l6", "rank": RANK, "alpha": ALPHA, "batch": BATCH, "length": LENGTH, "steps": args.steps,
                  "rounds": args.rounds, "threads": torch.get_num_threads()},
        "train_samples_per_s": {"loracl": ours_rate, "peft": theirs_rate},
        "train_ratio": train_ratio,
        "train_target": TRAIN_TARGET,
        "eval_ms_per_batch": {"merged": statistics.median(merged_s) / args.steps * 1000, "bare": statistics.median(bare_s) / args.steps * 1000},
        "eval_ratio": eval_ratio,
        "eval_target": EVAL_TARGET,
        "fastest_round": {"train_ratio": (samples / min(ours_s)) / (samples / min(theirs_s)), "eval_ratio": min(merged_s) / min(bare_s)},
        "round_s": {"loracl_train": ours_s, "peft_train": theirs_s, "merged_eval": merged_s, "bare_eval": bare_s},
    }
    write_record("peft_speed", record)


if __name__ == "__main__":
    main()
