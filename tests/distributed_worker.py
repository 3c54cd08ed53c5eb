"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2 --cpu` (not collected by pytest).

Trains inc_lora on a tiny stream and writes, per process, the trainable parameters' digest before every training
step and the accuracy matrix it ended with: `python tests/distributed_worker.py OUT [kill_after_task]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_config, tiny_text_stream  # noqa: E402

import loracl.engine.runner as runner_module  # noqa: E402
from loracl.engine import run_experiment  # noqa: E402

CONFIG = {"train": {"batch_size": 8, "lr": 5e-3, "epochs": 2}}


def config():
    return tiny_config({"name": "inc_lora", "dropout": 0.0}, **CONFIG)


def stream():
    return tiny_text_stream(3, train=20, test=8)


def main() -> None:
    out = Path(sys.argv[1])
    kill_after = int(sys.argv[2]) if len(sys.argv) > 2 else None
    rank = int(os.environ.get("RANK", "0"))
    digests: list[str] = []
    original_forward = runner_module.TrainingStep.forward

    def recording_forward(self, batch):  # noqa: ANN001, ANN202 - TrainingStep.forward's signature
        trainable = [p.detach().double().cpu() for p in self.model.parameters() if p.requires_grad]
        digests.append(hashlib.sha256(b"".join(t.numpy().tobytes() for t in trainable)).hexdigest())
        return original_forward(self, batch)

    runner_module.TrainingStep.forward = recording_forward
    if kill_after is not None:
        original_checkpoint = runner_module.MethodRun.checkpoint

        def checkpoint_then_die(self, method, task_index, with_backbone):  # noqa: ANN001, ANN202
            original_checkpoint(self, method, task_index, with_backbone)
            if task_index == kill_after:
                self.accelerator.wait_for_everyone()
                os._exit(17)  # as a kill would: no cleanup, nothing flushed beyond the checkpoint

        runner_module.MethodRun.checkpoint = checkpoint_then_die
    [result] = run_experiment(config(), out / "run", stream=stream())
    (out / f"rank{rank}.json").write_text(json.dumps({"digests": digests, "matrix": result.accuracy_matrix, "world": int(os.environ.get("WORLD_SIZE", "1"))}))
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
