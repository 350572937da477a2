"""Run by test_multinode.py under torchrun (2 processes, gloo on the CPU): the monitor's DDP agreement.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/training/ddp_agree_script.py OUT_DIR

Each process records a different loss (rank + 1) for six steps; only rank 1's doctor finds a divergence,
at step 3. Each rank writes what its StepRecord and StepMonitor saw to OUT_DIR/rank<R>.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerControl, TrainerState

from tunewise.doctor.findings import Finding, Fix
from tunewise.training.monitor import StepMonitor, StepRecord

DIVERGES_AT = 3


class _Trainer:
    def __init__(self) -> None:
        self.step_record = StepRecord()


class _Watcher:
    """A doctor that finds an explosion at DIVERGES_AT on one rank only."""

    def __init__(self, sees_it: bool) -> None:
        self.sees_it = sees_it

    def observe_train(self, step: int, *args: object, **kwargs: object) -> list[Finding]:
        if self.sees_it and step == DIVERGES_AT:
            fix = Fix("training.learning_rate=1e-05", "")
            return [Finding(step, "error", "loss_explosion", "the loss exploded", {}, [], [fix])]
        return []

    def finish(self) -> list[Finding]:
        return []


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    trainer = _Trainer()
    monitor = StepMonitor(trainer, None, _Watcher(sees_it=rank == 1), is_main=rank == 0)  # type: ignore[arg-type]
    state, control = TrainerState(), TrainerControl()
    losses, stopped_at = [], None
    for step in range(1, 7):
        ids = torch.ones(1, 8, dtype=torch.long)
        trainer.step_record.add(torch.tensor(float(rank + 1)), {"input_ids": ids, "labels": ids})
        state.global_step, state.epoch = step, step / 6
        trainer.step_record.settle()  # as on_pre_optimizer_step does
        losses.append(trainer.step_record.loss)
        monitor.on_step_end(None, state, control)  # type: ignore[arg-type]
        if control.should_training_stop:
            stopped_at = step
            break
    monitor.on_train_end(None, state, control)  # type: ignore[arg-type]
    seen = {"losses": losses, "stopped_at": stopped_at, "diverged_at": monitor.diverged_at}
    (Path(sys.argv[1]) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
