"""Plan: how many optimizer steps the Trainer will run, its cadence, and the memory it will need.

The step count reproduces transformers' own arithmetic (`Trainer.set_initial_training_values` and
accelerate's batch sharding): per process, the dataloader has ceil(ceil(N / batch) / processes)
micro-batches per epoch; an epoch has ceil(micro-batches / accumulation) optimizer steps (a partial
accumulation at the end of an epoch still steps); the total is ceil(epochs x steps per epoch) unless
`max_steps` is set. The rule of thumb `(N // effective batch) x epochs` is shown beside it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from tunewise.config import Config, validate_training_arguments
from tunewise.data import DataBundle, EncodedExample, build_datasets, ensure_pad_token
from tunewise.model import Hardware, load_tokenizer, quantized_layers, resolve_hardware, resolve_model_path
from tunewise.sharding import read_sharding, shard_memory
from tunewise.training.distributed import machines_of_run

GIB = 1024**3


@dataclass
class StepPlan:
    """Optimizer steps the Trainer will run."""

    examples: int
    processes: int
    effective_batch: int
    micro_batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    epochs: float
    rule_of_thumb: int  # (examples // effective batch) x epochs: what people usually compute

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_steps(
    examples: int, batch: int, accumulation: int, epochs: float, max_steps: int = -1, processes: int = 1
) -> StepPlan:
    """The number of optimizer steps transformers' Trainer runs for this data and batch geometry."""
    batches = math.ceil(examples / batch) if examples else 0
    micro = math.ceil(batches / processes) if batches else 0
    per_epoch = max(micro // accumulation + int(micro % accumulation > 0), 1)
    total = max_steps if max_steps > 0 else math.ceil(epochs * per_epoch)
    effective = batch * accumulation * processes
    run_epochs = total / per_epoch if max_steps > 0 else epochs
    return StepPlan(
        examples,
        processes,
        effective,
        micro,
        per_epoch,
        total,
        run_epochs,
        int((examples // effective) * epochs),
    )


def warmup_steps(warmup: float, total_steps: int) -> int:
    """transformers 5 reads warmup_steps < 1 as a fraction of all steps (rounded up), else a count."""
    return math.ceil(warmup * total_steps) if 0 < warmup < 1 else int(warmup)


def _cadence(strategy: Any, every: float | None, steps: StepPlan) -> tuple[int, float]:
    """(events in the whole run, events per epoch) for an eval/save/logging strategy."""
    strategy = str(getattr(strategy, "value", strategy))
    if strategy == "no":
        return 0, 0.0
    if strategy == "epoch":
        return math.ceil(steps.epochs), 1.0
    interval = every or 500
    if 0 < interval < 1:
        interval = math.ceil(interval * steps.total_steps)
    interval = int(interval)
    return steps.total_steps // interval, steps.steps_per_epoch / interval


# ----------------------------------------------------------------------------- memory

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _model_shape(cfg: Config) -> dict[str, int] | None:
    """Parameter counts by kind, from the model's config alone (meta device: no weights are read)."""
    try:
        mconf = AutoConfig.from_pretrained(
            resolve_model_path(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code
        )
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(mconf)
    except Exception:  # an unreachable hub id: plan still reports steps
        return None
    linear = other = lora = 0
    output = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            linear += module.weight.numel()
            lora += cfg.adapter.r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())
    tied = getattr(mconf, "tie_word_embeddings", False)
    if tied and output is not None and output.weight is not model.get_input_embeddings().weight:
        total -= output.weight.numel()  # on the meta device the tie is not made: count the tensor once
    other = total - linear
    return {
        "total": total,
        "linear": linear,
        "other": other,
        "lora": lora,
        "layers": int(getattr(mconf, "num_hidden_layers", 1)),
        "hidden": int(getattr(mconf, "hidden_size", 1)),
        "heads": int(getattr(mconf, "num_attention_heads", 1)),
        "vocab": int(getattr(mconf, "vocab_size", 1)),
        # logits for the trained positions only (tunewise.batching.TrainedLogits), where the model allows it
        "keeps_trained_logits": int("logits_to_keep" in inspect.signature(model.forward).parameters),
    }


def estimate_memory(
    cfg: Config,
    shape: dict[str, int],
    precision: str,
    batch: int,
    seq: int,
    device: str = "cpu",
    eval_batch: int = 0,
    trained_fraction: float = 1.0,
) -> dict[str, Any]:
    """Peak memory in bytes, by part: training at step 1 (with and without gradient checkpointing) and the
    run's peak, which adds an evaluation forward of `eval_batch` examples (0: the run never evaluates).
    `trained_fraction`: the largest share of an example's positions that are trained; where the model
    computes logits for those only, the logits scale with it."""
    method, b = cfg.model.method, BYTES.get(precision, 4)
    if method == "qlora":
        weights = shape["linear"] * 0.5 * 1.03 + shape["other"] * b  # NF4 + double-quantized scales
    elif method == "lora":
        weights = shape["total"] * b
    else:
        weights = shape["total"] * 4  # fp32 master weights
    trainable = shape["total"] if method == "full" else shape["lora"]
    adapter = 0 if method == "full" else trainable * 4
    optim = str(cfg.training.get("optim", "adamw_torch"))
    optim_bytes = trainable * (2 if "8bit" in optim else 8)
    gradients = trainable * 4
    act_b = b if precision != "fp32" else 4
    s, h, L, a = seq, shape["hidden"], shape["layers"], shape["heads"]
    per_layer_full = batch * s * h * (34 + 5 * a * s / h) * act_b / 2  # Korthikanti et al., scaled to dtype
    rows = trained_fraction if shape.get("keeps_trained_logits") else 1.0  # logits rows per position
    logits = batch * s * rows * shape["vocab"] * 4 * 2  # fp32 logits and their gradient
    with_ckpt = L * batch * s * h * act_b + per_layer_full + logits
    without = L * per_layer_full + logits
    # The framework itself: the CUDA context on a GPU; the torch runtime and its allocator's slack on the CPU
    # (measured: SmolLM2-135M LoRA at step 1 used ~1.2 GiB more resident memory than the parts above).
    overhead = 0.5 * GIB if device == "cuda" else 1.2 * GIB
    fixed = weights + adapter + gradients + optim_bytes + overhead
    use_ckpt = bool(
        cfg.training.get("gradient_checkpointing") or cfg.training.get("activation_checkpointing")
    )
    step_1 = fixed + (with_ckpt if use_ckpt else without)
    evaluation = _evaluation_bytes(shape, eval_batch, seq * rows, act_b)
    return {
        "weights": int(weights),
        "adapter": int(adapter),
        "gradients": int(gradients),
        "optimizer": int(optim_bytes),
        "activations_with_checkpointing": int(with_ckpt),
        "activations_without_checkpointing": int(without),
        "trainable_parameters": int(trainable),
        "total_parameters": int(shape["total"]),
        "framework_overhead": int(overhead),
        "evaluation": int(evaluation),
        "peak_step_1": int(step_1),
        "peak": int(_run_peak(step_1, step_1 - fixed, evaluation, device)),
        "peak_with_checkpointing": int(_run_peak(fixed + with_ckpt, with_ckpt, evaluation, device)),
        "peak_without_checkpointing": int(_run_peak(fixed + without, without, evaluation, device)),
        "batch": batch,
        "eval_batch": eval_batch,
        "seq_len": seq,
        "logits_share": round(rows, 4),  # of the positions: only the trained ones where the model allows
    }


def _evaluation_bytes(shape: dict[str, int], eval_batch: int, seq: float, act_b: int) -> int:
    """What an evaluation forward adds: no activations are kept (no_grad), but the logits of the whole eval
    batch are, in the compute dtype and again in fp32 for the loss (measured on the demo: 20 examples of
    SmolLM2's 49,152-token vocabulary add ~0.5 GB over step 1)."""
    return int(eval_batch * seq * shape["vocab"] * (act_b + 4)) if eval_batch else 0


def _run_peak(step_1: float, activations: float, evaluation: float, device: str) -> float:
    """The run's peak from step 1's and an evaluation's. CUDA's allocator hands training's freed
    activations to the evaluation, so the larger of the two counts; on the CPU the resident set keeps
    training's freed blocks (malloc keeps them for requests of their size) and the logits come on top."""
    if device == "cuda":
        return max(step_1, step_1 - activations + evaluation)
    return step_1 + evaluation


def plan_run(
    cfg: Config,
    n_train: int,
    n_validation: int,
    processes: int = 1,
    hw: Hardware | None = None,
    longest: int = 0,
    trained_fraction: float = 1.0,
    machines: int = 1,
) -> dict[str, Any]:
    """The whole plan: steps, warmup, cadence, memory against the device; what plan.json records.

    `processes` counts every machine's; `machines` matters only to a sharding within each machine.
    """
    t = cfg.training
    steps = plan_steps(
        n_train,
        int(t["per_device_train_batch_size"]),
        int(t["gradient_accumulation_steps"]),
        float(t["num_train_epochs"]),
        int(t.get("max_steps", -1)),
        processes,
    )
    evals, evals_per_epoch = _cadence(
        t.get("eval_strategy", "no") if n_validation else "no",
        t.get("eval_steps") or t.get("logging_steps"),
        steps,
    )
    saves, saves_per_epoch = _cadence(t.get("save_strategy", "steps"), t.get("save_steps"), steps)
    plan: dict[str, Any] = {
        "steps": steps.to_dict(),
        "warmup_steps": warmup_steps(float(t.get("warmup_steps", 0)), steps.total_steps),
        "validation_examples": n_validation,
        "evaluations": evals,
        "evaluations_per_epoch": round(evals_per_epoch, 2),
        "saves": saves,
        "saves_per_epoch": round(saves_per_epoch, 2),
        "learning_rate": t["learning_rate"],
        "method": cfg.model.method,
        "batching": {"requested": cfg.data.batching},  # what is used is decided on the loaded model
    }
    if hw is not None:
        plan["hardware"] = hw.to_dict()
        shape = _model_shape(cfg)
        if shape:
            seq = min(longest or cfg.data.max_seq_length, cfg.data.max_seq_length)
            eval_batch = int(t.get("per_device_eval_batch_size", 8)) if evals else 0
            mem = estimate_memory(
                cfg,
                shape,
                hw.precision,
                int(t["per_device_train_batch_size"]),
                seq,
                hw.device,
                eval_batch,
                trained_fraction,
            )
            sharding, _ = read_sharding(t)  # its problems are the config's (tunewise.config)
            if sharding is not None:  # per device: what is sharded is 1/N of it
                mem = shard_memory(mem, sharding, processes, machines, shape["layers"])
            mem["device_bytes"] = hw.memory_bytes
            mem["fraction_of_device"] = round(mem["peak"] / hw.memory_bytes, 4) if hw.memory_bytes else None
            plan["memory"] = mem
    return plan


# ----------------------------------------------------------------------------- before any weights load


@dataclass
class Prepared:
    """What a run is built from before any weights load; `check` and `train` both start from it."""

    hw: Hardware
    tokenizer: PreTrainedTokenizerBase
    bundle: DataBundle
    plan: dict[str, Any]  # what plan.json records
    pad_added: bool  # the tokenizer got a new pad token: the model's embeddings grow by one
    pad_before: int | None  # the tokenizer's own pad token id


def prepare(
    cfg: Config, processes: int = 1, keep_untrained: bool = False, machines: int | None = None
) -> Prepared:
    """Tokenizer, pad token, data, hardware choices and the plan, as `train` builds them.

    `machines`: over how many machines the `processes` are (default: torchrun's, in a launched process).

    Raises:
        DataError: the data cannot be loaded or encoded.
        ConfigError: transformers refuses the TrainingArguments the run would build on this hardware.
    """
    tokenizer = load_tokenizer(cfg)
    pad_before = tokenizer.pad_token_id
    pad_added = ensure_pad_token(tokenizer)
    bundle = build_datasets(cfg.data, tokenizer, keep_untrained=keep_untrained)
    hw = resolve_hardware(cfg)
    validate_training_arguments(cfg, hw.trainer_arguments())  # what the run will build, before weights
    longest = max((len(e.input_ids) for e in bundle.train), default=0)
    examples = [*bundle.train, *(bundle.validation or [])]
    trained = max((_trained_share(e) for e in examples), default=1.0)
    plan = plan_run(
        cfg,
        len(bundle.train),
        len(bundle.validation or []),
        processes,
        hw,
        longest,
        trained_fraction=trained,
        machines=machines_of_run() if machines is None else machines,
    )
    plan["data"] = bundle.stats.to_dict()
    layers = quantized_layers(cfg, hw.device)
    if layers is not None:
        plan["quantization"] = dataclasses.asdict(layers) | {
            "problem": layers.message() if layers.unsupported else None
        }
    return Prepared(hw, tokenizer, bundle, plan, pad_added, pad_before)


def _trained_share(example: EncodedExample) -> float:
    """The share of an example's positions whose next label is a loss target (the model shifts by one):
    its trained labels less a trained first one, which no position predicts."""
    shifted = example.n_trained - (example.labels[0] != -100 if example.labels else 0)
    return shifted / max(len(example.labels), 1)


def plan_config(cfg: Config, processes: int = 1, machines: int = 1) -> dict[str, Any]:
    """Steps, warmup, cadence, memory and data counts of a run; no model weights are loaded.

    Raises:
        DataError: the data cannot be loaded or encoded.
    """
    return prepare(cfg, processes, machines=machines).plan
