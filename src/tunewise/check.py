"""Check: the pre-flight checklist. Will this run learn, fit and stop well? Answered before weights load.

`run_check` builds the data exactly as training will (tokenizer, pad token, labels), plans the steps and
the memory, and returns one PASS/WARN/FAIL item per question with the numbers in words and, when one
exists, the `key=value` change that fixes it. The plan alone is `plan.plan_config`; examples as the
model sees them are `data.inspect_examples`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tunewise.config import DEFAULT_LR, Config
from tunewise.data import DataBundle, EncodedExample, encode_conversation, listed
from tunewise.doctor.advice import HIGH_LR, LOW_LR, TYPICAL_LR, memory_fixes
from tunewise.errors import DataError
from tunewise.formats import load_conversations
from tunewise.model import cpu_supports_bf16
from tunewise.plan import Prepared, prepare
from tunewise.sharding import sharding_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Status = Literal["PASS", "WARN", "FAIL"]
GIB = 1024**3
MIN_TRAINABLE = 100  # fewer trainable examples than this rarely teach a model anything
PROBE_ANSWER = "tunewise probe answer"
NAMES = {  # item id -> what it asks, in the order of the checklist
    "trainable_examples": "examples with trained tokens",
    "sequence_length": "max_seq_length covers the responses",
    "precision": "precision fits the hardware",
    "quantization": "4-bit layers fit the backend",
    "gradient_checkpointing": "gradient checkpointing",
    "warmup": "learning-rate warmup",
    "clipping": "gradient clipping",
    "evaluation": "evaluation during training",
    "checkpoints": "checkpoints fit on disk",
    "memory": "memory at step 1",
    "sharding": "sharding per device",
    "learning_rate": "learning rate fits the method",
    "epochs": "epochs fit the dataset size",
    "duplicates": "no duplicates in the training set",
    "leakage": "validation examples not in training",
    "empty_responses": "no empty responses",
    "eos_trained": "the end-of-turn token is trained",
    "pad_token": "pad token is not the trained EOS",
    "loss_watch": "loss falling by step 10",
}


@dataclass
class CheckItem:
    """One line of the checklist."""

    id: str
    name: str
    status: Status
    detail: str  # what was measured, numbers in words
    numbers: dict[str, Any] = field(default_factory=dict)
    fix: str | None = None  # a concrete `key=value` change when one exists


@dataclass
class CheckReport:
    """Every item, the plan and the data report; what check.json records."""

    items: list[CheckItem]
    plan: dict[str, Any]
    data: dict[str, Any]

    @property
    def failed(self) -> bool:
        """True when any item FAILs: training should not start."""
        return any(item.status == "FAIL" for item in self.items)

    def counts(self) -> dict[str, int]:
        """Items per status."""
        out = {"PASS": 0, "WARN": 0, "FAIL": 0}
        for item in self.items:
            out[item.status] += 1
        return out

    def item(self, item_id: str) -> CheckItem:
        """The item with this id."""
        return next(i for i in self.items if i.id == item_id)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "failed": self.failed,
            "counts": self.counts(),
            "items": [dataclasses.asdict(i) for i in self.items],
            "plan": self.plan,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckReport:
        """Read back what `to_dict` wrote (check.json)."""
        return cls([CheckItem(**i) for i in data["items"]], data["plan"], data["data"])


def _item(
    item_id: str, status: Status, detail: str, numbers: dict[str, Any] | None = None, fix: str | None = None
) -> CheckItem:
    return CheckItem(item_id, NAMES[item_id], status, detail, numbers or {}, fix)


# ----------------------------------------------------------------------------- numbers from the data


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile: the smallest value that covers p% of the values."""
    if not sorted_values:
        return 0
    return sorted_values[max(math.ceil(p / 100 * len(sorted_values)) - 1, 0)]


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 2**20:.1f} MiB"


def _normalised(messages: list[dict]) -> str:
    """Conversation text compared for duplicates: roles kept, case and whitespace ignored."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].lower().split())}" for m in messages)


def _source_file(source: str) -> str:
    return source.rsplit(":", 1)[0]


def _conversations(cfg: Config, bundle: DataBundle) -> dict[str, list[dict]]:
    """source -> conversation for every row of the files the examples came from."""

    sources = [e.source for e in bundle.train + (bundle.validation or [])] + bundle.stats.no_trained_sources
    out: dict[str, list[dict]] = {}
    data_logger = logging.getLogger("tunewise.formats")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # build_datasets already reported the skipped rows once
    try:
        for path in dict.fromkeys(_source_file(s) for s in sources):
            conversations, file_sources, _ = load_conversations(path, cfg.data)
            out.update(zip(file_sources, conversations, strict=True))
    finally:
        data_logger.setLevel(level)
    return out


def _full_lengths(
    cfg: Config, bundle: DataBundle, conversations: dict[str, list[dict]], tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Tokens of every example before truncation, the ones left out (no trained token, dropped) included."""

    examples = bundle.train + (bundle.validation or [])
    lengths = [e.full_length for e in examples]
    kept = {e.source for e in examples}
    truncating = dataclasses.replace(cfg.data, too_long="truncate")
    for source, messages in conversations.items():
        if source in kept:
            continue
        try:
            example = encode_conversation(messages, tokenizer, truncating, source)
        except DataError:  # a row the template rejected was skipped and is counted as a bad row
            continue
        lengths.append(example.full_length)
    return sorted(lengths)


def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase, cfg: Config, fmt: str) -> int | None:
    """The token that ends an assistant turn (what the model must learn to stop): the special token
    the chat template writes right after the answer, else EOS."""
    if fmt == "text":
        return tokenizer.eos_token_id
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=cfg.data.chat_template)
    except Exception:  # a template with unusual requirements: fall back to EOS
        return tokenizer.eos_token_id
    rest = text[text.rfind(PROBE_ANSWER) + len(PROBE_ANSWER) :].lstrip(" ")
    specials = sorted(
        {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True
    )
    token = next((s for s in specials if rest.startswith(s)), None)
    return tokenizer.convert_tokens_to_ids(token) if token else tokenizer.eos_token_id


# ----------------------------------------------------------------------------- data items


def _trainable_item(bundle: DataBundle, length_fix: str | None) -> CheckItem:
    stats = bundle.stats
    trainable, none = len(bundle.train), stats.no_trained_tokens
    total = stats.encoded + none
    share = _pct(none, total)
    numbers = {
        "trainable_train_examples": trainable,
        "no_trained_tokens": none,
        "examples": total,
        "percent_without": round(share, 2),
        "sources": stats.no_trained_sources,
    }
    detail = f"{trainable} training examples have trained tokens"
    if none:
        detail += (
            f"; {none} of {total} examples ({share:.1f}%) have none and are left out: "
            f"{listed(stats.no_trained_sources)}"
        )
    status: Status = "PASS"
    if trainable < MIN_TRAINABLE or share > 10:
        status = "FAIL"
        detail += f" (needs at least {MIN_TRAINABLE} trainable examples and at most 10% without)"
    elif none:
        status = "WARN"
    fix = None
    if none and length_fix:  # the usual cause: the prompt alone fills max_seq_length
        detail += "; truncation at data.max_seq_length removed their responses"
        fix = length_fix
    return _item("trainable_examples", status, detail, numbers, fix)


def _length_item(cfg: Config, bundle: DataBundle, lengths: list[int]) -> CheckItem:
    stats, limit = bundle.stats, cfg.data.max_seq_length
    total = len(lengths)
    cut = stats.response_cut + stats.dropped_too_long
    share = _pct(cut, total)
    p50, p95, p99 = (_percentile(lengths, p) for p in (50, 95, 99))
    longest = lengths[-1] if lengths else 0
    covering = max(64, math.ceil(p99 / 64) * 64)
    numbers = {
        "max_seq_length": limit,
        "examples": total,
        "responses_cut": stats.response_cut,
        "dropped_too_long": stats.dropped_too_long,
        "truncated": stats.truncated,
        "percent_cut": round(share, 2),
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "max": longest,
        "covers_99_percent": covering,
    }
    detail = (
        f"max_seq_length {limit}; example lengths p50 {p50}, p95 {p95}, p99 {p99}, max {longest} "
        f"tokens; {stats.response_cut} responses cut"
    )
    if stats.dropped_too_long:
        detail += f" and {stats.dropped_too_long} examples dropped as too long"
    detail += f" ({share:.1f}% of {total}); {covering} covers 99%"
    status: Status = "FAIL" if share > 5 else "WARN" if cut else "PASS"
    fix = f"data.max_seq_length={covering}" if cut and covering > limit else None
    return _item("sequence_length", status, detail, numbers, fix)


def _duplicates_item(train_keys: list[str], sources: list[str]) -> CheckItem:
    first: dict[str, str] = {}
    repeats = []
    for key, source in zip(train_keys, sources, strict=True):
        if key in first:
            repeats.append(f"{source} (= {first[key]})")
        else:
            first[key] = source
    share = _pct(len(repeats), len(train_keys))
    detail = (
        f"{len(repeats)} of {len(train_keys)} training examples ({share:.1f}%) repeat an earlier one "
        f"(case and whitespace ignored)"
    )
    if repeats:
        detail += f": {listed(repeats)}; repeats are learned harder and skew the loss"
    numbers = {"duplicates": len(repeats), "examples": len(train_keys), "percent": round(share, 2)}
    return _item("duplicates", "WARN" if repeats else "PASS", detail, numbers)


def _leakage_item(train_keys: set[str], validation: list[tuple[str, str]] | None) -> CheckItem:
    if not validation:
        return _item("leakage", "PASS", "no validation set to leak into")
    shared = [source for key, source in validation if key in train_keys]
    share = _pct(len(shared), len(validation))
    detail = f"{len(shared)} of {len(validation)} validation examples ({share:.1f}%) also appear in training"
    if shared:
        detail += f": {listed(shared)}; eval loss on them measures memory, not generalisation — remove them"
    status: Status = "FAIL" if share > 1 else "WARN" if shared else "PASS"
    numbers = {"shared": len(shared), "validation_examples": len(validation), "percent": round(share, 2)}
    return _item("leakage", status, detail, numbers)


def _empty_item(bundle: DataBundle) -> CheckItem:
    empty = bundle.stats.skipped_bad_rows.get("empty_response", 0)
    detail = (
        f"{empty} rows with an empty or whitespace-only response were skipped"
        if empty
        else "no empty or whitespace-only responses"
    )
    numbers = {"empty_responses": empty, "skipped_bad_rows": dict(bundle.stats.skipped_bad_rows)}
    return _item("empty_responses", "WARN" if empty else "PASS", detail, numbers)


def _eos_item(bundle: DataBundle, eot: int | None, tokenizer: PreTrainedTokenizerBase) -> CheckItem:
    name = tokenizer.convert_ids_to_tokens(eot) if eot is not None else None
    whole = [e for e in bundle.train + (bundle.validation or []) if e.n_trained and not e.response_cut]
    missing = [e.source for e in whole if eot not in e.labels]  # labels hold trained ids, -100 elsewhere
    numbers = {
        "end_of_turn_id": eot,
        "end_of_turn_token": name,
        "examples": len(whole),
        "missing": len(missing),
    }
    if eot is None:
        return _item(
            "eos_trained", "FAIL", "the tokenizer has no EOS token: the model cannot learn to stop", numbers
        )
    detail = (
        f"{name!r} (id {eot}) is trained in {len(whole) - len(missing)} of {len(whole)} examples "
        "whose response is whole"
    )
    if missing:
        detail += f"; missing in {listed(missing)}: the model will not learn to stop"
    return _item("eos_trained", "FAIL" if missing else "PASS", detail, numbers)


def _pad_item(prep: Prepared, eot: int | None) -> CheckItem:
    tok = prep.tokenizer
    before, after = prep.pad_before, tok.pad_token_id
    numbers = {
        "pad_before": before,
        "pad_id": after,
        "pad_token": tok.pad_token,
        "end_of_turn_id": eot,
        "added": prep.pad_added,
    }
    if after is None or after == eot:
        return _item(
            "pad_token",
            "FAIL",
            f"pad id {after} is the end-of-turn token; masking padding by id would mask the EOS too",
            numbers,
        )
    detail = f"pad is {tok.pad_token!r} (id {after}), never trained"
    if before == eot:
        detail += f"; the tokenizer shipped pad = end-of-turn (id {before}), tunewise replaces it"
    if prep.pad_added:
        detail += "; a new token was added, so the model's embeddings grow by one row"
    return _item("pad_token", "PASS", detail, numbers)


# ----------------------------------------------------------------------------- hardware and plan items


def precision_item(asked: str, precision: str, device: str, device_name: str, bf16_ok: bool) -> CheckItem:
    """Whether the precision fits the hardware: bf16 on Ampere+ GPUs and bf16 CPUs, fp16 on older GPUs."""
    numbers = {
        "asked": asked,
        "precision": precision,
        "device": device,
        "device_name": device_name,
        "bf16_supported": bf16_ok,
    }
    where = f"{device_name} ({device})"
    status: Status = "PASS"
    detail, fix = f"{precision} on {where}, which {'has' if bf16_ok else 'has no'} bf16", None
    if precision == "bf16" and not bf16_ok:
        if device == "cuda":
            status, fix = "FAIL", "model.precision=fp16"
            detail += "; bf16 needs an Ampere or newer GPU (T4 and V100 have none): use fp16"
        else:
            status, fix = "WARN", "model.precision=auto"
            detail += "; it is emulated and slow here"
    elif device == "cuda" and precision == "fp16" and bf16_ok:
        status, fix = "WARN", "model.precision=bf16"
        detail += "; bf16 has fp32's range and needs no loss scaling"
    elif device == "cuda" and precision == "fp32":
        status, fix = "WARN", "model.precision=auto"
        detail += "; fp32 on a GPU takes twice the memory and time of bf16/fp16"
    return _item("precision", status, detail, numbers, fix)


def _quantization_item(cfg: Config, plan: dict) -> CheckItem:
    """QLoRA: every layer to quantize has a shape the active bitsandbytes backend accepts."""
    q = plan.get("quantization")
    if cfg.model.method != "qlora":
        return _item("quantization", "PASS", f"no 4-bit layers (method {cfg.model.method})")
    if q is None:
        return _item("quantization", "PASS", "the 4-bit backend here takes every layer shape")
    numbers = {"backend": q["backend"], "quantized": q["quantized"], "unsupported": len(q["unsupported"])}
    if not q["unsupported"]:
        return _item(
            "quantization", "PASS", f"all {q['quantized']} layers fit the {q['backend']} backend", numbers
        )
    names = sorted({name.rsplit(".", 1)[-1] for name, _, _ in q["unsupported"]})
    return _item(
        "quantization",
        "FAIL",
        q["problem"],
        numbers,
        fix=f"model.method=lora (or model.keep_unquantized=[{','.join(names)}])",
    )


def _bf16_supported(device: str) -> bool:
    return torch.cuda.is_bf16_supported() if device == "cuda" else cpu_supports_bf16()


def _checkpointing_item(cfg: Config, mem: dict | None) -> CheckItem:
    numbers = {"gradient_checkpointing": bool(cfg.training.get("gradient_checkpointing"))}
    if numbers["gradient_checkpointing"]:
        return _item("gradient_checkpointing", "PASS", "on: activations are recomputed, not stored", numbers)
    fix = "training.gradient_checkpointing=true"
    if not mem or not mem.get("device_bytes"):
        return _item("gradient_checkpointing", "WARN", "off, and memory could not be estimated", numbers, fix)
    share = _pct(mem["peak_without_checkpointing"], mem["device_bytes"])
    numbers["percent_of_device_without"] = round(share, 1)
    detail = (
        f"off; without it the peak is {mem['peak_without_checkpointing'] / GIB:.2f} GiB, "
        f"{share:.0f}% of {mem['device_bytes'] / GIB:.1f} GiB"
    )
    if share < 75:
        return _item("gradient_checkpointing", "PASS", detail + ", so it is not needed", numbers)
    return _item("gradient_checkpointing", "WARN", detail, numbers, fix)


def _warmup_item(plan: dict) -> CheckItem:
    warm, total = plan["warmup_steps"], plan["steps"]["total_steps"]
    share = _pct(warm, total)
    numbers = {"warmup_steps": warm, "total_steps": total, "percent": round(share, 1)}
    detail = f"{warm} warmup steps of {total} ({share:.1f}%)"
    if warm == 0:
        return _item(
            "warmup",
            "WARN",
            detail + "; the first steps hit the full learning rate with a cold "
            "optimizer, a common cause of early spikes",
            numbers,
            "training.warmup_steps=0.03",
        )
    if share > 10 and warm > 100:
        return _item(
            "warmup",
            "WARN",
            detail + "; a long warmup wastes steps at a low rate (about 3%, or 50-100 steps for long runs)",
            numbers,
            "training.warmup_steps=0.03",
        )
    return _item("warmup", "PASS", detail, numbers)


def _clipping_item(cfg: Config) -> CheckItem:
    norm = float(cfg.training.get("max_grad_norm") or 0)
    numbers = {"max_grad_norm": norm}
    if norm <= 0:
        return _item(
            "clipping",
            "WARN",
            "off (max_grad_norm 0): one bad batch can throw the weights far",
            numbers,
            "training.max_grad_norm=0.3",
        )
    if norm > 1:
        return _item(
            "clipping",
            "WARN",
            f"max_grad_norm {norm:g} rarely clips anything; about 0.3 is the lesson's value",
            numbers,
            "training.max_grad_norm=0.3",
        )
    return _item("clipping", "PASS", f"gradients clipped at norm {norm:g}", numbers)


def _evaluation_item(cfg: Config, plan: dict) -> CheckItem:
    steps = plan["steps"]
    n_val, evals, per_epoch = plan["validation_examples"], plan["evaluations"], plan["evaluations_per_epoch"]
    numbers = {
        "validation_examples": n_val,
        "evaluations": evals,
        "evaluations_per_epoch": per_epoch,
        "steps_per_epoch": steps["steps_per_epoch"],
    }
    if not n_val:
        return _item(
            "evaluation",
            "WARN",
            "no validation set: overfitting cannot be seen",
            numbers,
            "data.validation_split=0.1",
        )
    if str(getattr(cfg.training.get("eval_strategy"), "value", cfg.training.get("eval_strategy"))) == "no":
        return _item(
            "evaluation",
            "WARN",
            f"{n_val} validation examples but evaluation is off",
            numbers,
            "training.eval_strategy=steps",
        )
    detail = f"{evals} evaluations on {n_val} validation examples, {per_epoch:g} per epoch"
    if per_epoch < 2:
        every = max(steps["steps_per_epoch"] // 4, 1)
        return _item(
            "evaluation",
            "WARN",
            detail + "; several per epoch show overfitting in time",
            numbers,
            f"training.eval_steps={every}",
        )
    return _item("evaluation", "PASS", detail, numbers)


def _free_disk(output_dir: str) -> int:
    path = Path(output_dir).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _checkpoint_item(cfg: Config, plan: dict) -> CheckItem:
    mem, t = plan.get("memory") or {}, cfg.training
    limit, saves = t.get("save_total_limit"), plan["saves"]
    kept = min(saves, limit) if limit else saves
    full = cfg.model.method == "full"
    params = mem.get("total_parameters" if full else "trainable_parameters", 0)
    size = params * 12 if full else params * 4 * 3  # weights + two Adam moments
    need = kept * size + params * 4  # the checkpoints kept and the final adapter/model
    free = _free_disk(cfg.output_dir)
    numbers = {
        "save_total_limit": limit,
        "saves": saves,
        "kept": kept,
        "checkpoint_bytes": size,
        "needed_bytes": need,
        "free_bytes": free,
    }
    detail = (
        f"{saves} checkpoints saved, {kept} kept at about {_size(size)} each; {_size(need)} needed, "
        f"{_size(free)} free under {cfg.output_dir}"
    )
    if need > free:
        fits = max(int((free - params * 4) // size), 1) if size else 1
        return _item("checkpoints", "FAIL", detail, numbers, f"training.save_total_limit={fits}")
    if not limit and saves:
        return _item(
            "checkpoints",
            "WARN",
            detail + "; no save_total_limit: every checkpoint stays",
            numbers,
            "training.save_total_limit=3",
        )
    return _item("checkpoints", "PASS", detail, numbers)


def _memory_item(cfg: Config, mem: dict | None) -> CheckItem:
    if not mem or not mem.get("device_bytes"):
        return _item("memory", "WARN", "could not estimate (model config or device memory unknown)")
    share = _pct(mem["peak"], mem["device_bytes"])
    numbers = {"peak_bytes": mem["peak"], "device_bytes": mem["device_bytes"], "percent": round(share, 1)}
    detail = (
        f"estimated peak {mem['peak'] / GIB:.2f} GiB, {share:.0f}% of "
        f"{mem['device_bytes'] / GIB:.1f} GiB ({mem.get('seq_len')} tokens x batch {mem.get('batch')})"
    )
    status: Status = "FAIL" if share > 90 else "WARN" if share > 75 else "PASS"
    fix = None
    if status != "PASS":
        t = cfg.training
        fix = memory_fixes(
            cfg.model.method,
            bool(t.get("gradient_checkpointing")),
            t["per_device_train_batch_size"],
            t["gradient_accumulation_steps"],
            cfg.data.max_seq_length,
        )[0].change
    return _item("memory", status, detail, numbers, fix)


def _sharding_item(mem: dict | None) -> CheckItem:
    """What `training.fsdp`/`training.deepspeed` change per device, in one line."""
    sharding = (mem or {}).get("sharding")
    if not sharding:
        return _item("sharding", "PASS", "none: each process holds the whole model (training.fsdp/deepspeed)")
    numbers = {
        k: sharding[k] for k in ("name", "processes", "sharded", "offloaded", "unsharded_peak", "peak")
    }
    if sharding["processes"] < 2 and sharding["sharded"]:
        detail = sharding_line(sharding) + "; with one process there is nothing to shard over"
        return _item("sharding", "WARN", detail, numbers, "launch with --nproc N (and --nnodes)")
    return _item("sharding", "PASS", sharding_line(sharding), numbers)


def _learning_rate_item(cfg: Config) -> CheckItem:
    """The rate against the doctor's bands for the method (tunewise.doctor.advice)."""
    lr, method = float(cfg.training["learning_rate"]), cfg.model.method
    numbers = {"learning_rate": lr, "method": method}
    low, high = LOW_LR[method], HIGH_LR[method]
    usual, fix = f"usual {TYPICAL_LR[method]}", f"training.learning_rate={_rate(DEFAULT_LR[method])}"
    if method == "full":
        if lr > high:
            detail = f"full fine-tuning at {lr:g} ({usual}) tends to spike and wreck what the model knew"
            return _item("learning_rate", "WARN", detail, numbers, fix)
        if lr < low:
            detail = f"full fine-tuning at {lr:g} ({usual}) barely moves the weights"
            return _item("learning_rate", "WARN", detail, numbers, fix)
        return _item("learning_rate", "PASS", f"{lr:g} for full fine-tuning ({usual})", numbers)
    if lr < low:
        detail = (
            f"{method} at {lr:g} is below {_rate(low)} ({usual}): a LoRA run at 2e-5 is a classic "
            "flat-loss cause, the adapter starts at zero and barely moves"
        )
        return _item("learning_rate", "WARN", detail, numbers, fix)
    if lr > high:
        detail = f"{method} at {lr:g} is above {_rate(high)} ({usual}): expect spikes or divergence"
        return _item("learning_rate", "WARN", detail, numbers, fix)
    return _item("learning_rate", "PASS", f"{lr:g} for {method} ({usual})", numbers)


def _rate(x: float) -> str:
    """A round learning rate as people write it: 5e-5, 1e-3."""
    return f"{x:.0e}".replace("e-0", "e-")


def _epochs_item(plan: dict) -> CheckItem:
    steps = plan["steps"]
    n, epochs, total = steps["examples"], steps["epochs"], steps["total_steps"]
    numbers = {"examples": n, "epochs": epochs, "total_steps": total}
    detail = f"{epochs:g} epochs over {n} examples: {total} optimizer steps"
    if n < 5000 and epochs > 3:
        return _item(
            "epochs",
            "WARN",
            detail + f"; each example is seen {epochs:g} times, an overfitting "
            "risk on under 5000 examples (1-3 is usual)",
            numbers,
            "training.num_train_epochs=3",
        )
    return _item("epochs", "PASS", detail, numbers)


# ----------------------------------------------------------------------------- the checklist


def _data_items(cfg: Config, prep: Prepared) -> tuple[list[CheckItem], dict[str, Any]]:
    """Items that read the examples; also the length numbers for the data report."""
    bundle, tokenizer = prep.bundle, prep.tokenizer
    conversations = _conversations(cfg, bundle)
    lengths = _full_lengths(cfg, bundle, conversations, tokenizer)

    def key(example: EncodedExample) -> str:
        messages = conversations.get(example.source)
        return _normalised(messages) if messages is not None else repr(example.input_ids)

    train_keys = [key(e) for e in bundle.train]
    validation = [(key(e), e.source) for e in bundle.validation] if bundle.validation else None
    eot = _end_of_turn_id(tokenizer, cfg, bundle.format)
    length = _length_item(cfg, bundle, lengths)
    items = [
        _trainable_item(bundle, length.fix),
        length,
        _duplicates_item(train_keys, [e.source for e in bundle.train]),
        _leakage_item(set(train_keys), validation),
        _empty_item(bundle),
        _eos_item(bundle, eot, tokenizer),
        _pad_item(prep, eot),
    ]
    return items, {"lengths": {k: length.numbers[k] for k in ("p50", "p95", "p99", "max")}}


def run_check(cfg: Config, processes: int = 1, machines: int | None = None) -> CheckReport:
    """The pre-flight checklist: data, lengths, labels, precision, memory, schedule, evaluation, disk.

    `processes` counts every machine's; `machines` (default: torchrun's) matters to hybrid sharding only.

    Raises:
        DataError: the data cannot be loaded or encoded (a user error: the CLI exits 2).
    """
    prep = prepare(cfg, processes, machines=machines)
    plan, hw = prep.plan, prep.hw
    mem = plan.get("memory")
    data_items, lengths = _data_items(cfg, prep)
    bf16_ok = _bf16_supported(hw.device)
    items = [
        *data_items[:2],
        precision_item(cfg.model.precision, hw.precision, hw.device, hw.device_name, bf16_ok),
        _quantization_item(cfg, plan),
        _checkpointing_item(cfg, mem),
        _warmup_item(plan),
        _clipping_item(cfg),
        _evaluation_item(cfg, plan),
        _checkpoint_item(cfg, plan),
        _memory_item(cfg, mem),
        _sharding_item(mem),
        _learning_rate_item(cfg),
        _epochs_item(plan),
        *data_items[2:],
        _item("loss_watch", "PASS", "watched live by the training monitor (the doctor warns if it is not)"),
    ]
    data = {"format": prep.bundle.format, **plan.get("data", {}), **lengths}
    return CheckReport(items, plan, data)
