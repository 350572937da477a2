"""plan_steps against the real thing: transformers' Trainer runs, and accelerate's batch sharding.

Each grid cell trains a trivially small Llama (hidden 16, one layer) on random tokens and asserts that
the planned number of optimizer steps is the number of steps the Trainer actually ran.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import BatchSampler

from tunewise.plan import plan_steps

SEQ = 8
VOCAB = 64

# (examples, per-device batch, accumulation, epochs, max_steps)
GRID = [
    (1000, 4, 4, 3, -1),  # the lesson's example: 189 steps, not (1000 // 16) * 3 = 186
    (16, 4, 4, 1, -1),  # exactly one effective batch
    (10, 4, 4, 1, -1),  # fewer micro-batches than the accumulation
    (5, 8, 4, 2, -1),  # fewer examples than one batch
    (17, 2, 3, 2, -1),  # partial batch and partial accumulation
    (64, 4, 3, 1, -1),
    (20, 4, 1, 3, -1),  # no accumulation
    (7, 1, 8, 2, -1),
    (33, 4, 2, 1.5, -1),  # fractional epochs
    (50, 3, 4, 2.5, -1),
    (100, 8, 4, 0.3, -1),  # less than one epoch
    (40, 4, 4, 3, 7),  # max_steps inside the epochs
    (40, 4, 4, 1, 25),  # max_steps beyond the epochs: the Trainer keeps going
]


class RandomTokens(torch.utils.data.Dataset):
    """Random token sequences with labels equal to the inputs."""

    def __init__(self, n: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ * 2,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to thread hand-offs
    yield LlamaForCausalLM(config)
    torch.set_num_threads(threads)


def _args(tmp_path, batch: int, accumulation: int, epochs: float, max_steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )


@pytest.mark.parametrize(("examples", "batch", "accumulation", "epochs", "max_steps"), GRID)
def test_plan_matches_trainer(tiny_llama, tmp_path, examples, batch, accumulation, epochs, max_steps):
    from transformers import Trainer

    trainer = Trainer(
        model=tiny_llama,
        args=_args(tmp_path, batch, accumulation, epochs, max_steps),
        train_dataset=RandomTokens(examples),
    )
    trainer.train()
    plan = plan_steps(examples, batch, accumulation, epochs, max_steps)
    assert plan.total_steps == trainer.state.global_step


def test_lesson_example_is_189_not_186():
    plan = plan_steps(1000, 4, 4, 3)
    assert plan.total_steps == 189
    assert plan.rule_of_thumb == 186
    assert plan.steps_per_epoch == 63
    assert plan.effective_batch == 16


class _SizedLoader:
    """Stands in for the prepared dataloader: the Trainer only asks its length and its dataset's."""

    def __init__(self, length: int, dataset_size: int):
        self.length, self.dataset = length, range(dataset_size)

    def __len__(self) -> int:
        return self.length


# (examples, per-device batch, processes, accumulation, epochs)
SHARD_GRID = [
    (1000, 4, 2, 4, 3),
    (1000, 4, 3, 4, 3),
    (1000, 4, 8, 4, 3),
    (17, 2, 2, 3, 2),
    (5, 8, 4, 1, 1),
    (33, 4, 3, 2, 1.5),
    (64, 4, 4, 1, 1),
    (101, 3, 2, 4, 2.5),
    (7, 1, 8, 2, 2),
    (250, 8, 3, 2, 0.5),
]


@pytest.mark.parametrize(("examples", "batch", "processes", "accumulation", "epochs"), SHARD_GRID)
def test_plan_matches_accelerate_sharding(
    tiny_llama, tmp_path, examples, batch, processes, accumulation, epochs
):
    from accelerate.data_loader import BatchSamplerShard
    from transformers import Trainer

    shard = BatchSamplerShard(
        BatchSampler(range(examples), batch, False),
        num_processes=processes,
        process_index=0,
        even_batches=True,
    )
    micro = len(shard)
    assert micro == len(list(shard))  # the length accelerate reports is what it yields
    trainer = Trainer(model=tiny_llama, args=_args(tmp_path, batch, accumulation, epochs, -1))
    loader = _SizedLoader(micro, examples)
    _, per_epoch, *_, max_steps = trainer.set_initial_training_values(trainer.args, loader)
    plan = plan_steps(examples, batch, accumulation, epochs, processes=processes)
    assert plan.micro_batches_per_epoch == micro
    assert plan.steps_per_epoch == per_epoch
    assert plan.total_steps == max_steps == math.ceil(epochs * per_epoch)
    assert plan.effective_batch == batch * accumulation * processes
