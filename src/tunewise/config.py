"""Config: one YAML file with sections, `key=value` overrides, validation that teaches.

Every problem is collected and raised once as a `ConfigError` that names the key as the user wrote
it (with the file and line when it came from a file) and the fix, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import re
import tempfile
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunewise import rundir
from tunewise.errors import ConfigError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
METHODS = ("qlora", "lora", "full")
# Lone UTF-16 halves (JSON or YAML "\\ud800"): Python strings hold them, tokenizers and file systems do not.
SURROGATE = re.compile("[\ud800-\udfff]")


def setting(default: Any, help: str) -> Any:
    """A config field with its one-line help (what `tunewise init` writes as its comment)."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The base model and how it is fine-tuned."""

    name: str = setting(
        EMBEDDED_MODEL, "Hugging Face id, local model directory, local .gguf file, or the embedded default"
    )
    method: Literal["qlora", "lora", "full"] = setting(
        "qlora", "qlora: 4-bit NF4 base + LoRA; lora: LoRA; full: all weights"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto", "auto: bf16 if supported, fp16 on CUDA, else fp32"
    )
    trust_remote_code: bool = setting(False, "allow custom modelling code from the model repository")
    allow_pickle: bool = setting(
        False,
        "also load weights from pickle files (.bin/.pt) when there are no safetensors; a pickle can run code",
    )
    keep_unquantized: list[str] = setting(
        [], "qlora: module names left in full precision besides the output layer, e.g. [down_proj]"
    )


@dataclass
class AdapterConfig:
    """LoRA settings (ignored for method full)."""

    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    target_modules: str | list[str] = setting("all-linear", "all-linear or a list of module names")
    bias: Literal["none", "all", "lora_only"] = setting("none", "which biases are trained")


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes input_ids + labels."""

    train: str | None = setting(None, "JSONL/JSON/CSV/Parquet/saved dataset dir; empty: the bundled dataset")
    validation: str | None = setting(None, "separate validation file (or use validation_split)")
    validation_split: float | None = setting(None, "fraction of train held out for validation (seeded)")
    test: str | None = setting(None, "test split used by `tunewise eval`")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = setting(
        "auto", "auto | messages | sharegpt | alpaca | prompt_completion | text"
    )
    columns: dict[str, str] = setting({}, "map our field names to yours, e.g. {messages: conversation}")
    max_seq_length: int = setting(512, "tokens per example after the chat template")
    batching: Literal["padding_free", "padded", "grouped"] = setting(
        "padding_free",
        "padding_free (a micro-batch is one row, no padding; padded where attention would mix examples)"
        " | padded | grouped (padded, similar lengths together)",
    )
    train_on: Literal["assistant", "last", "all"] = setting("assistant", "which tokens carry loss")
    too_long: Literal["truncate", "drop", "error"] = setting(
        "truncate", "policy for examples over max_seq_length"
    )
    on_bad_rows: Literal["error", "skip"] = setting(
        "error", "stop at the first bad row or skip and count them"
    )
    system_prompt: str | None = setting(None, "system message added to conversations that have none")
    chat_template: str | None = setting(None, "Jinja template for models that ship none")
    seed: int = setting(42, "seed for the validation split")


@dataclass
class DoctorConfig:
    """What the live monitor does when training goes wrong."""

    on_divergence: Literal["stop", "recover"] = setting(
        "stop", "stop: save and end as diverged; recover: roll back to the last good checkpoint and retry"
    )
    max_recoveries: int = setting(3, "attempts in recover mode")
    early_stopping_patience: int = setting(0, "evaluations without improvement before stopping (0: off)")


@dataclass
class EvalConfig:
    """What `tunewise eval` measures on the test split besides loss and perplexity."""

    metrics: list[str] = setting(
        [], "exact_match, normalized_match, valid_json, field_accuracy, rouge_l; empty: chosen from the data"
    )
    metric: str | None = setting(
        None, "your own metric, path/to/metric.py:function(prediction, reference) -> number"
    )
    max_new_tokens: int | None = setting(
        None, "tokens generated per answer; empty: the longest reference + 25% (8 at least)"
    )
    batch_size: int = setting(32, "prompts generated at once (bigger batches cost little per prompt)")
    rephrased: str | None = setting(
        None, "memorization check: training rows with reworded prompts; empty: tunewise perturbs them"
    )


# The lesson's recommended TrainingArguments; hardware-dependent ones (bf16/fp16, optim) resolve at run time.
TRAINING_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "optim": "paged_adamw_32bit",
    "weight_decay": 0.001,
    "max_grad_norm": 0.3,
    "gradient_checkpointing": True,
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 3,
    "load_best_model_at_end": True,
    "metric_for_best_model": "eval_loss",
    "greater_is_better": False,
    "report_to": ["tensorboard"],
    "logging_nan_inf_filter": False,
    "seed": 42,
}
DEFAULT_LR = {"qlora": 2e-4, "lora": 2e-4, "full": 2e-5}

# Names from older transformers releases that tutorials still use -> (new name, value converter or None).
LEGACY_TRAINING_KEYS: dict[str, str] = {
    "warmup_ratio": "warmup_steps",
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
}
# Older names that have no effect here (tunewise owns where outputs go).
IGNORED_TRAINING_KEYS = {
    "output_dir": "the run directory is `name` under `output_dir` at the top level of the config",
    "logging_dir": "TensorBoard events always go to <run>/tensorboard",
    "overwrite_output_dir": "each run has its own directory",
    "save_safetensors": "checkpoints are always safetensors",
}
# Keys tutorials put in the training section that belong elsewhere here.
MOVED_TRAINING_KEYS = {"max_seq_length": "data.max_seq_length", "max_length": "data.max_seq_length"}
SECTION_TYPES = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "data": DataConfig,
    "doctor": DoctorConfig,
    "eval": EvalConfig,
}
TOP_LEVEL_SCALARS = {"name": str, "output_dir": str}


@dataclass
class Config:
    """The whole resolved config of one run."""

    name: str | None = None  # run name; default: <method>-<timestamp>
    output_dir: str = "runs"  # parent directory of run directories
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: dict[str, Any] = field(default_factory=dict)  # any TrainingArguments field by its own name
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = "<defaults>"  # where the config came from, for messages
    notices: list[str] = field(default_factory=list)  # one-line notices (legacy names mapped, ...)
    key_lines: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)  # key path -> line
    override_texts: dict[tuple[str, ...], str] = field(default_factory=dict, repr=False)  # as written

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, every default filled in (what config.yaml records)."""
        out: dict[str, Any] = {"name": self.name, "output_dir": self.output_dir}
        for section in SECTION_TYPES:
            out[section] = dataclasses.asdict(getattr(self, section))
        out["training"] = dict(self.training)
        return out

    def to_yaml(self) -> str:
        """The resolved config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- YAML with line numbers


def _yaml_lines(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map each key path of a composed YAML document to its 1-based line, for error messages.

    An aliased mapping is walked once: `*anchor` chains would otherwise make the walk exponential.
    """
    lines: dict[tuple[str, ...], int] = {}
    stack, seen = [(root, ())], set()
    while stack:
        node, path = stack.pop()
        if not isinstance(node, yaml.MappingNode) or id(node) in seen:
            continue
        seen.add(id(node))
        for key_node, value_node in node.value:
            key_path = (*path, str(key_node.value))
            lines.setdefault(key_path, key_node.start_mark.line + 1)
            stack.append((value_node, key_path))
    return lines


def _parse_yaml(text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The document and its key lines; raises yaml.YAMLError, or ValueError naming the line."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:  # PyYAML composes recursively; the reader stopped where it got too deep
            raise ValueError(f"{loader.get_mark().line + 1}:nested too deep to read; flatten it") from None
        try:
            data = loader.construct_document(root) if root is not None else None
        except RecursionError:
            raise ValueError(f"{_culprit_line(loader, root)}:nested too deep to read; flatten it") from None
        except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
            raise ValueError(f"{_culprit_line(loader, root)}:{exc}; shorten the value") from None
    finally:
        loader.dispose()
    return data, _yaml_lines(root)


def _culprit_line(loader: yaml.SafeLoader, root: yaml.Node) -> int:
    """The 1-based line of the first scalar that cannot be constructed, else of the deepest node."""
    loader.recursive_objects.clear()  # left over by the construction that failed
    stack, deepest = [(root, 0)], (0, root)
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, (depth, node), key=lambda d: d[0])
        if isinstance(node, yaml.ScalarNode):
            try:
                loader.construct_object(node)
            except (ValueError, OverflowError):
                return node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in node.value for child in pair)
    return deepest[1].start_mark.line + 1


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Read a YAML config file; errors name the file and line."""
    if not path.is_file():
        raise ConfigError([f"config file `{path}` does not exist; create one with `tunewise init {path}`"])
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"`{path}` cannot be read ({exc.strerror}); check its permissions"]) from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [f"{path}:{line}: byte {raw[exc.start]:#04x} is not UTF-8; re-save the file as UTF-8"]
        ) from None
    try:
        data, lines = _parse_yaml(text)
        data = {} if data is None else data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(
            [f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"]
        ) from None
    except ValueError as exc:
        line, _, what = str(exc).partition(":")
        raise ConfigError([f"{path}:{line}: cannot read the YAML ({what})"]) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{path}:1: the config must be a mapping of sections (model:, data:, training:, ...)"]
        )
    return data, lines


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Parse one `section.key=value` override; the value is read as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise ConfigError([f"override `{text}` is not key=value; write e.g. `training.learning_rate=1e-4`"])
    key, _, raw = text.partition("=")
    path = tuple(p for p in key.strip().split(".") if p)
    if not path:
        raise ConfigError([f"override `{text}` has no key; write e.g. `training.learning_rate=1e-4`"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):  # not YAML: the text as written
        value = raw
    return path, value


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


# ----------------------------------------------------------------------------- values and types


# Names other trainers and tutorials use for our keys, for suggestions difflib cannot guess.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "model_name": "name",
    "model_name_or_path": "name",
    "train_file": "train",
    "eval_file": "validation",
}


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    choices = list(choices)
    if ALIASES.get(name) in choices:
        return f"; did you mean `{ALIASES[name]}`?"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _coerce(value: Any, annotation: Any) -> Any:
    """Coerce a YAML value to an annotated type, or raise ValueError with the expected type in words."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(" or ".join(errors))
    if origin is Literal:
        if value in args:
            return value
        raise ValueError("one of " + ", ".join(repr(a) for a in args))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [m.value for m in annotation]
        if value is False and "no" in values:
            return "no"  # YAML 1.1 reads a bare `no` as false
        if value in values or (isinstance(value, enum.Enum) and value.value in values):
            return value
        raise ValueError("one of " + ", ".join(repr(v) for v in values))
    if origin in (list, tuple):
        if isinstance(value, list | tuple):
            return [_coerce(v, args[0]) if args else v for v in value]
        raise ValueError("a list")
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError("a mapping")
        if len(args) == 2:
            return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError("an integer")
    if annotation is float:
        # PyYAML reads `2e-4` (no dot) as a string: accept any number spelled as text.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("a number")
    if annotation is str:
        if value is False:
            return "no"  # YAML 1.1 reads a bare `no` as false (eval_strategy: no)
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError("a string")
    return value


def _training_fields() -> dict[str, Any]:
    """TrainingArguments fields of the installed transformers -> their resolved type annotation."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


# ----------------------------------------------------------------------------- building the config


class _Problems:
    """Collects problems with the location each key came from."""

    def __init__(self, source: str, lines: dict[tuple[str, ...], int], overrides: dict[tuple[str, ...], str]):
        self.source, self.lines, self.overrides, self.items = source, lines, overrides, []

    def where(self, path: tuple[str, ...]) -> str:
        if path in self.overrides:
            text = self.overrides[path]  # a pasted blob is shown by its ends
            return f"override `{text if len(text) <= 100 else text[:80] + '...' + text[-10:]}`"
        line = self.lines.get(path)
        return f"{self.source}:{line}: `{'.'.join(path)}`" if line else f"{self.source}: `{'.'.join(path)}`"

    def add(self, path: tuple[str, ...], message: str) -> None:
        self.items.append(f"{self.where(path)} {message}")


def _build_section(cls: type, raw: Any, section: str, problems: _Problems) -> Any:
    """Build one section dataclass from a mapping, recording every unknown key and bad value."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.add((section,), f"must be a mapping of keys, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = (section, str(key))
        if key not in names:
            problems.add(
                path,
                f"is not a setting of `{section}`{_suggest(str(key), names)} (valid: {', '.join(names)})",
            )
            continue
        try:
            kwargs[key] = _coerce(value, hints[key])
        except ValueError as exc:
            problems.add(path, f"is {value!r}; expected {exc}")
    return cls(**kwargs)


def _check_ranges(cfg: Config, problems: _Problems) -> None:
    """Values of the right type but outside what can work."""
    a, d = cfg.adapter, cfg.data
    checks = [
        (("adapter", "r"), a.r >= 1, f"is {a.r}; LoRA rank must be >= 1 (typical 4-64, default 8)"),
        (("adapter", "alpha"), a.alpha > 0, f"is {a.alpha}; must be > 0 (typical 2 x r)"),
        (("adapter", "dropout"), 0 <= a.dropout < 1, f"is {a.dropout}; must be in [0, 1) (typical 0.05-0.2)"),
        (("data", "max_seq_length"), d.max_seq_length >= 8, f"is {d.max_seq_length}; must be >= 8 tokens"),
        (("doctor", "max_recoveries"), cfg.doctor.max_recoveries >= 0, "must be >= 0"),
    ]
    if d.validation_split is not None:
        checks.append(
            (
                ("data", "validation_split"),
                0 < d.validation_split < 1,
                f"is {d.validation_split}; must be a fraction in (0, 1), e.g. 0.1",
            )
        )
    t = cfg.training
    positive = [
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
    ]
    for key in positive:
        if key in t and isinstance(t[key], int | float) and t[key] <= 0:
            checks.append((("training", key), False, f"is {t[key]}; must be > 0"))
    if isinstance(t.get("learning_rate"), int | float) and t["learning_rate"] >= 1:
        checks.append(
            (
                ("training", "learning_rate"),
                False,
                f"is {t['learning_rate']}; a learning rate >= 1 always diverges (LoRA: ~2e-4, full: ~2e-5)",
            )
        )
    if isinstance(t.get("max_grad_norm"), int | float) and t["max_grad_norm"] < 0:
        checks.append(
            (("training", "max_grad_norm"), False, "must be >= 0 (0 turns clipping off; typical 0.3-1.0)")
        )
    warm = t.get("warmup_steps")
    if isinstance(warm, int | float) and warm < 0:
        checks.append((("training", "warmup_steps"), False, "must be >= 0 (a fraction < 1 or a step count)"))
    for path, ok, message in checks:
        if not ok:
            problems.add(path, message)


def _build_training(
    raw: Any, problems: _Problems, notices: list[str], moved: dict[str, Any]
) -> dict[str, Any]:
    """Validate the training section against the installed TrainingArguments, mapping legacy names."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.add(("training",), "must be a mapping of TrainingArguments fields")
        return {}
    fields = _training_fields()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        path = ("training", key)
        if key in IGNORED_TRAINING_KEYS:
            notices.append(f"{problems.where(path)} is ignored: {IGNORED_TRAINING_KEYS[key]}")
            continue
        if key in MOVED_TRAINING_KEYS:
            notices.append(f"{problems.where(path)} is read as `{MOVED_TRAINING_KEYS[key]}`")
            moved[MOVED_TRAINING_KEYS[key]] = value
            continue
        if key in LEGACY_TRAINING_KEYS and LEGACY_TRAINING_KEYS[key] in fields:
            new = LEGACY_TRAINING_KEYS[key]
            notices.append(
                f"{problems.where(path)} is an older name: mapped to `training.{new}` "
                f"(this transformers release spells it `{new}`)"
            )
            key, path = new, ("training", new)
        if key not in fields:
            problems.add(path, f"is not a TrainingArguments field{_suggest(key, fields)}")
            continue
        if key == "fsdp" and isinstance(value, bool):  # typed str, but `fsdp: true` is transformers' own form
            out[key] = value or None
            continue
        try:
            out[key] = _coerce(value, fields[key])
        except ValueError as exc:
            problems.add(path, f"is {value!r}; expected {exc}")
    return out


def build_config(
    data: dict[str, Any],
    source: str = "<config>",
    lines: dict | None = None,
    overrides: dict[tuple[str, ...], str] | None = None,
) -> Config:
    """Build and validate a Config from plain data; raises ConfigError listing every problem."""
    problems = _Problems(source, lines or {}, overrides or {})
    notices: list[str] = []
    known = [*SECTION_TYPES, "training", *TOP_LEVEL_SCALARS]
    for key in data:
        if key not in known:
            problems.add(
                (str(key),), f"is not a config section{_suggest(str(key), known)} (valid: {', '.join(known)})"
            )
    moved: dict[str, Any] = {}
    training = _build_training(data.get("training"), problems, notices, moved)
    raw_data = dict(data.get("data") or {}) if isinstance(data.get("data") or {}, dict) else data.get("data")
    for old_key, dotted in MOVED_TRAINING_KEYS.items():  # problems shown where the key was written
        new_path, old_path = tuple(dotted.split(".")), ("training", old_key)
        for where in (problems.lines, problems.overrides):
            if old_path in where and new_path not in where:
                where[new_path] = where[old_path]
    for dotted, value in moved.items():
        if isinstance(raw_data, dict):
            raw_data.setdefault(dotted.split(".")[1], value)
    sections = {
        name: _build_section(cls, raw_data if name == "data" else data.get(name), name, problems)
        for name, cls in SECTION_TYPES.items()
    }
    top = {}
    for key, typ in TOP_LEVEL_SCALARS.items():
        if data.get(key) is not None:
            try:
                top[key] = _coerce(data[key], typ)
            except ValueError as exc:
                problems.add((key,), f"is {data[key]!r}; expected {exc}")
    cfg = Config(
        **top,
        **sections,
        training=training,
        source=source,
        notices=notices,
        key_lines=problems.lines,
        override_texts=problems.overrides,
    )
    _check_ranges(cfg, problems)
    _check_sharding(cfg, problems)
    _check_run_name(cfg, problems)
    _check_text(data, problems)
    if problems.items:
        raise ConfigError(problems.items)
    explicit = set(cfg.training)
    _fill_training_defaults(cfg)
    _align_checkpoint_defaults(cfg, explicit)
    _check_training_arguments(cfg, explicit, None, problems)
    if problems.items:
        raise ConfigError(problems.items)
    cfg.notices.extend(_trust_notices(cfg, problems))
    return cfg


def _trust_notices(cfg: Config, problems: _Problems) -> list[str]:
    """A notice for each setting that lets the model's files run code on this machine."""
    notices = []
    if cfg.model.trust_remote_code:
        notices.append(
            f"{problems.where(('model', 'trust_remote_code'))} is on: Python code shipped with "
            f"`{cfg.model.name}` will run on this machine; turn it off unless you trust its authors"
        )
    if cfg.model.allow_pickle:
        notices.append(
            f"{problems.where(('model', 'allow_pickle'))} is on: weights may load from pickle files, "
            "which can run code; prefer a model saved as safetensors"
        )
    return notices


def _check_text(data: dict[str, Any], problems: _Problems) -> None:
    """Every string in the config is text a tokenizer and a file system can take (no lone surrogates)."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    seen: set[int] = set()
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            found = SURROGATE.search(value)
            if found:
                problems.add(
                    path,
                    f"holds a lone UTF-16 surrogate (U+{ord(found.group()):04X}) at character "
                    f"{found.start()}; remove it or write the character it stands for",
                )
        elif isinstance(value, dict | list) and id(value) not in seen:  # YAML aliases share objects
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, (*path, str(k)) if isinstance(value, dict) else path) for k, v in items)


def _check_sharding(cfg: Config, problems: _Problems) -> None:
    """`training.fsdp`/`fsdp_config` and `training.deepspeed`: known options, JSON files that exist and
    parse (a syntax error at its file:line), a ZeRO stage (tunewise.sharding reads them)."""
    from tunewise.sharding import read_sharding

    for key, message in read_sharding(cfg.training)[1]:
        problems.add(("training", key), message)


def _check_run_name(cfg: Config, problems: _Problems) -> None:
    """A run name is one directory name under `output_dir`: it can never place files elsewhere."""
    name = cfg.name
    if name is None:
        return
    if run_name_problem(name):
        problems.add(("name",), f"is {name!r}; {run_name_problem(name)}")


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run or trial directory name under `output_dir`, with the fix; None if it can."""
    bad = not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or ":" in name[1:2]
    if not bad:
        return None
    safe = re.sub(r"[^\w.-]+", "-", name).strip(".-") or "my-run"
    return (
        f"a run name is one directory name under `output_dir` (no `/`, `\\`, `..` or drive letter), so a run "
        f"can never write outside it; use e.g. `name: {safe}` and set `output_dir` for the place"
    )


def has_validation(data: DataConfig) -> bool:
    """Whether the run will evaluate: a validation file or split, or the bundled dataset (which has one)."""
    return data.train is None or data.validation is not None or data.validation_split is not None


def validate_training_arguments(cfg: Config, hardware: dict[str, Any] | None = None) -> None:
    """Build the real `TrainingArguments` from the config, as the run will, and map its refusals to keys.

    Call it with the resolved hardware choices (`bf16`, `fp16`, `use_cpu`, `optim`) before any weights
    load; `build_config` already calls it without them.

    Raises:
        ConfigError: each refusal at the key the user wrote (file:line or the override), with the fix.
    """
    problems = _Problems(cfg.source, cfg.key_lines, cfg.override_texts)
    written = {p[1] for p in [*cfg.key_lines, *cfg.override_texts] if len(p) == 2 and p[0] == "training"}
    explicit = written or {k for k, v in cfg.training.items() if TRAINING_DEFAULTS.get(k) != v}
    _check_training_arguments(cfg, explicit, hardware, problems)
    if problems.items:
        raise ConfigError(problems.items)


def _check_training_arguments(
    cfg: Config, explicit: set[str], hardware: dict[str, Any] | None, problems: _Problems
) -> None:
    """Construct TrainingArguments in a temporary directory; a refusal becomes a problem at its key."""
    from transformers import TrainingArguments

    kwargs = {**cfg.training, **(hardware or {}), "report_to": "none", "disable_tqdm": True}
    if not has_validation(cfg.data):  # the run turns evaluation off when there is nothing to evaluate
        kwargs.update(eval_strategy="no", load_best_model_at_end=False)
    accelerator = kwargs.get("accelerator_config")
    if accelerator is None or isinstance(accelerator, dict):
        # Validation runs before device set-up; this makes set-up refuse (see below) instead of creating
        # accelerate's process-wide state at config time.
        kwargs["accelerator_config"] = {**(accelerator or {}), "use_configured_state": True}
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TrainingArguments(output_dir=out, **kwargs)
        except Exception as exc:  # ValueError mostly; also TypeError, ImportError from optional backends
            message = str(exc)
            if "use_configured_state" not in message:  # every check passed; device set-up was refused
                path, text = _explain_refusal(message, cfg, explicit)
                problems.add(path, text)


def _multiples(value: float, step: int) -> tuple[int, int]:
    """The two multiples of `step` around `value` (the lower one at least `step`)."""
    low = max(step, int(value // step) * step)
    return low, low + step


def _explain_refusal(message: str, cfg: Config, explicit: set[str]) -> tuple[tuple[str, ...], str]:
    """The key to blame for a TrainingArguments refusal and the sentence to say, with the fix."""
    t = cfg.training
    save, ev = t.get("save_steps"), t.get("eval_steps") or t.get("logging_steps")
    because = "because `load_best_model_at_end` is on"
    off = "or set `training.load_best_model_at_end: false`"
    if "multiple of the evaluation" in message and isinstance(save, int) and isinstance(ev, int) and ev > 0:
        if "save_steps" in explicit or "eval_steps" not in explicit:
            a, b = _multiples(save, ev)
            return ("training", "save_steps"), (
                f"must be a multiple of `eval_steps` ({ev}) {because}: use {a} or {b} ({off})"
            )
        divisors = [d for d in range(1, save + 1) if save % d == 0]
        below = max([d for d in divisors if d <= ev], default=1)
        above = min([d for d in divisors if d >= ev], default=save)
        use = f"{below} or {above}" if below != above else f"{below}"
        return ("training", "eval_steps"), (f"must divide `save_steps` ({save}) {because}: use {use} ({off})")
    if "save and eval strategy to match" in message:
        key = (
            "save_strategy"
            if "save_strategy" in explicit or "eval_strategy" not in explicit
            else "eval_strategy"
        )
        other = "eval_strategy" if key == "save_strategy" else "save_strategy"
        return ("training", key), (
            f"is {_plain(t.get(key))} but `{other}` is {_plain(t.get(other))}; they must match {because}: "
            f"set `training.{key}: {_plain(t.get(other))}` ({off})"
        )
    if ("bf16" in message or "fp16" in message) and not explicit & {"bf16", "fp16", "bf16_full_eval"}:
        return ("model", "precision"), (
            f"is {cfg.model.precision!r}, not runnable here: {message} Use `model.precision: auto`"
        )
    named = sorted((k for k in explicit if re.search(rf"\b{re.escape(k)}\b", message)), key=len, reverse=True)
    if named:
        key = named[0]
        return ("training", key), (
            f"is {t.get(key)!r}; transformers' TrainingArguments refuses it: {message} Change it as it says"
        )
    return (
        "training",
    ), f"is refused by transformers' TrainingArguments: {message} Change the settings it names"


def _plain(value: Any) -> str:
    """An enum or a string as the user writes it in YAML."""
    return str(getattr(value, "value", value))


def _fill_training_defaults(cfg: Config) -> None:
    """Fill the lesson's defaults for what the user left out; the method decides the learning rate."""
    explicit = set(cfg.training)
    for key, value in TRAINING_DEFAULTS.items():
        cfg.training.setdefault(key, value)
    cfg.training.setdefault("learning_rate", DEFAULT_LR[cfg.model.method])
    if cfg.training.get("save_total_limit") == 1 and cfg.training.get("load_best_model_at_end"):
        # Trainer deletes every checkpoint but the best at the end when the limit is 1: the newest would go
        cfg.training["save_total_limit"] = 2
        cfg.notices.append(
            "training.save_total_limit=1 would delete the newest checkpoint when training ends; "
            "keeping 2 (the best and the newest)"
        )
    if (
        str(cfg.training["eval_strategy"]) in ("no", "IntervalStrategy.NO")
        and "load_best_model_at_end" not in explicit
    ):
        cfg.training["load_best_model_at_end"] = False


def _align_checkpoint_defaults(cfg: Config, explicit: set[str]) -> None:
    """Move a default save cadence onto the user's eval cadence, which `load_best_model_at_end` needs.

    Only values the user did not write change, each with a notice; two written values that disagree
    are left for `_check_training_arguments` to report.
    """
    t = cfg.training
    if not (t.get("load_best_model_at_end") and has_validation(cfg.data)):
        return
    ev_strategy, save_strategy = _plain(t.get("eval_strategy")), _plain(t.get("save_strategy"))
    if (
        ev_strategy not in ("no", "False")
        and ev_strategy != save_strategy
        and "save_strategy" not in explicit
    ):
        t["save_strategy"] = ev_strategy
        cfg.notices.append(
            f"training.save_strategy follows eval_strategy ({ev_strategy}): "
            "load_best_model_at_end needs them to match"
        )
    save, ev = t.get("save_steps"), t.get("eval_steps")
    if _plain(t.get("save_strategy")) != "steps" or not (isinstance(save, int) and isinstance(ev, int)):
        return
    if ev > 0 and save % ev and "save_steps" not in explicit:
        t["save_steps"] = -(-save // ev) * ev
        cfg.notices.append(
            f"training.save_steps={t['save_steps']} (not {save}): a multiple of eval_steps "
            f"({ev}), which load_best_model_at_end needs"
        )
    elif ev > 0 and save % ev and "eval_steps" not in explicit:
        t["eval_steps"] = max(d for d in range(1, min(ev, save) + 1) if save % d == 0)
        cfg.notices.append(
            f"training.eval_steps={t['eval_steps']} (not {ev}): it must divide save_steps "
            f"({save}) for load_best_model_at_end"
        )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply `key=value` overrides.

    Raises:
        ConfigError: listing every problem, each with file:line or the override as written.
    """
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data, lines = _read_yaml(Path(path))
    written: dict[tuple[str, ...], str] = {}
    for text in overrides or []:
        key_path, value = parse_override(text)
        written[key_path] = text
        if key_path[0] == "training" and len(key_path) == 2 and key_path[1] in LEGACY_TRAINING_KEYS:
            written[("training", LEGACY_TRAINING_KEYS[key_path[1]])] = text
        _set_path(data, key_path, value)
    return build_config(data, source, lines, written)


def load_resolved(run_dir: Path) -> Config:
    """Load the resolved `config.yaml` a run directory recorded."""
    return load_config(run_dir / rundir.CONFIG)


# ----------------------------------------------------------------------------- tunewise init

_COMMENTS = {
    "name": "run name (directory under output_dir); empty: <method>-<time>",
    "output_dir": "parent directory of run directories",
    "num_train_epochs": "passes over the training data (1-3 for small datasets; more overfits)",
    "per_device_train_batch_size": "examples per forward pass per process",
    "per_device_eval_batch_size": "examples per evaluation forward pass",
    "gradient_accumulation_steps": "micro-batches per step (effective batch = batch x this x nproc)",
    "lr_scheduler_type": "learning-rate schedule after warmup",
    "warmup_steps": "a fraction < 1 of all steps, or a number of steps (3%; 50-100 steps for long runs)",
    "optim": "optimizer; paged_adamw_32bit needs bitsandbytes (replaced with a notice where it cannot run)",
    "weight_decay": "L2-style decay on weights",
    "max_grad_norm": "gradient clipping; 0 turns it off (the lesson: 0.3)",
    "gradient_checkpointing": "recompute activations in backward: less memory, ~30% more time",
    "logging_steps": "log loss/grad norm/lr every N steps (the monitor sees every step regardless)",
    "eval_strategy": "when to evaluate: steps | epoch | no",
    "eval_steps": "evaluate every N steps",
    "save_strategy": "when to save checkpoints",
    "save_steps": "save a checkpoint every N steps",
    "save_total_limit": "checkpoints kept (the best and the newest are never deleted)",
    "load_best_model_at_end": "load the checkpoint with the best eval loss when training ends",
    "metric_for_best_model": "metric that picks the best checkpoint",
    "greater_is_better": "false for losses",
    "report_to": "where metrics go besides metrics.jsonl",
    "logging_nan_inf_filter": "false: a NaN is logged as NaN, not hidden as 0.0",
    "seed": "random seed",
    "learning_rate": "peak learning rate (LoRA/QLoRA ~2e-4, full ~2e-5)",
}


def field_help(cls: type) -> dict[str, str]:
    """The one-line help of each field of a section dataclass (from its `setting(...)` metadata)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def starter_config_text() -> str:
    """The text `tunewise init` writes: every default with a one-line comment each."""
    cfg = load_config(None)
    out = [
        "# tunewise config. Run: tunewise train THIS.yaml   Override: tunewise train THIS.yaml adapter.r=16",
        "# Every TrainingArguments field is accepted under `training:` by its own name.",
        "",
    ]
    for key in TOP_LEVEL_SCALARS:
        out.append(f"{key}: {_scalar(getattr(cfg, key))}  # {_COMMENTS[key]}")
    for section in ["model", "adapter", "data", "training", "doctor", "eval"]:
        out.append(f"{section}:")
        if section == "training":
            values, comments = cfg.training, _COMMENTS
        else:
            values, comments = (
                dataclasses.asdict(getattr(cfg, section)),
                field_help(SECTION_TYPES[section]),
            )
        for key, value in values.items():
            out.append(f"  {key}: {_scalar(value)}  # {comments.get(key, '')}".rstrip(" #"))
    return "\n".join(out) + "\n"


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
