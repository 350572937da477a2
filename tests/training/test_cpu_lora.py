"""tunewise.cpu_lora: LoRA's CPU dropout is still dropout, the CPU LoRA layer computes what PEFT's does, and
the model gets both."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_overrides
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file

from tunewise.config import load_config
from tunewise.cpu_lora import CpuLoraLinear, FastDropout, keep_mask, speed_up_cpu_lora
from tunewise.model import load_model, load_tokenizer, resolve_hardware


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_the_mask_drops_p_of_the_elements_in_every_lane_of_a_draw(p: float) -> None:
    # 4 elements share one 64-bit draw: each of the 4 lanes must drop p (a draw over [0, 2^63) would
    # leave the top lane's sign bit at 0 and drop 2p there).
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([4_000_000]), p)
    sigma = (p * (1 - p) / 1_000_000) ** 0.5
    for lane in range(4):
        dropped = 1.0 - keep[lane::4].float().mean().item()
        assert abs(dropped - p) < 6 * sigma + 1 / 65536, (lane, dropped)
    # neighbours are independent: P(both dropped) = p^2
    both = (~keep[:-1] & ~keep[1:]).float().mean().item()
    assert abs(both - p * p) < 6 * (p * p / 4_000_000) ** 0.5 + 1e-4


def test_fast_dropout_is_inverted_dropout_with_its_gradient() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 96, dtype=torch.float64, requires_grad=True)
    layer = FastDropout(0.3)
    y = layer(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.7)
    y.sum().backward()
    assert torch.equal(x.grad, kept.double() / 0.7)
    layer.eval()
    assert layer(x) is x
    # a seeded run repeats its masks; another seed draws others
    masks = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        masks.append(FastDropout(0.3)(torch.ones(1000)) == 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert torch.equal(FastDropout(1.0)(torch.ones(3)), torch.zeros(3))


def test_a_cpu_lora_model_gets_fast_dropout_and_the_cpu_layer_in_every_adapted_layer(
    tiny_model_dir, small_data, tmp_path
):
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path, {"adapter.dropout": 0.1}))
    hw = resolve_hardware(cfg)
    model = load_model(cfg, hw, load_tokenizer(cfg))
    dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is FastDropout and d.p == 0.1 for d in dropouts)
    # with no dropout PEFT keeps its Identity: nothing to replace
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path, {"adapter.dropout": 0.0}))
    model = load_model(cfg, hw, load_tokenizer(cfg))
    assert not any(type(m) is FastDropout for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is CpuLoraLinear for m in layers)  # the layers are swapped all the same


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(48, 80, bias=True)
        self.down = torch.nn.Linear(80, 48, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


def _pair(dropout: float, **lora: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same bf16 base with an fp32 adapter twice: PEFT's layers, and the CPU ones (B non-zero)."""
    torch.manual_seed(0)
    base = _Two().to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"], **lora)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B["default"].weight.normal_()
    ours = copy.deepcopy(peft_model)
    speed_up_cpu_lora(ours)
    speed_up_cpu_lora(peft_model)  # the same dropout in both; PEFT's layer class put back in one
    for m in peft_model.modules():
        if type(m) is CpuLoraLinear:
            m.__class__ = LoraLinear
    return peft_model, ours


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict]:
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return y.float(), grads | {"x": x.grad.float()}


def _error(got: tuple[torch.Tensor, dict], exact: tuple[torch.Tensor, dict]) -> dict[str, float]:
    """The largest error of the output and of each gradient, relative to the largest exact value."""
    (y, grads), (y_exact, exact_grads) = got, exact
    errors = {"output": ((y - y_exact).abs().max() / y_exact.abs().max()).item()}
    return errors | {n: ((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in exact_grads.items()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_cpu_lora_layer_computes_what_peft_computes_under_autocast(dropout: float) -> None:
    peft_model, ours = _pair(dropout)
    assert sum(type(m) is CpuLoraLinear for m in ours.modules()) == 2
    exact_model = copy.deepcopy(peft_model).double()  # the same weights and masks, in float64
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    exact = _forward_backward(exact_model, x.double(), autocast=False)
    peft_run, our_run = (_forward_backward(m, x, autocast=True) for m in (peft_model, ours))
    assert our_run[0].shape == exact[0].shape and our_run[1].keys() == exact[1].keys()
    assert any("lora_A" in n for n in our_run[1])
    peft_error, our_error = _error(peft_run, exact), _error(our_run, exact)
    for name, error in our_error.items():  # bf16 rounding only, and no more of it than PEFT's
        assert error < 0.03 and error <= 1.5 * peft_error[name] + 2e-3, (name, error, peft_error[name])
    # a wrong scale is far off: the adapter's share of the output is not small here
    ours.base_model.model.up.scaling["default"] *= 2
    assert _error(_forward_backward(ours, x, autocast=True), exact)["output"] > 0.1


def test_the_cpu_lora_layer_runs_peft_forward_where_its_own_does_not_apply() -> None:
    peft_model, ours = _pair(0.1)
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    # no autocast (generation, evaluation outside the Trainer): PEFT's forward, bit for bit
    y_peft, g_peft = _forward_backward(peft_model, x, autocast=False)
    y_ours, g_ours = _forward_backward(ours, x, autocast=False)
    assert torch.equal(y_ours, y_peft) and all(torch.equal(g_ours[n], g) for n, g in g_peft.items())
    # adapters disabled, then merged: the base alone, then the merged weights, as PEFT computes them
    for model in (peft_model, ours):
        model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with peft_model.disable_adapter(), ours.disable_adapter():
            assert torch.equal(ours(x), peft_model(x))
        peft_model.merge_adapter()
        ours.merge_adapter()
        assert torch.equal(ours(x), peft_model(x))


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"lora_bias": True}])
def test_dora_or_a_bias_in_b_keeps_peft_forward(variant: dict) -> None:
    peft_model, ours = _pair(0.0, **variant)
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    y_peft, _ = _forward_backward(peft_model, x, autocast=True)
    y_ours, _ = _forward_backward(ours, x, autocast=True)
    assert torch.equal(y_ours, y_peft)


def test_the_cpu_lora_model_saves_and_merges_as_peft_does(tmp_path) -> None:
    peft_model, ours = _pair(0.1)
    ours.save_pretrained(tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    merged = ours.merge_and_unload()
    assert type(merged.up) is torch.nn.Linear and type(merged.down) is torch.nn.Linear
