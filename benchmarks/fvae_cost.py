"""F-VAE size and training-step time for the two ICM-Fusion targets (factors vs delta) at MiniLM-L6's q/v shapes.

Says what an ICM fusion costs before running one: the flat length the F-VAE sees, its parameter count, the stored
floats, and the time of one warm-start step (batch 16), projected to the default 300-step warm start.

    python benchmarks/fvae_cost.py --threads 2

Writes docs/results/fvae_cost.json (rendered into docs/results.md's Costs section by `python benchmarks/bench.py summary`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_record  # noqa: E402

from loracl.adapters.peft_io import LoraPair  # noqa: E402
from loracl.fusion.flat import FlatLayout, full_rank_view  # noqa: E402
from loracl.fusion.icm_fusion import IcmFusionOptions  # noqa: E402
from loracl.fusion.vae import FusionVAE, cvae_loss  # noqa: E402

HIDDEN, LAYERS, RANK = 384, 6, 8  # all-MiniLM-L6-v2: 6 blocks, hidden 384; LoRA on query and value


def minilm_shaped_lora(seed: int) -> dict[str, LoraPair]:
    """A random rank-8 LoRA with the shapes of MiniLM-L6's query/value projections (values do not matter here)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"encoder.layer.{block}.attention.self.{name}": LoraPair(
            torch.randn(RANK, HIDDEN, generator=generator), torch.randn(HIDDEN, RANK, generator=generator), 2.0
        )
        for block in range(LAYERS)
        for name in ("query", "value")
    }


def step_seconds(vae: FusionVAE, length: int, batch: int, steps: int) -> float:
    """Mean wall time of one CVAE training step (forward, backward, AdamW) after one untimed step."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    flats, conditions = torch.randn(batch, length), torch.randn(batch, HIDDEN)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        reconstruction, mean, logvar = vae(flats, conditions)
        loss = cvae_loss(flats, reconstruction, mean, logvar, 0.005)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - started)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="print the record, do not write docs/results/fvae_cost.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    adapter = minilm_shaped_lora(0)
    warm_start = IcmFusionOptions().warm_start_steps
    rows = []
    lengths = {}
    for target, divisor in [("factors", 1), ("factors", 4), ("delta", 8), ("delta", 16)]:
        layout = FlatLayout.of(full_rank_view(adapter), identity_down=True) if target == "delta" else FlatLayout.of(adapter)
        lengths[target] = layout.numel
        vae = FusionVAE(layout.padded, HIDDEN, 256, divisor)
        params = sum(p.numel() for p in vae.parameters())
        seconds = step_seconds(vae, layout.padded, args.batch, args.steps)
        rows.append({"target": target, "conv_divisor": divisor, "values_per_lora": layout.numel, "padded_length": layout.padded,
                     "parameters": params, "s_per_step": seconds, "warm_start_min": seconds * warm_start / 60})
        print(rows[-1], flush=True)
    record = {
        "setup": {"backbone_shapes": "minilm-l6 query/value", "modules": 2 * LAYERS, "rank": RANK, "batch": args.batch,
                  "timed_steps": args.steps, "threads": torch.get_num_threads(), "warm_start_steps": warm_start},
        "rows": rows,
        "delta_over_factors_length": lengths["delta"] / lengths["factors"],
    }
    if args.no_write:
        print(json.dumps(record, indent=1))
    else:
        print(f"written to {write_record('fvae_cost', record)}")


if __name__ == "__main__":
    main()
