"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2 --cpu` (not collected by pytest).

Trains inc_lora (or the methods named) on a tiny stream and writes, per process, the trainable parameters' digest
before every training step and the accuracy matrices: `python tests/distributed_worker.py OUT [kill_after_task]
[method,method,...]` (kill_after_task -1: no kill).
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


# what a method needs to train under several processes (LoRAC-IPC's default importance reads rank-local gradients)
# (and sizes shrink: ICM-Fusion's default VAE training takes minutes)
DISTRIBUTED_OPTIONS = {
    "lorac_ipc": {"ipc_importance": "lora_factors"},
    "icm_fusion": {"harvest_checkpoints": 2, "fusion": {"warm_start_steps": 4, "meta_steps": 2, "learned_weight_steps": 2, "latent_dim": 8}},
}


def config(methods: list[str] | None = None):
    entries = [{"name": name, **DISTRIBUTED_OPTIONS.get(name, {})} for name in methods or []] or [{"name": "inc_lora", "dropout": 0.0}]
    return tiny_config(entries, **(CONFIG if not methods else {"train": {"batch_size": 4, "epochs": 1}}))


def stream(methods: list[str] | None = None):
    return tiny_text_stream(2, train=8, test=4) if methods else tiny_text_stream(3, train=20, test=8)


def main() -> None:
    out = Path(sys.argv[1])
    kill_after = int(sys.argv[2]) if len(sys.argv) > 2 and int(sys.argv[2]) >= 0 else None
    methods = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    rank = int(os.environ.get("RANK", "0"))
    digests: list[str] = []
    original_forward = runner_module.TrainingStep.forward

    def recording_forward(self, batch):  # noqa: ANN001, ANN202 - TrainingStep.forward's signature
        trainable = [p.detach().double().cpu() for p in self.model.parameters() if p.requires_grad]
        digests.append(self.method[0].name + ":" + hashlib.sha256(b"".join(t.numpy().tobytes() for t in trainable)).hexdigest())
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
    results = run_experiment(config(methods), out / "run", stream=stream(methods))
    summary = {
        "digests": digests,
        "matrix": results[0].accuracy_matrix,
        "matrices": {result.label: result.accuracy_matrix for result in results},
        "world": int(os.environ.get("WORLD_SIZE", "1")),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
