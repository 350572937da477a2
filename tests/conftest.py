"""Shared fixtures: a tiny Llama model saved next to the real SmolLM2 tokenizer, and small data files.

Markers (pyproject.toml): `slow` (the real SmolLM2, or several processes), `model` (set here on every
test under tests/training/ and every test that uses the tiny model: they load or train a model),
`chromium` (a real headless browser).
`make test-fast` runs what has none of them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZERS = FIXTURES / "tokenizers"
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))  # scripts/chromium.py: a real browser

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TUNEWISE_CACHE", str(Path(__file__).parent.parent / ".cache" / "tunewise"))


def make_tiny_model(
    directory: Path, tokenizer_dir: Path = TOKENIZERS / "smollm2", seed: int = 0, hidden: int = 64
) -> Path:
    """Save a 2-layer Llama (hidden 64) with the given tokenizer so `model.name=<directory>` loads it.

    Every linear layer is a multiple of 64 wide and 32 tall: the shapes every bitsandbytes 4-bit
    backend takes (the AVX512-BF16 CPU layout needs both; test_quantization.py proves narrower ones
    are caught).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    training = Path(__file__).parent / "training"
    for item in items:
        uses_model = {"tiny_model_dir", "narrow_model_dir"} & set(getattr(item, "fixturenames", ()))
        if uses_model or training in Path(item.path).parents:
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def narrow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama at hidden 32 (LoRA/full only: too narrow for the AVX512-BF16 4-bit layout).

    The sweep tests need a trial that reliably diverges at a rate validation accepts (< 1); the
    narrower model does at 0.5, the hidden-64 one does not.
    """
    return make_tiny_model(tmp_path_factory.mktemp("narrow-model"), hidden=32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LlamaForCausalLM with the real SmolLM2 tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def write_subset(directory: Path, n_train: int = 64, n_val: int = 16, n_test: int = 8) -> dict[str, Path]:
    """Write the first rows of the bundled splits to small JSONL files."""
    from tunewise.task import bundled_data_dir

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in [("train", n_train), ("validation", n_val), ("test", n_test)]:
        rows = (bundled_data_dir() / f"{split}.jsonl").read_text().splitlines()[:n]
        out[split] = directory / f"{split}.jsonl"
        out[split].write_text("\n".join(rows) + "\n")
    return out


@pytest.fixture()
def small_data(tmp_path: Path) -> dict[str, Path]:
    """64 train / 16 validation / 8 test rows of the bundled dataset."""
    return write_subset(tmp_path / "data")


def tiny_overrides(model_dir: Path, data: dict[str, Path], out: Path, extra: dict | None = None) -> list[str]:
    """Overrides that point a config at the tiny model and small data, with a short schedule."""
    base = {
        "model.name": str(model_dir),
        "model.method": "lora",
        "output_dir": str(out),
        "data.train": str(data["train"]),
        "data.validation": str(data["validation"]),
        "data.test": str(data["test"]),
        "data.max_seq_length": 128,
        "training.per_device_train_batch_size": 4,
        "training.gradient_accumulation_steps": 2,
        "training.max_steps": 6,
        "training.logging_steps": 2,
        "training.eval_steps": 3,
        "training.save_steps": 3,
        "training.optim": "adamw_torch",
        "training.gradient_checkpointing": False,
    }
    base.update(extra or {})
    return [f"{k}={v}" for k, v in base.items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# accelerate's config for two processes on the CPU (gloo): the type accelerate starts several local CPU
# processes with (MULTI_CPU needs mpirun); tests of --launcher accelerate write it as their config file
ACCELERATE_CPU_PAIR = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 1
machine_rank: 0
main_process_port: 0
mixed_precision: 'no'
use_cpu: true
"""
