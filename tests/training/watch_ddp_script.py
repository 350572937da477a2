"""Run by test_watch.py under torchrun (2 processes, gloo on the CPU): a tiny SFTTrainer run, watched.

python -m torch.distributed.run --nproc_per_node 2 tests/training/watch_ddp_script.py OUT_DIR
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # + conftest

from test_watch import COMMON, TOKENIZER, sums, tiny_model  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import tunewise  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1]) / "out"
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    args = SFTConfig(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        max_length=64,
        learning_rate=1e-3,
        ddp_backend="gloo",
        **COMMON,
    )
    trainer = SFTTrainer(
        model=tiny_model(tokenizer), args=args, train_dataset=sums(), processing_class=tokenizer
    )
    tunewise.watch(trainer)
    trainer.train()


if __name__ == "__main__":
    main()
