"""Generation throughput of `tunewise eval` vs a plain `model.generate` loop, one prompt at a time.

Same model (the embedded SmolLM2-135M-Instruct as `eval` loads it, from the demo config), same prompts
(the first N of the bundled test split), same `max_new_tokens` (eval's cap from the reference lengths),
greedy decoding. `eval` is `tunewise.evaluate.generate`: prompts sorted by length and batched
(`eval.batch_size` at once, left-padded). The plain loop tokenizes each prompt and calls
`model.generate` with a batch of one. Timed in ABBA order (plain, eval, eval, plain) after one warm-up
call each, so slow drift of the machine cancels; reports wall seconds, replies per second, reply
tokens per second (the replies re-tokenized, the same count for both), the ratio, and how many
replies are word for word the same (padding can change the last bits of a batched forward pass).

    PYTHONPATH=src python benchmarks/bench_eval.py [--n 24] [--batch-size 32] [--rounds 1] [--threads N]

Writes benchmarks/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tunewise.config import load_config  # noqa: E402
from tunewise.demo import DEMO_CONFIG  # noqa: E402
from tunewise.evaluate import (  # noqa: E402
    cap_new_tokens,
    generate,
    load_for_inference,
    load_test_set,
    prompt_of,
    reference_of,
)

RESULTS = Path(__file__).resolve().parent / "results" / "eval.json"


def plain_loop(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """What a user writes without tunewise: one prompt at a time through `model.generate`."""
    replies = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(
            prompt_of(conversation), add_generation_prompt=True, tokenize=False
        )
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        replies.append(
            tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return replies


def timed(fn, *args) -> tuple[float, list[str]]:
    started = time.perf_counter()
    replies = fn(*args)
    return time.perf_counter() - started, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24, help="test prompts (default 24)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="eval.batch_size (default: the config's)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 on a crowded machine, where idle OpenMP "
                        "threads spin-wait for the busy ones")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(DEMO_CONFIG)
    batch_size = args.batch_size or cfg.eval.batch_size
    conversations = load_test_set(cfg, args.n).conversations
    model, tokenizer = load_for_inference(cfg, None)
    max_new_tokens, why = cap_new_tokens(tokenizer, [reference_of(c) for c in conversations])

    def run_eval(convs: list[list[dict]], cap: int) -> list[str]:
        return generate(model, tokenizer, convs, max_new_tokens=cap, batch_size=batch_size)

    def run_plain(convs: list[list[dict]], cap: int) -> list[str]:
        return plain_loop(model, tokenizer, convs, cap)

    methods = {"eval": run_eval, "plain": run_plain}
    for fn in methods.values():  # warm-up: first-call allocations and kernels
        fn(conversations[:1], 4)
    seconds: dict[str, list[float]] = {"eval": [], "plain": []}
    replies: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name in ("plain", "eval", "eval", "plain"):
            wall, replies[name] = timed(methods[name], conversations, max_new_tokens)
            seconds[name].append(wall)
            print(f"{name}: {wall:.1f}s", flush=True)

    tokens = {
        k: sum(len(tokenizer(r, add_special_tokens=False).input_ids) for r in v) for k, v in replies.items()
    }
    mean = {k: sum(v) / len(v) for k, v in seconds.items()}
    result = {
        "what": "generation for `tunewise eval` (batched by length) vs a plain model.generate loop, batch 1",
        "model": cfg.model.name,
        "method": cfg.model.method,
        "prompts": len(conversations),
        "max_new_tokens": max_new_tokens,
        "max_new_tokens_from": why,
        "batch_size": batch_size,
        "greedy": True,
        "torch_threads": torch.get_num_threads(),
        "order": "ABBA (plain, eval, eval, plain) x rounds, after one warm-up call each",
        "seconds": seconds,
        "mean_seconds": {k: round(v, 2) for k, v in mean.items()},
        "replies_per_s": {k: round(len(conversations) / v, 3) for k, v in mean.items()},
        "reply_tokens_per_s": {k: round(tokens[k] / mean[k], 2) for k in mean},
        "speedup": round(mean["plain"] / mean["eval"], 2),
        "same_replies": sum(a == b for a, b in zip(replies["eval"], replies["plain"], strict=True)),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },  # fmt: skip
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
