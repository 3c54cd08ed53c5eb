"""One rule for derived seeds: every draw made for task t (or a fixed slot) of a run with seed s uses s * 1000 + t,
so runs are reproducible, tasks draw differently, and a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derived_seed(run_seed: int, slot: int) -> int:
    """The seed for slot `slot` (a task index, or a fixed small number for once-per-run draws) of run `run_seed`."""
    return run_seed * 1000 + slot


def derived_generator(run_seed: int, slot: int) -> torch.Generator:
    """A private CPU generator seeded with derived_seed(run_seed, slot)."""
    return torch.Generator().manual_seed(derived_seed(run_seed, slot))


def _started_gpus() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's global generators (the CPU's and every started GPU's) for the block, then restore them all:
    torch.manual_seed reseeds the GPUs too, so forking only the CPU generator would leak the seed into the caller's."""
    with torch.random.fork_rng(devices=_started_gpus()):
        torch.manual_seed(seed)
        yield


@contextmanager
def private_rng(run_seed: int, slot: int) -> Iterator[None]:
    """Seed the global RNG with derived_seed for the block, then restore it (the caller's stream is untouched)."""
    with seeded_rng(derived_seed(run_seed, slot)):
        yield
