"""QLoRA layers the active bitsandbytes backend cannot quantize are found before any weight loads.

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks 4-bit weights for inference into 32-row blocks with
one absmax per 64 inputs; a narrower layer crashes deep inside it (`shape '[32, 0]' is invalid`). These
tests pin the rule against bitsandbytes' own repacking code (which runs on any CPU) and then force that
backend on, so they mean the same on machines with and without AVX512-BF16.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import make_tiny_model

from tunewise import model as model_module
from tunewise.check import run_check
from tunewise.cli import main
from tunewise.config import load_config
from tunewise.errors import ModelError
from tunewise.model import BNB_BLOCKSIZE, CPU_PACK_ROWS, load_base_model
from tunewise.plan import plan_config


def _repacks(n_in: int, n_out: int) -> bool:
    """Whether bitsandbytes' AVX512-BF16 CPU repacking accepts a 4-bit weight of this shape."""
    weight = torch.randn(n_out, n_in, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, blocksize=BNB_BLOCKSIZE, quant_type="nf4")
    try:
        bnbf._convert_weight_packed_for_cpu(packed, state)
    except (RuntimeError, AssertionError):
        return False
    return True


@pytest.mark.parametrize("n_in,n_out", [(32, 64), (64, 32), (64, 48), (128, 64), (96, 32), (64, 16)])
def test_the_rule_matches_bitsandbytes_repacking(n_in, n_out):
    accepts = n_in % BNB_BLOCKSIZE == 0 and n_out % CPU_PACK_ROWS == 0
    assert _repacks(n_in, n_out) == accepts


@pytest.fixture()
def avx512bf16(monkeypatch):
    """Make bitsandbytes report AVX512-BF16, as it does on such a CPU."""
    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: True)


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory) -> Path:
    """A tiny Llama with hidden size 32: its attention and MLP inputs are too narrow for the CPU layout."""
    directory = tmp_path_factory.mktemp("narrow")
    make_tiny_model(directory)

    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_size=32, intermediate_size=64)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _cfg(model_dir: Path, tmp_path: Path, *extra: str):
    return load_config(
        None, [f"model.name={model_dir}", "model.method=qlora", f"output_dir={tmp_path}", *extra]
    )


def test_check_fails_with_the_fix_before_loading_weights(avx512bf16, narrow_model, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(model_module, "load_base_model", lambda *a, **k: loaded.append(1))
    report = run_check(_cfg(narrow_model, tmp_path))
    item = report.item("quantization")
    assert item.status == "FAIL" and report.failed
    # 7 linears x 2 layers; down_proj (64 in, 32 out) fits, and so does o_proj (head_dim 16 x 4 heads = 64 in)
    assert item.numbers["unsupported"] == 10 and item.numbers["quantized"] == 14
    assert "in_features a multiple of 64" in item.detail and "q_proj" in item.detail
    assert item.fix.startswith("model.method=lora")
    assert "model.keep_unquantized=[gate_proj,k_proj,q_proj,up_proj,v_proj]" in item.fix
    assert plan_config(_cfg(narrow_model, tmp_path))["quantization"]["problem"] == item.detail
    assert loaded == []


def test_plan_prints_the_problem_in_one_line(avx512bf16, narrow_model, tmp_path, capsys):
    assert main(["plan", f"model.name={narrow_model}", "model.method=qlora", f"output_dir={tmp_path}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "4-bit layers:" in line]
    assert len(lines) == 1 and "model.method=lora" in lines[0]


def test_train_stops_in_one_line_not_inside_bitsandbytes(avx512bf16, narrow_model, tmp_path, capsys):
    with pytest.raises(ModelError, match="cannot be quantized to 4-bit.*model.method=lora"):
        load_base_model(
            _cfg(narrow_model, tmp_path), model_module.resolve_hardware(_cfg(narrow_model, tmp_path))
        )
    assert main(["train", "--force", "--quiet", "--no-samples", *_args(narrow_model, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot be quantized to 4-bit" in err and "Traceback" not in err


def _args(model_dir: Path, tmp_path: Path) -> list[str]:
    return [f"model.name={model_dir}", "model.method=qlora", f"output_dir={tmp_path}", "training.max_steps=1"]


def test_the_suite_model_and_the_real_model_fit_every_backend(avx512bf16, tiny_model_dir, tmp_path):
    report = run_check(_cfg(tiny_model_dir, tmp_path))
    assert report.item("quantization").status == "PASS"
    assert report.item("quantization").numbers["unsupported"] == 0


def test_keep_unquantized_leaves_the_narrow_layers_out(avx512bf16, narrow_model, tmp_path):
    cfg = _cfg(
        narrow_model,
        tmp_path,
        "model.keep_unquantized=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    )
    layers = model_module.quantized_layers(cfg, "cpu")
    assert layers is not None and layers.quantized == 0 and layers.unsupported == []
    assert "lm_head" in layers.skipped  # transformers' own default stays


def test_other_methods_and_backends_have_no_limits(narrow_model, tmp_path, monkeypatch):
    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: False)
    assert model_module.quantized_layers(_cfg(narrow_model, tmp_path), "cpu") is None
    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: True)
    assert model_module.quantized_layers(_cfg(narrow_model, tmp_path, "model.method=lora"), "cpu") is None
    assert model_module.quantized_layers(_cfg(narrow_model, tmp_path), "cuda") is None


@pytest.mark.parametrize(
    ("training", "storage"),
    [((), torch.uint8), (("training.fsdp=full_shard",), torch.bfloat16)],
)
def test_sharded_qlora_stores_4bit_weights_in_the_compute_dtype(training, storage):
    """FSDP shards parameters of one dtype: bitsandbytes' FSDP-QLoRA setting packs the 4-bit weights into
    the compute dtype; unsharded runs keep bitsandbytes' uint8 default."""
    cfg = load_config(None, ["model.method=qlora", *training])
    hw = model_module.Hardware("cuda", "NVIDIA A100", "bf16", "paged_adamw_8bit", 80 * 2**30)
    config = model_module._quantization_config(cfg, hw)
    assert config.bnb_4bit_quant_storage == storage and config.bnb_4bit_compute_dtype == torch.bfloat16
