"""A small generated chat dataset (OpenAI `messages` format) for the doctor's learning-rate ladder.

Short, varied conversations a 135M model can learn something from in 20-30 steps: arithmetic, word
reversal, upper-casing, sorting numbers, counting words, and a few two-turn chats. Lengths vary from a
handful of tokens to about a hundred, so batches are ragged the way real chat data is. Seeded: the same
seed writes the same files.

    python benchmarks/ladder/make_chat.py OUT_DIR [--train 400] [--validation 16] [--seed 0]

Writes OUT_DIR/train.jsonl and OUT_DIR/validation.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "river stone cloud apple window garden yellow quiet orange market silver engine paper candle forest "
    "winter basket pencil mirror ladder rocket violin harbor meadow tunnel planet copper velvet island "
    "lantern thunder pepper marble saddle feather circus blanket kettle compass"
).split()
SYSTEMS = ("You are a helpful assistant.", "Answer briefly and exactly.", None)


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 9)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _upper(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 1, 12)
    return f"Write this in capital letters: {' '.join(words)}", " ".join(words).upper()


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 12))]
    shown = ", ".join(map(str, numbers))
    return f"Sort from smallest to largest: {shown}", ", ".join(map(str, sorted(numbers)))


def _count(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 1, 15)
    n = len(words)
    return f'How many words are in: "{" ".join(words)}"?', f"There {'is' if n == 1 else 'are'} {n} " + (
        "word." if n == 1 else "words."
    )


TASKS = (_arithmetic, _reverse, _upper, _sort, _count)


def make_conversation(rng: random.Random) -> dict:
    """One row: an optional system prompt, then one or two user/assistant turns."""
    messages = []
    system = rng.choice(SYSTEMS)
    if system:
        messages.append({"role": "system", "content": system})
    for _ in range(1 if rng.random() < 0.75 else 2):
        question, answer = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_chat_dataset(out_dir: Path, n_train: int = 400, n_validation: int = 16, seed: int = 0) -> dict:
    """Write train.jsonl and validation.jsonl under `out_dir`; returns {split: path}."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("validation", n_validation)):
        paths[split] = out_dir / f"{split}.jsonl"
        rows = [json.dumps(make_conversation(rng)) for _ in range(n)]
        paths[split].write_text("\n".join(rows) + "\n", encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--validation", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_chat_dataset(args.out_dir, args.train, args.validation, args.seed)


if __name__ == "__main__":
    main()
