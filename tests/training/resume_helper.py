"""One `tunewise train` in its own process, for the kill-and-resume tests (test_resume_exact.py).

    python resume_helper.py RECORD.jsonl [--kill-at-step N] [--kill-in-save-at N] [--no-restore]
                            -- TRAIN ARGS...

Records, for every micro-batch, the optimizer step it belongs to and the example indices it holds
(each example's prompt says "example <i>"), so a test can compare the data order of runs. With
`--kill-at-step N` the process SIGKILLs itself right after step N; with `--kill-in-save-at N` in the
middle of step N's checkpoint save (model and optimizer written, RNG state and manifest not yet).
`--no-restore` is the negative control: a resume restores neither the RNG states nor the data position.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys

from transformers import Trainer, TrainerCallback

from tunewise.cli import main
from tunewise.training.monitor import WatchedTrainer

EXAMPLE = re.compile(r"example (\d+):")


def _record_batches(path: str) -> None:
    original = WatchedTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        texts = self.processing_class.batch_decode(inputs["input_ids"])
        ids = sorted(int(m) for text in texts for m in EXAMPLE.findall(text))
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"step": self.state.global_step + 1, "ids": ids, "pid": os.getpid()}) + "\n")
        return original(self, model, inputs, num_items_in_batch)

    WatchedTrainer.training_step = training_step


class KillAfterStep(TrainerCallback):
    """SIGKILL this process once step N has ended (before any save of step N)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_save(step: int) -> None:
    original = Trainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    Trainer._save_rng_state = save_rng_state


def _kill_after(step: int) -> None:
    original = WatchedTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(KillAfterStep(step))

    WatchedTrainer.__init__ = init


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("record")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save-at", type=int)
    parser.add_argument("--no-restore", action="store_true")
    split = sys.argv.index("--")
    opts, train_args = parser.parse_args(sys.argv[1:split]), sys.argv[split + 1 :]
    _record_batches(opts.record)
    if opts.kill_at_step:
        _kill_after(opts.kill_at_step)
    if opts.kill_in_save_at:
        _kill_in_save(opts.kill_in_save_at)
    if opts.no_restore:
        Trainer._load_rng_state = lambda self, checkpoint: None
    sys.exit(main(["train", *train_args]))
