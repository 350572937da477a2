"""LoRA layers on the CPU, made cheaper without changing what they compute.

Profiled on the speed benchmark's varied chat set (SmolLM2-135M, LoRA r 8 on all linear layers, dropout
0.05, bf16 autocast), a LoRA step spent more time around the adapters' small matmuls than in them:

- **Dropout masks.** PEFT puts an `nn.Dropout` before every A matrix; torch's CPU `bernoulli_` calls the
  Mersenne twister once per element (a fifth of the step). `FastDropout` draws 64 random bits per call
  and cuts them into four 16-bit numbers, one per element, and keeps an element when its number is at
  least p x 65536 (p is rounded to 1/65536: 0.05 -> 0.0500031). The mask is kept as bool and
  multiplied in as uint8 (torch's bool kernels are scalar loops), then scaled in place, forward and
  backward. Draws come from torch's default generator, so a seeded run repeats.
- **The fp32 round trip.** PEFT casts a layer's input to the adapter's dtype (fp32) before the dropout;
  under autocast the A matmul casts it straight back to bf16. `CpuLoraLinear` leaves it in the autocast
  dtype: the same values reach the matmul (a bf16 input is exact in fp32), two full-size copies fewer
  forward and two backward.
- **Scale and sum.** PEFT computes `result + B(A(x)) * scaling`: a full-size product, a full-size sum.
  `CpuLoraLinear` folds both into one `torch.addmm(result, A(x), B^T, alpha=scaling)`, accumulated in
  fp32 and rounded once (PEFT rounds after each of the three).

`CpuLoraLinear` is PEFT's `lora.Linear` (same parameters, state dict, merge and save) with that forward
when autocast is on and the layer is plain LoRA; anything else (no autocast, merged or disabled
adapters, DoRA and other variants, a bias in B, mixed-adapter batches) runs PEFT's own forward. On a GPU
nothing is swapped.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

_STEPS = 65536  # a 16-bit draw per element


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask of `shape`: each element True (kept) with probability 1 - p (p rounded to 1/65536)."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over -32768..32767
    return draws >= round(p * _STEPS) - _STEPS // 2


def _apply_mask(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale, exactly as torch's dropout computes it, in two vectorized passes.

    torch's CPU kernels for bool operands are scalar loops (`x * keep`, `torch.where` and
    `native_dropout_backward` all took 0.5-0.8 ms on a 1145 x 576 bf16 tensor); the same bytes read as
    uint8 multiply in 0.16 ms.
    """
    return (x * keep.view(torch.uint8)).mul_(scale)


class _Dropout(torch.autograd.Function):
    """Inverted dropout with a drawn mask: forward and backward are x * keep / (1 - p)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _apply_mask(x, keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return _apply_mask(grad, keep, ctx.scale), None


class FastDropout(torch.nn.Dropout):
    """`nn.Dropout` (same p, same train/eval behaviour) whose mask is drawn by `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        return _Dropout.apply(x, self.p)


class CpuLoraLinear(LoraLinear):
    """PEFT's `lora.Linear` whose forward under autocast keeps the autocast dtype and uses one addmm."""

    def _fast_path(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """True when this forward is plain LoRA under autocast (else PEFT's own forward runs)."""
        return (
            not args
            and not kwargs
            and not self.disable_adapters
            and not self.merged
            and torch.is_autocast_enabled(x.device.type)
            and x.dtype == torch.get_autocast_dtype(x.device.type)
            and not any(name in self.lora_variant for name in self.active_adapters)
            and all(b.bias is None for b in self.lora_B.values())  # lora_bias: B's bias is scaled too
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._fast_path(x, args, kwargs):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        shape = result.shape
        flat = result.reshape(-1, shape[-1])
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            down = self.lora_A[name](self.lora_dropout[name](x))
            up = self.lora_B[name].weight
            flat = torch.addmm(flat, down.reshape(-1, down.shape[-1]), up.t(), alpha=self.scaling[name])
        return flat.view(shape)


def speed_up_cpu_lora(model: torch.nn.Module) -> None:
    """On a CPU model: LoRA's dropout modules become FastDropout and plain `lora.Linear` CpuLoraLinear."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    dropouts[name] = FastDropout(dropout.p, inplace=False)
        if type(module) is LoraLinear:
            module.__class__ = CpuLoraLinear  # same state; only the forward differs
