"""loracl's LoRA against PEFT's LoRA on a GPU (issue 22): train samples/s and tokens/s, merged-adapter eval against
the bare model, each side's working memory and model FLOP utilisation (FLOPs as torch's FlopCounterMode counts
them), on ViT-B/16 at 224 px, BERT-base at 128 tokens and a
SmolLM2-135M-shaped decoder at 512 tokens.

Every model has random weights built from its config (speed does not depend on the weights); both sides get the
same model, rank 8 / alpha 16 on the query and value projections, the same batches and the same AdamW step, in
bf16 weights, not compiled, attention as transformers picks it (recorded per row). Rounds are interleaved in one process
(ours, PEFT, ours, PEFT, ...) so that clock and thermal drift affect both alike; each figure is the median over
rounds. `--tiny` runs the same code on tiny configs on the CPU (what the test suite checks); its numbers mean
nothing.

    python benchmarks/gpu_speed.py [--models vit bert decoder] [--batch 64] [--rounds 5] [--steps 10]
    python benchmarks/gpu_speed.py --tiny --out /tmp/record.json

Writes docs/results/gpu_speed.json (or --out) after every model, rendered into docs/results.md's Costs section by
`bench.py summary`.

On a lent GPU machine (no network, no pydantic, no git, loracl not installed; about 3 minutes in all), from the
repository root, with `device`'s `run`:

    export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
    python3 benchmarks/gpu_speed.py --out $OUT/gpu_speed.json

then copy the returned file to docs/results/gpu_speed.json and run `python benchmarks/bench.py summary` here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import interleaved_rounds, machine, write_record  # noqa: E402

from loracl.adapters import LoraLayer, inject_adapters, merge_adapters  # noqa: E402

RANK, ALPHA = 8, 16.0
TRAIN_TARGET, EVAL_TARGET = 1.0, 1.02  # train ratio (ours / PEFT) at least; merged eval time over bare at most
# The query and value projections under either naming (transformers 5 renamed some encoders' query/value to q_proj/v_proj).
QUERY_VALUE = ["query", "value", "q_proj", "v_proj"]
# Dense bf16 peak TFLOP/s by device name (NVIDIA's data sheets, SXM parts, without sparsity): MFU's denominator.
# Another device needs --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
# What the issue measured with PEFT 0.21 (eager, bf16, batch 64, LoRA q/v) on one H100: samples/s of LoRA training,
# merged-adapter eval and bare eval; shown beside ours, not compared by this script (different device and stack).
REFERENCE = {"device": "NVIDIA H100", "peft": "0.21",
             "vit-b16-224": {"train": 1570, "merged_eval": 6124, "bare_eval": 6480},
             "bert-base-128": {"train": 1548, "merged_eval": 5366, "bare_eval": 6473}}


@dataclass
class Workload:
    """One model to time: how to build it, its batch of inputs, its loss, its targets and its tokens per sample."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.device], dict[str, torch.Tensor]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    targets: list[str]  # module-name suffixes; those present in the model are adapted
    tokens: int  # sequence positions per sample (ViT: patches + CLS)


def vit(tiny: bool) -> Workload:
    """ViT-B/16 at 224 px (tiny: 32 px, 2 blocks), image features into a stand-in loss."""
    from transformers import ViTConfig, ViTModel

    size = dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else {}
    config = ViTConfig(**size)  # the defaults are ViT-B/16 at 224 px
    tokens = (config.image_size // config.patch_size) ** 2 + 1

    def inputs(batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(batch, 3, config.image_size, config.image_size, device=device)}

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"].to(model.dtype)).pooler_output.float().pow(2).mean()

    return Workload("vit-b16-224", lambda: ViTModel(config), inputs, loss, QUERY_VALUE, tokens)


def bert(tiny: bool) -> Workload:
    """BERT-base at 128 tokens (tiny: 16 tokens, 2 blocks), the pooled output into a stand-in loss."""
    from transformers import BertConfig, BertModel

    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=1000) if tiny else {}
    config = BertConfig(**size)  # the defaults are BERT-base
    length = 16 if tiny else 128

    def inputs(batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, config.vocab_size, (batch, length), device=device)}

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"]).pooler_output.float().pow(2).mean()

    return Workload("bert-base-128", lambda: BertModel(config), inputs, loss, QUERY_VALUE, length)


def decoder(tiny: bool) -> Workload:
    """A decoder shaped as SmolLM2-135M at 512 tokens (tiny: 16 tokens, 2 blocks), next-token loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    else:  # SmolLM2-135M's shape (its config.json)
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                             vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)
    config.use_cache = False  # training and one-pass eval: a KV cache would only cost memory, on both sides alike
    length = 16 if tiny else 512

    def inputs(batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, config.vocab_size, (batch, length), device=device)}

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"]).logits
        # next-token loss, as a causal-LM fine-tune computes it: logits [B, L-1, V] against ids [B, L-1]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())

    return Workload("smollm2-135m-512", lambda: LlamaForCausalLM(config), inputs, loss, QUERY_VALUE, length)


WORKLOADS = {"vit": vit, "bert": bert, "decoder": decoder}


def present(model: nn.Module, targets: list[str]) -> list[str]:
    """The target suffixes that name modules of this model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [target for target in targets if target in names]


def with_loracl_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    """loracl's LoraLayer on the targets, one branch of rank RANK, over a frozen model (what seq_lora trains)."""
    model.requires_grad_(False)
    layers = inject_adapters(model, present(model, targets), lambda module, name: LoraLayer(module, name))
    for layer in layers.values():
        layer.add_branch("default", RANK, ALPHA)
    return model


def with_peft_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    """PEFT's LoRA on the same targets, rank and alpha (get_peft_model freezes the rest)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=present(model, targets)))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that wall time is the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[dict[str, torch.Tensor]], Any], batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Seconds that `function` takes over the batches, the device synchronised before and after."""
    synchronize(device)
    started = time.perf_counter()
    for batch in batches:
        function(batch)
    synchronize(device)
    return time.perf_counter() - started


def train_step(model: nn.Module, work: Workload) -> Callable[[dict[str, torch.Tensor]], None]:
    """One AdamW step on the model's trainable parameters per call."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict[str, torch.Tensor]) -> None:
        work.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def working_memory(function: Callable[[], Any], device: torch.device) -> float | None:
    """GiB allocated at the peak while `function` runs above what was allocated before it (the resident models of
    both sides): that side's activations, gradients and optimizer state. CUDA only."""
    if device.type != "cuda":
        function()
        return None
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    return (torch.cuda.max_memory_allocated(device) - resident) / 2**30


def counted_flops(function: Callable[[], Any]) -> int:
    """FLOPs of what `function` runs, as torch's FlopCounterMode counts them (matmuls, convolutions, attention):
    embedding lookups cost nothing and a frozen weight's gradient, never formed, is not counted."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode
    from transformers.integrations import sdpa_attention

    counter = FlopCounterMode(display=False)
    # transformers hands grouped-query attention to SDPA with enable_gqa=True, whose FLOP formula in torch before
    # 2.12 asserts equal head counts; with GQA off transformers repeats the key/value heads first: same FLOPs
    no_gqa = (mock.patch.object(sdpa_attention, "use_gqa_in_sdpa", lambda *args, **kwargs: False)
              if hasattr(sdpa_attention, "use_gqa_in_sdpa") else contextlib.nullcontext())
    with no_gqa, counter:
        function()
    return counter.get_total_flops()


def measure(work: Workload, batch: int, rounds: int, steps: int, device: torch.device, dtype: torch.dtype, peak_tflops: float) -> dict[str, Any]:
    """Interleaved train rounds (ours, PEFT), then merged (ours) against bare eval rounds, on one workload."""
    torch.manual_seed(0)
    bare = work.build().to(device=device, dtype=dtype).requires_grad_(False)
    ours = with_loracl_lora(copy.deepcopy(bare), work.targets).to(device=device, dtype=dtype)
    theirs = with_peft_lora(copy.deepcopy(bare), work.targets).to(device=device, dtype=dtype)
    data = [work.inputs(batch, device) for _ in range(steps)]
    steps_of = {"loracl": train_step(ours, work), "peft": train_step(theirs, work)}
    trainable = {side: sum(p.numel() for p in model.parameters() if p.requires_grad) for side, model in (("loracl", ours), ("peft", theirs))}
    if trainable["loracl"] != trainable["peft"]:
        raise RuntimeError(f"{work.name}: the two sides train different parameter counts {trainable}")
    ours.train(), theirs.train()
    for step in steps_of.values():  # the CUDA context's one-time workspaces (cuBLAS, autograd) before either side is measured
        timed(step, data[:1], device)
    memory = {side: working_memory(lambda step=step: timed(step, data[:2], device), device) for side, step in steps_of.items()}  # warm-up
    # per sample, from one batch of one: our training step (forward and backward) and the bare model's forward
    single = work.inputs(1, device)
    train_flops = counted_flops(lambda: work.loss(ours, single).backward())
    ours.zero_grad(set_to_none=True)
    train_s = interleaved_rounds({side: lambda step=step: timed(step, data, device) for side, step in steps_of.items()}, rounds)
    samples = batch * steps
    rate = {side: samples / statistics.median(times) for side, times in train_s.items()}

    merge_adapters(ours)
    ours.eval(), bare.eval()
    with torch.inference_mode():
        models = {"merged": ours, "bare": bare}
        for model in models.values():  # warm-up
            timed(lambda inputs, model=model: model(**inputs), data[:2], device)
        eval_s = interleaved_rounds({side: lambda model=model: timed(lambda inputs: model(**inputs), data, device)
                                     for side, model in models.items()}, rounds)
        eval_flops = counted_flops(lambda: bare(**single))
    eval_rate = {side: samples / statistics.median(times) for side, times in eval_s.items()}

    peak = peak_tflops * 1e12
    return {
        "parameters": sum(p.numel() for p in bare.parameters()),
        "attention": getattr(bare.config, "_attn_implementation", None),
        "tokens_per_sample": work.tokens,
        "flops_per_sample": {"train": train_flops, "eval": eval_flops},
        "train_samples_per_s": rate,
        "train_tokens_per_s": {side: value * work.tokens for side, value in rate.items()},
        "train_ratio": rate["loracl"] / rate["peft"],
        "eval_samples_per_s": eval_rate,
        "eval_ratio": statistics.median(eval_s["merged"]) / statistics.median(eval_s["bare"]),
        "train_working_memory_gib": memory,
        "mfu": {
            "train_loracl": train_flops * rate["loracl"] / peak,
            "train_peft": train_flops * rate["peft"] / peak,
            "eval_merged": eval_flops * eval_rate["merged"] / peak,
            "eval_bare": eval_flops * eval_rate["bare"] / peak,
        },
        "round_s": {**{f"{side}_train": times for side, times in train_s.items()}, **{f"{side}_eval": times for side, times in eval_s.items()}},
    }


def peak_for(device_name: str, given: float | None) -> float:
    """The device's dense bf16 peak TFLOP/s: the one given, or the data-sheet figure of a known device."""
    if given is not None:
        return given
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_name:
            return tflops
    raise SystemExit(f"gpu_speed.py: no known bf16 peak for {device_name!r}: give --peak-tflops")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every workload asked for and write one record."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="batches per round")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"the device's dense bf16 peak TFLOP/s, MFU's denominator (default: the data sheet's for {', '.join(PEAK_TFLOPS)})")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU in float32: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="write the record here instead of docs/results/gpu_speed.json")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures a GPU (use --tiny to check the script on the CPU)")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_tflops = peak_for(device_name, args.peak_tflops if not args.tiny else (args.peak_tflops or 1.0))
    import peft

    record = {
        "setup": {"rank": RANK, "alpha": ALPHA, "targets": "query/value", "batch": args.batch, "rounds": args.rounds, "steps": args.steps,
                  "dtype": str(dtype).removeprefix("torch."), "device": device_name, "peak_tflops": peak_tflops, "tiny": args.tiny,
                  "peft": peft.__version__, "compiled": False},
        "reference": REFERENCE,
        "train_target": TRAIN_TARGET,
        "eval_target": EVAL_TARGET,
        "rows": {},
    }
    for name in args.models:  # the record is rewritten after every model, so a later failure keeps the rows measured
        work = WORKLOADS[name](args.tiny)
        row = measure(work, args.batch, args.rounds, args.steps, device, dtype, peak_tflops)
        record["rows"][work.name] = row
        print(f"{work.name}: train ratio {row['train_ratio']:.3f}, merged eval / bare {row['eval_ratio']:.3f}", flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps({**record, **machine()}, indent=1) + "\n")
        else:
            write_record("gpu_speed", record)
    return record


if __name__ == "__main__":
    main()
