"""F-VAE size and training-step time for the two ICM-Fusion targets (factors vs delta) at MiniLM-L6's q/v shapes.

Says what an ICM fusion costs before running one: the flat length the F-VAE sees, its parameter count, the stored
floats, and the time of one warm-start step (batch 16), projected to the default 300-step warm start.

    python benchmarks/fvae_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

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
    parser.add_argument("--section", default="fvae_cost")
    parser.add_argument("--no-write", action="store_true")
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
        rows.append([target, str(divisor), f"{layout.numel:,}", f"{layout.padded:,}", f"{params:,}", f"{seconds:.2f}", f"{seconds * warm_start / 60:.1f}"])
        print(rows[-1], flush=True)
    header = ["target", "conv widths /", "values per LoRA", "padded length", "F-VAE parameters", "s per step", f"min for {warm_start} warm-start steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
    body = "\n".join(
        [
            f"One CVAE training step of the F-VAE (batch {args.batch}, forward + backward + AdamW, mean of {args.steps} after one "
            f"untimed step, {torch.get_num_threads()} torch threads) at the shapes of MiniLM-L6's query/value LoRAs (12 modules, "
            f"r={RANK}); random weights (the cost does not depend on them). `factors` encodes (A, B) as ICM-LoRA does; `delta` "
            f"encodes each module's whole update dW (spec G6), {lengths['delta'] / lengths['factors']:.0f}x longer. The last column projects the default warm start "
            "only; meta steps add in-context gradient steps on the backbone.",
            "",
            *lines,
        ]
    )
    print(body)
    if not args.no_write:
        print(f"written to {write_section(args.section, 'F-VAE cost per training step: factors vs delta target (CPU)', body)}")


if __name__ == "__main__":
    main()
