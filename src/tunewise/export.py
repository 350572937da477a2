"""Export: merge a run's LoRA adapter into its base weights, as a plain Hugging Face model directory.

The merged directory holds safetensors weights, the tokenizer and its chat template, so plain
`AutoModelForCausalLM.from_pretrained(DIR)` loads it with no PEFT and no tunewise. The run's adapter/
directory is left as it was (plain PEFT still loads it on the base). A QLoRA adapter was trained against
4-bit NF4 weights; merging into 4-bit weights would round the update away, so the base is reloaded
unquantized in the chosen dtype first, and the result says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunewise import rundir
from tunewise.config import Config, load_resolved
from tunewise.errors import ConfigError, ModelError
from tunewise.model import resolve_model_path, torch_dtype

logger = logging.getLogger(__name__)

Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass
class MergeResult:
    """What `merge_adapter` wrote and what the user should know about it."""

    out_dir: Path
    dtype: str
    base: str
    notes: list[str] = field(default_factory=list)


def _run_config(run_dir: Path) -> Config:
    if not (run_dir / rundir.CONFIG).is_file():
        raise ConfigError(
            [
                f"`{run_dir}` is not a run directory (no config.yaml); pass the directory that "
                "`tunewise train` printed"
            ]
        )
    return load_resolved(run_dir)


def _adapter_dir(run_dir: Path) -> Path:
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return adapter
    if (run_dir / "model" / "config.json").is_file():
        raise ModelError(
            f"`{run_dir}` is a full fine-tuning run: {run_dir / 'model'} is already a plain "
            "model directory that AutoModelForCausalLM.from_pretrained loads; there is no "
            "adapter to merge"
        )
    raise ModelError(
        f"`{run_dir}` has no adapter/ (adapter_config.json); the run did not finish saving. "
        "Merge a checkpoint by copying its adapter files into adapter/, or train again"
    )


def load_unquantized_base(cfg: Config, dtype: Dtype) -> PreTrainedModel:
    """The base model in `dtype` with no quantization, whatever the run's method was."""
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(cfg.model.name),
        dtype=torch_dtype(dtype),
        trust_remote_code=cfg.model.trust_remote_code,
    )


def merge_adapter(run_dir: Path, out_dir: Path, dtype: Dtype = "fp32") -> MergeResult:
    """Merge run_dir/adapter into its base (`merge_and_unload`) and save a plain model to out_dir.

    Args:
        run_dir: a tunewise run directory of a lora or qlora run.
        out_dir: where the merged model goes (created; existing files are overwritten).
        dtype: the merged weights' dtype. A qlora base is reloaded unquantized in it before merging.

    Raises:
        ConfigError: run_dir is not a run directory. ModelError: there is no adapter to merge.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = _run_config(run_dir)
    adapter = _adapter_dir(run_dir)
    result = MergeResult(out_dir, dtype, cfg.model.name)
    if cfg.model.method == "qlora":
        result.notes.append(
            f"the adapter was trained on a 4-bit NF4 base; the base was reloaded UNQUANTIZED in {dtype} for "
            "merging (merging into 4-bit weights would lose the update), so the merged model's outputs "
            "differ slightly from the 4-bit model the run evaluated, and it needs the memory of a "
            f"{dtype} model"
        )
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = load_unquantized_base(cfg, dtype)
    if base.get_input_embeddings().weight.shape[0] < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer))  # training added a pad token
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    _set_pad(merged, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)  # with its chat template
    provenance = {
        "run_dir": str(run_dir.resolve()),
        "adapter": str(adapter.resolve()),
        "base": cfg.model.name,
        "method": cfg.model.method,
        "dtype": dtype,
        "notes": result.notes,
    }
    rundir.write_json(out_dir / "tunewise_merge.json", provenance)
    return result


def _set_pad(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Record the tokenizer's pad id so generation with the merged model needs no extra arguments."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True  # training switched it off
