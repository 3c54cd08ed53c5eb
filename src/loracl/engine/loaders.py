"""Data loaders over a task's split: shuffled training batches, length-sorted evaluation batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from loracl.backbones.base import Backbone
from loracl.data.stream import Split


class SplitLoader:
    """Iterates batches {inputs, labels, task_ids} of one split; re-iterable, seeded, no worker processes."""

    def __init__(
        self,
        split: Split,
        backbone: Backbone,
        batch_size: int,
        task_index: int,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        sort_by_length: bool = False,
        split_name: str = "train",
        task_name: str = "",
        collate: Callable[[Split, list[int]], dict[str, Any]] | None = None,
        shard: tuple[int, int] = (0, 1),
        shard_by: Literal["rows", "batches"] = "rows",
    ) -> None:
        self.split = split
        self.backbone = backbone
        self.batch_size = batch_size
        self.task_index = task_index
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        self.sort_by_length = sort_by_length
        self.split_name = split_name
        self.task_name = task_name
        self.epoch = 0
        # the task model's collation (a language model also needs the task's instruction and answers)
        self.collate = collate
        # (this process, processes): each global batch is split between processes, so N processes see the batches
        # one process would see; a last batch smaller than N is topped up from its start (accelerate's even_batches).
        # shard_by "batches" (evaluation) hands out whole batches instead: this process gets batches rank, rank + N,
        # ... of the one-process batching, so every example is seen once, in the very batch one process would form
        self.shard = shard
        self.shard_by = shard_by

    def _global_batches(self) -> int:
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        """The batches this process iterates."""
        rank, processes = self.shard
        if self.shard_by == "batches":
            return len(range(rank, self._global_batches(), processes))
        return self._global_batches()

    def _order(self) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.task_index, self.epoch])
            return rng.permutation(len(self.split))
        if self.sort_by_length and self.split.inputs and isinstance(self.split.inputs[0], str):
            # Batching similar lengths together cuts padding; accuracy is order-independent.
            return np.argsort([len(text) for text in self.split.inputs], kind="stable")
        return np.arange(len(self.split))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _, batch in self.numbered():
            yield batch

    def numbered(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position of the batch in the one-process batching, batch): what sharded evaluation gathers by."""
        order = self._order()
        self.epoch += 1
        rank, processes = self.shard
        for position, start in enumerate(range(0, len(order), self.batch_size)):
            indices = order[start : start + self.batch_size]
            if self.shard_by == "batches":
                if position % processes != rank:
                    continue
            elif processes > 1:
                if len(indices) < processes:
                    indices = np.resize(indices, processes)
                indices = indices[rank::processes]
            if self.collate is not None:
                inputs = self.collate(self.split, [int(i) for i in indices])
            else:
                inputs = self.backbone.collate([self.split.inputs[i] for i in indices])
            yield position, {
                "inputs": {key: value.to(self.device) for key, value in inputs.items()},
                "labels": torch.tensor([self.split.labels[i] for i in indices], device=self.device),
                "task_ids": torch.full((len(indices),), self.task_index, device=self.device),
                # (task, split, position) identifies an example, so methods can cache per-example features
                "example_keys": [(self.task_name, self.split_name, int(i)) for i in indices],
            }
