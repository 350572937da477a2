"""tunewise.dropout: LoRA's CPU dropout from cheaper random bits is still dropout, and the model gets it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from tunewise.config import load_config
from tunewise.dropout import FastDropout, keep_mask
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


def test_a_cpu_lora_model_gets_fast_dropout_in_every_adapted_layer(tiny_model_dir, small_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path, {"adapter.dropout": 0.1}))
    hw = resolve_hardware(cfg)
    model = load_model(cfg, hw, load_tokenizer(cfg))
    dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is FastDropout and d.p == 0.1 for d in dropouts)
    # with no dropout PEFT keeps its Identity: nothing to replace
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path, {"adapter.dropout": 0.0}))
    model = load_model(cfg, hw, load_tokenizer(cfg))
    assert not any(type(m) is FastDropout for m in model.modules())
