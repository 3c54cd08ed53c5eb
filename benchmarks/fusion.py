"""Fuse the text stream's per-task LoRAs with ICM-Fusion and every merge baseline; write docs/results/legacy.md `icm_fusion`.

One LoRA per task (query/value, r = 8, alpha = 16, same initialisation seed for every task) plus that task's own
linear head, trained for 1 epoch; ICM-LoRA-style checkpoints are harvested over the second half of training as
the F-VAE's weight data. Each fused LoRA is evaluated on every task with that task's own head (task id given).
Normalised accuracy = fused accuracy / the task's own-LoRA accuracy. Variants: fusion with 16 examples per
task, and a long-tailed stream (training-set sizes differing by `--long-tail-ratio`).

    python benchmarks/fusion.py --train 300 --test 100
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from loracl.adapters.peft_io import LoraPair  # noqa: E402
from loracl.backbones.registry import load_backbone  # noqa: E402
from loracl.config import load_config  # noqa: E402
from loracl.data.build import load_stream  # noqa: E402
from loracl.fusion import LoraHost, TaskAdapter, TaskSupport, fuse, fuse_options  # noqa: E402
from loracl.fusion.host import BRANCH  # noqa: E402
from loracl.seeding import private_rng  # noqa: E402

RANK, ALPHA = 8, 16.0
DATA_FREE = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic"]
WITH_EXAMPLES = ["icm", "lorahub"]
ROUND_TRIP = "round trip, each task's own LoRA:"  # diagnostic rows, not fusions: outside the verdict


def batches(inputs: list, size: int):
    for start in range(0, len(inputs), size):
        yield start, inputs[start : start + size]


def fresh_lora(host: LoraHost, seed: int) -> dict[str, LoraPair]:
    """PEFT's default init (Kaiming-uniform A, zero B) from one seed: every task starts from the same A."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pairs = {}
        for name, layer in sorted(host.layers.items()):
            weight = layer.base_layer.weight
            lora_A = torch.empty(RANK, weight.shape[1])
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            pairs[name] = LoraPair(lora_A, torch.zeros(weight.shape[0], RANK), ALPHA / RANK)
    return pairs


def train_task(host: LoraHost, task, train_size: int, args) -> tuple[dict, nn.Linear, list[dict]]:
    """One LoRA + head on the task; returns the final LoRA, the head and the harvested checkpoints."""
    host.set_adapter(fresh_lora(host, args.seed))
    branches = {name: layer.branches[BRANCH] for name, layer in host.layers.items()}
    for branch in branches.values():
        branch.requires_grad_(True)
    classes = task.class_ids
    with private_rng(args.seed, task.index):
        head = nn.Linear(host.backbone.hidden_size, len(classes)).to(host.device)
    remap = {c: i for i, c in enumerate(classes)}
    inputs, labels = task.train.inputs[:train_size], [remap[y] for y in task.train.labels[:train_size]]
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(args.seed + task.index)).tolist()
    optimizer = torch.optim.AdamW(
        [{"params": [p for b in branches.values() for p in (b.lora_A, b.lora_B)], "lr": args.lr}, {"params": head.parameters(), "lr": args.head_lr}]
    )
    steps = math.ceil(len(inputs) / args.batch_size) * args.epochs
    harvest_from = steps // 2
    every = max(1, (steps - harvest_from) // args.checkpoints)
    samples, step = [], 0
    for _ in range(args.epochs):
        for _start, chunk in batches(order, args.batch_size):
            batch = host.backbone.collate([inputs[i] for i in chunk])
            loss = F.cross_entropy(head(host.features(batch)), torch.tensor([labels[i] for i in chunk], device=host.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step > harvest_from and (step - harvest_from) % every == 0:
                samples.append(snapshot(branches))
    for branch in branches.values():
        branch.requires_grad_(False)
    head.requires_grad_(False)
    return snapshot(branches), head, samples[:-1] if samples else []


def snapshot(branches) -> dict[str, LoraPair]:
    return {n: LoraPair(b.lora_A.detach().clone(), b.lora_B.detach().clone(), b.scaling) for n, b in branches.items()}


@torch.no_grad()
def accuracy(host: LoraHost, adapter: dict, task, head: nn.Linear, test_size: int) -> float:
    host.set_adapter(adapter)
    remap = {c: i for i, c in enumerate(task.class_ids)}
    inputs, labels = task.test.inputs[:test_size], [remap[y] for y in task.test.labels[:test_size]]
    correct = 0
    for start, chunk in batches(inputs, 64):
        predicted = head(host.features(host.backbone.collate(chunk))).argmax(1).cpu()
        correct += int((predicted == torch.tensor(labels[start : start + len(chunk)])).sum())
    return correct / len(inputs)


def support_for(host: LoraHost, task, head: nn.Linear, count: int) -> TaskSupport:
    remap = {c: i for i, c in enumerate(task.class_ids)}
    inputs = host.backbone.collate(task.train.inputs[:count])
    return TaskSupport(inputs, torch.tensor([remap[y] for y in task.train.labels[:count]]), head)


def run_setting(host, tasks, sizes, args, methods, support_sizes) -> dict:
    """Train the per-task LoRAs once, then fuse with each method (and each support size for example-using ones)."""
    trained = []
    started = time.perf_counter()
    for task, size in zip(tasks, sizes):
        final, head, samples = train_task(host, task, size, args)
        trained.append((task, final, head, samples))
        print(f"  trained {task.name} on {size} examples, {len(samples)} checkpoints", flush=True)
    own = [accuracy(host, final, task, head, args.test) for task, final, head, _ in trained]
    rows = {"own LoRA (upper bound)": (own, 0.0, 0)}
    base = {n: LoraPair(p.lora_A, torch.zeros_like(p.lora_B), p.scaling) for n, p in trained[0][1].items()}
    rows["no LoRA (base + heads)"] = ([accuracy(host, base, t, h, args.test) for t, _, h, _ in trained], 0.0, 0)
    adapters = [TaskAdapter(task.name, final) for task, final, _, _ in trained]
    options = fuse_options({"budget": args.lorahub_budget, "icm": {
        "warm_start_steps": args.warm_start_steps, "meta_steps": args.meta_steps, "batch_size": args.vae_batch,
        "meta_batch_size": args.meta_batch, "inner_steps": args.inner_steps, "channel_divisor": args.channel_divisor,
        "normalisation": args.normalisation, "centre": args.centre, "fusion_weights": args.fusion_weights,
        "refine_steps": args.refine_steps, "target": args.target, "delta_rank": args.delta_rank,
        "align_weight": args.align_weight}})
    for method in methods:
        for count in support_sizes if method in WITH_EXAMPLES else [None]:
            label = method if count is None else f"{method} ({count} examples/task)"
            supports = [support_for(host, t, h, count or 16) for t, _, h, _ in trained]
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if host.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(host.device)
            outcome = fuse(adapters, method, options, host=host, supports=supports, samples=[s for *_, s in trained])
            if host.device.type == "cuda":  # the GPU's peak allocation during fusion
                peak = torch.cuda.max_memory_allocated(host.device)
            else:
                peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
            accs = [accuracy(host, outcome.adapter, t, h, args.test) for t, _, h, _ in trained]
            rows[label] = (accs, outcome.report["fusion_s"], peak, outcome.report)
            print(f"  {label}: {[round(a, 3) for a in accs]} in {outcome.report['fusion_s']:.1f}s", flush=True)
            if outcome.icm is not None:  # diagnostic: each task's own LoRA through the F-VAE and back
                decoded = outcome.icm.decoded_task_adapters()
                round_trip = [accuracy(host, d, t, h, args.test) for d, (t, _, h, _) in zip(decoded, trained)]
                rows[f"{ROUND_TRIP} {label}"] = (round_trip, 0.0, 0, outcome.report)
    return {"tasks": [t.name for t in tasks], "sizes": sizes, "own": own, "rows": rows, "train_s": time.perf_counter() - started}


def table(result: dict, memory_label: str) -> str:
    own = result["own"]
    header = ["fusion"] + result["tasks"] + ["mean acc", "mean normalised", "fusion s", memory_label]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, (accs, seconds, peak, *_rest) in result["rows"].items():
        if label.startswith(ROUND_TRIP):
            seconds, peak = float("nan"), float("nan")
        normalised = sum(a / o if o > 0 else 0.0 for a, o in zip(accs, own)) / len(own)
        cells = [label] + [f"{a:.3f}" for a in accs] + [f"{sum(accs) / len(accs):.3f}", f"{normalised:.3f}"]
        cells += ["—", "—"] if math.isnan(seconds) else [f"{seconds:.1f}", f"{peak / 2**20:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: dict) -> str:
    own = result["own"]
    scores = {
        label: sum(a / o if o > 0 else 0.0 for a, o in zip(row[0], own)) / len(own)
        for label, row in result["rows"].items()
        if not label.startswith(("own", "no LoRA", ROUND_TRIP))
    }
    icm = {k: v for k, v in scores.items() if k.startswith("icm")}
    others = {k: v for k, v in scores.items() if not k.startswith("icm")}
    best_icm = max(icm.values()) if icm else float("nan")
    best_other = max(others, key=others.get) if others else None
    beats = best_other is None or best_icm > others[best_other]
    return (
        f"Target ICM-Fusion mean normalised accuracy >= 0.90 and above every baseline: best ICM {best_icm:.3f} "
        f"({'met' if best_icm >= 0.9 else 'NOT met'} for >= 0.90); best baseline `{best_other}` "
        f"{others.get(best_other, float('nan')):.3f} ({'beaten' if beats else 'NOT beaten'})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/text_stream.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--checkpoints", type=int, default=8, help="weight samples harvested per task")
    parser.add_argument("--support", type=int, default=64, help="examples per task for fusion (main run)")
    parser.add_argument("--few-shot", type=int, default=16)
    parser.add_argument("--long-tail-ratio", type=float, default=10.0)
    parser.add_argument("--warm-start-steps", type=int, default=40)
    parser.add_argument("--meta-steps", type=int, default=6)
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=2, help="tasks per meta step")
    parser.add_argument("--channel-divisor", type=int, default=1, help="thins every F-VAE conv layer k-fold (1: ICM-LoRA's)")
    parser.add_argument("--normalisation", choices=["shared", "per_sample"], default="shared", help="ICM's G5 switch")
    parser.add_argument("--centre", action="store_true", help="ICM: subtract the pooled mean weight vector (fusion.icm.centre)")
    parser.add_argument("--fusion-weights", choices=["uniform", "learned"], default="uniform", help="ICM's G1 switch")
    parser.add_argument("--refine-steps", type=int, default=0, help="ICM: in-context steps on the fused LoRA (eq. 18)")
    parser.add_argument("--target", choices=["factors", "delta"], default="factors", help="ICM's G6 switch: encode (A, B) or dW")
    parser.add_argument("--delta-rank", type=int, default=None, help="ICM target delta: rank of the SVD cut (default r)")
    parser.add_argument("--align-weight", type=float, default=0.0, help="ICM's G8 latent-alignment term (ablation)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--lorahub-budget", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the backbone, the LoRAs and the F-VAE run (cpu, cuda)")
    parser.add_argument("--note", default="", help="a sentence added to the section (e.g. where it ran)")
    parser.add_argument("--section", default="icm_fusion")
    parser.add_argument("--title", default="ICM-Fusion and merge baselines on the text stream's tasks")
    parser.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = load_config(args.config, [*args.set, f"stream.max_train_per_task={args.train}", f"stream.max_test_per_task={args.test}"])
    stream = load_stream(config.stream, config.seed)
    backbone = load_backbone(
        config.backbone.name, config.backbone.pooling, config.train.max_length, seed=args.seed, split_fused=config.backbone.split_fused
    )
    backbone.to(torch.device(args.device))
    modules = [name for name, _ in backbone.model.named_modules() if name.endswith((".query", ".value"))]
    host = LoraHost(backbone, modules)
    tasks = stream.tasks
    print("main setting", flush=True)
    main_result = run_setting(host, tasks, [args.train] * len(tasks), args, WITH_EXAMPLES + DATA_FREE, [args.support, args.few_shot])
    sizes = [max(2, round(args.train / args.long_tail_ratio ** (i / (len(tasks) - 1)))) for i in range(len(tasks))]
    print("long-tailed setting", sizes, flush=True)
    tail_result = run_setting(host, tasks, sizes, args, WITH_EXAMPLES + DATA_FREE, [args.few_shot])
    on_gpu = host.device.type == "cuda"
    memory_label = "peak GPU memory MiB" if on_gpu else "peak RSS growth MiB"
    where = f"one {torch.cuda.get_device_name(host.device)} (GPU)" if on_gpu else "the shared 2-core CPU"
    icm_report = next(row[3] for label, row in main_result["rows"].items() if label.startswith("icm"))
    body = [
        f"Tasks {', '.join(main_result['tasks'])} of `{args.config}` on MiniLM-L6 (max_length {config.train.max_length}); "
        f"run on {where}{': ' + args.note if args.note else ''}; {args.train} train / {args.test} test examples per task, {args.epochs} epoch, "
        f"one LoRA per task (query/value, r={RANK}, alpha={ALPHA:g}, same init seed) with its own head; "
        f"{args.checkpoints} checkpoints harvested per task over the second half of training. "
        f"ICM-Fusion: ICM-LoRA's conv F-VAE (d_z 256, conv widths / {args.channel_divisor}), {args.warm_start_steps} "
        f"warm-start CVAE steps (batch {args.vae_batch}), {args.meta_steps} meta steps (K={args.inner_steps}, first order, "
        f"{args.meta_batch} tasks per step), {args.normalisation} normalisation{', centred' if args.centre else ''}, {args.fusion_weights} fusion weights, "
        f"{args.refine_steps} refine steps, target {args.target}"
        + (f" (dW per module, cut to rank {args.delta_rank or RANK} by SVD)" if args.target == "delta" else "")
        + (f", alignment weight {args.align_weight:g}" if args.align_weight else "")
        + f"; LoRAHub budget "
        f"{args.lorahub_budget}. Accuracy with each task's own head (task id given); normalised = fused / own LoRA. "
        "Data-free baselines use PEFT's `add_weighted_adapter` defaults (density 0.5, weights 1/T, TIES 1 each); "
        "task arithmetic lambda 0.3. "
        + ("Peak GPU memory is the largest allocation during the fusion call (model, data and F-VAE together)."
           if on_gpu else "Peak RSS growth is the rise of the process's peak resident memory during fusion "
           "(0 when an earlier step already reached a higher peak)."),
        "",
        f"F-VAE: {icm_report['vae_params']:,} parameters for {icm_report['lora_params']:,} LoRA parameters per task "
        f"(padded {icm_report['padded_length']:,}); task-vector dim {icm_report['task_vector_dim']}; "
        f"storage {icm_report['storage_floats']:,} floats. Last losses of the first ICM run: warm start "
        f"{icm_report['warm_start_loss']:.4f}, meta {icm_report['meta_loss']:.4f}; reconstruction MSE of the final "
        f"LoRAs on the F-VAE's scale {icm_report['final_reconstruction_mse']:.4f}, against "
        f"{icm_report['final_target_mean_square']:.4f} for an all-zero output (the targets' mean square: about 1.0 without "
        f"centring, less when the pooled mean vector is subtracted). "
        f"The `{ROUND_TRIP} icm ...` rows decode each task's own latent under its own condition and score it on that "
        "task (de-normalised with that task's own statistics under per-sample normalisation): a diagnostic of how well "
        "the F-VAE reproduces the LoRAs it fuses, not a fusion.",
        "",
        f"### Main setting ({args.train} train examples per task; fusion with {args.support} and with {args.few_shot} examples per task)",
        "",
        table(main_result, memory_label),
        "",
        verdict(main_result),
        "",
        f"### Long-tailed setting (train sizes {sizes}, fusion with {args.few_shot} examples per task)",
        "",
        table(tail_result, memory_label),
        "",
        verdict(tail_result),
    ]
    print("\n".join(body))
    if not args.no_write:
        path = write_section(args.section, args.title, "\n".join(body))
        print(f"written to {path}")


if __name__ == "__main__":
    main()
