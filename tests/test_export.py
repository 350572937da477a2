"""`tunewise merge`: a trained adapter merged into its base loads with plain transformers and matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from tunewise.cli import main
from tunewise.config import load_config
from tunewise.errors import ModelError
from tunewise.export import merge_adapter
from tunewise.training.run import train


def _trained(tiny_model_dir: Path, data: dict, out: Path, method: str) -> Path:
    extra = {
        "name": method,
        "model.method": method,
        "training.learning_rate": 1e-2,
        "training.max_steps": 4,
        "training.eval_strategy": "no",
        "training.save_strategy": "no",
    }
    result = train(load_config(None, tiny_overrides(tiny_model_dir, data, out, extra)))
    assert result.status == "completed", result.error
    return result.run_dir


def _logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return model(**enc).logits


def test_merged_model_matches_the_adapter_and_loads_with_plain_transformers(
    tiny_model_dir, small_data, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = _trained(tiny_model_dir, small_data, tmp_path / "runs", "lora")
    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--out", str(out)]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "tunewise_merge.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template, "the chat template did not travel with the merged model"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_logits = _logits(base, tokenizer, "Extract the contact as JSON.\nAnn Lee, 30, is a nurse in Oslo.")
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()  # the adapter dir: plain PEFT
    text = "Extract the contact as JSON.\nAnn Lee, 30, is a nurse in Oslo."
    want, got = _logits(adapted, tokenizer, text), _logits(merged, tokenizer, text)
    assert (want - base_logits).abs().max() > 1e-3, "the adapter changes nothing: the comparison is empty"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = merged.generate(**enc, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == enc["input_ids"].shape[1] + 5 or generated[0, -1] == tokenizer.eos_token_id


def test_qlora_merge_reloads_the_base_unquantized(tiny_model_dir, small_data, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = _trained(tiny_model_dir, small_data, tmp_path / "runs", "qlora")
    result = merge_adapter(run_dir, tmp_path / "merged", "bf16")
    assert any("UNQUANTIZED in bf16" in note for note in result.notes)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())


def test_merge_refuses_a_full_fine_tuning_run(tiny_model_dir, small_data, tmp_path):
    run_dir = tmp_path / "full"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "config.json").write_text("{}")
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path, {"model.method": "full"}))
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(ModelError, match="already a plain model directory"):
        merge_adapter(run_dir, tmp_path / "merged")
