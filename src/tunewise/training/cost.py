"""What a training step costs: model FLOPs per token, the device's measured matmul peak, and the MFU.

The monitor (tunewise/training/monitor.py) puts each step's MFU in metrics.jsonl and the run's in
result.json; `benchmarks/bench_speed.py` uses the same numbers side by side with TRL.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunewise.model import cache_dir, count_parameters, torch_dtype


@dataclass
class StepCost:
    """FLOPs per token and per attention pair of the model, and the device's measured peak.

    Per token: the forward's 2 FLOPs per parameter, 2 more for the gradient with respect to the inputs, and
    2 per trainable parameter for the weight gradients (6N for full fine-tuning; 4N + 2N_trainable for LoRA,
    whose frozen weights need no weight gradient). Per causal pair: 4 FLOPs per hidden unit and layer forward
    (QK^T and AV), 3x with the backward. Recomputation under gradient checkpointing is not counted (MFU, not
    hardware utilisation); padding is never counted.
    """

    flops_per_token: float
    flops_per_pair: float
    peak_flops: float | None  # FLOP/s of a matmul at the training dtype on this device

    def step_flops(self, tokens: int, pairs: int) -> float:
        """Model FLOPs of a step with these real tokens and causal attention pairs."""
        return self.flops_per_token * tokens + self.flops_per_pair * pairs

    def mfu(self, tokens: int, pairs: int, seconds: float) -> float | None:
        """Model FLOPs utilisation of a step: its model FLOPs per second over the peak."""
        if not self.peak_flops or seconds <= 0:
            return None
        return self.step_flops(tokens, pairs) / seconds / self.peak_flops


def step_cost(
    total_params: int, trainable_params: int, layers: int, hidden: int, peak: float | None
) -> StepCost:
    """The StepCost of a model from its parameter counts and shape."""
    return StepCost(
        flops_per_token=4.0 * total_params + 2.0 * trainable_params,
        flops_per_pair=12.0 * layers * hidden,
        peak_flops=peak,
    )


def measure_peak_flops(device: str, dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul at `dtype` on `device`: the best of repeated runs for about `seconds`."""
    # Its own generator: measuring must not move the global RNG (dropout, data order), or a run that
    # measured (an empty cache) and one that read the cache would train differently from the same seed.
    rng = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=rng).to(dtype)
    b = torch.randn(size, size, device=device, generator=rng).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel choice, page faults
    sync()
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds or best == float("inf"):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def peak_flops(
    device: str, device_name: str, dtype: torch.dtype, cache: Path, remeasure: bool = False
) -> float:
    """The device's matmul peak at `dtype`, measured once per device, dtype and threads; kept in `cache`."""
    threads = f" x{torch.get_num_threads()} threads" if device == "cpu" else ""
    key = f"{device}|{device_name}{threads}|{str(dtype).removeprefix('torch.')}"
    known = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    if key not in known or remeasure:
        known[key] = measure_peak_flops(device, dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=2), encoding="utf-8")
    return float(known[key])


PEAK_CACHE = "peak_flops.json"  # in tunewise's cache directory


def model_step_cost(model: Any, device: str, device_name: str, precision: str) -> StepCost:
    """The StepCost of a loaded (PEFT) model on this device, with the peak measured once per device."""
    trainable, total = count_parameters(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT or plain
    embed, output = base.get_input_embeddings(), base.get_output_embeddings()
    if output is None or output.weight is not embed.weight:
        total -= embed.weight.numel()  # a lookup is no matmul; a tied embedding counts as the output layer
    config = base.config
    peak = peak_flops(device, device_name, torch_dtype(precision), cache_dir() / PEAK_CACHE)
    return step_cost(total, trainable, config.num_hidden_layers, config.hidden_size, peak)
