"""Logs and run facts of other fine-tuning tools: LLaMA-Factory and Axolotl output directories.

- LLaMA-Factory writes `trainer_log.jsonl` next to the Trainer's output: one line per log with
  `current_steps`, `total_steps`, `loss` or `eval_loss`, `lr`, `epoch` (sometimes `grad_norm`), and
  its run arguments in `training_args.yaml` (`finetuning_type`, `quantization_bit`, `learning_rate`).
- Axolotl's output_dir is a Trainer output_dir (checkpoint-N/trainer_state.json) whose model card
  (README.md) holds the axolotl config in a ```yaml block (`adapter: lora|qlora`, `learning_rate`,
  `warmup_steps`, `max_grad_norm`) and the Trainer's "Training results" table, the only curve left
  when a run is pushed to the Hub without its checkpoints.
- A model's `config.json` (in the directory or its newest checkpoint) gives `vocab_size`.

These readers turn the foreign logs into Trainer `log_history` records ({"step", "loss", "grad_norm",
"learning_rate", "epoch"} or {"step", "eval_loss", "epoch"}) for `curve.load_curve`, and the run's
facts into `curve.read_context`'s keys. Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tunewise import rundir
from tunewise.errors import DoctorError

LLAMAFACTORY_LOG = "trainer_log.jsonl"
LLAMAFACTORY_ARGS = "training_args.yaml"
MODEL_CARD = "README.md"
_YAML_BLOCK = re.compile(r"```ya?ml\n(.*?)```", re.DOTALL)
_RESULTS_ROW = re.compile(r"^\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|", re.MULTILINE)


def is_llamafactory_log(path: Path) -> bool:
    """A JSONL file whose first record counts `current_steps` (LLaMA-Factory's LogCallback)."""
    if path.name == LLAMAFACTORY_LOG:
        return True
    first = next(rundir.read_jsonl(path), None)
    return first is not None and "current_steps" in first[1]


def _number(value: Any) -> bool:
    """A JSON number (not a bool): what a loss can be compared as."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def llamafactory_records(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], int | None]:
    """(where, Trainer-style record) for each train or eval line of a trainer_log.jsonl, and total_steps."""
    records = []
    total = None
    last_step = None  # the last training step: where an evaluation pass with its own counter happened
    seen_evals: set[float] = set()
    for lineno, line in rundir.read_jsonl(path, strict=True):
        step = line.get("current_steps")
        if not _number(step):
            raise DoctorError(
                f"{path}:{lineno}: entry has no numeric `current_steps`; expected LLaMA-Factory's "
                'trainer_log.jsonl ({"current_steps": 10, "loss": 2.3, ...})'
            )
        steps_of = line.get("total_steps")
        if total is not None and isinstance(steps_of, int) and steps_of != total and last_step is not None:
            step = last_step  # the end-of-training eval counts its own batches (e.g. "8 of 8"), not steps
            if _number(line.get("eval_loss")) and line["eval_loss"] in seen_evals:
                continue  # the same loss as an eval before: the best checkpoint, reloaded and evaluated again
        elif isinstance(steps_of, int) and steps_of > 0:
            total = steps_of
        if _number(line.get("eval_loss")):
            seen_evals.add(line["eval_loss"])
        # Newer releases write every key on every line, null where it does not apply (a train line has
        # "eval_loss": null), and the rate as `learning_rate` (older ones: `lr`).
        train = line.get("loss") is not None
        if train:
            last_step = step
        record = {"step": step, "epoch": line.get("epoch")}
        lr = line.get("learning_rate", line.get("lr"))
        if train:
            record.update(loss=line["loss"], grad_norm=line.get("grad_norm"), learning_rate=lr)
        elif line.get("eval_loss") is not None:
            record["eval_loss"] = line["eval_loss"]
        else:
            continue  # the end-of-training summary and prediction progress carry no loss
        records.append((f"{path}:{lineno}", record))
    return records, total


def card_config(run_dir: Path) -> dict[str, Any] | None:
    """The axolotl config in a model card's ```yaml block; None when the card is not Axolotl's."""
    card = run_dir / MODEL_CARD
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if "axolotl" not in text.lower():
        return None
    for block in _YAML_BLOCK.findall(text):
        try:
            config = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        if isinstance(config, dict) and ("base_model" in config or "adapter" in config):
            return config
    return {}


def results_table_records(run_dir: Path) -> list[dict[str, Any]]:
    """The model card's "Training results" table (train loss or "No log", epoch, step, eval loss) as
    Trainer-style records, in table order."""
    card = run_dir / MODEL_CARD
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    if "### Training results" not in text:
        return []
    table = text.split("### Training results", 1)[1].split("\n#", 1)[0]
    records: list[dict[str, Any]] = []
    for train, epoch, step, eval_loss in _RESULTS_ROW.findall(table):
        if _number(train) is not None:
            records.append({"step": int(step), "epoch": _number(epoch), "loss": _number(train)})
        if _number(eval_loss) is not None:
            records.append({"step": int(step), "epoch": _number(epoch), "eval_loss": _number(eval_loss)})
    return records


def tool_context(run_dir: Path) -> dict[str, Any]:
    """method, learning_rate, warmup_steps, max_grad_norm and vocab_size from LLaMA-Factory's
    training_args.yaml, an Axolotl model card's config, and the model's config.json."""
    context: dict[str, Any] = {}
    args = _yaml_file(run_dir / LLAMAFACTORY_ARGS)
    axolotl = card_config(run_dir) or {}
    if args:
        kind = str(args.get("finetuning_type", "lora")).lower()
        context["method"] = "qlora" if kind == "lora" and args.get("quantization_bit") else kind
    elif axolotl:
        adapter = str(axolotl.get("adapter") or "").lower()
        context["method"] = adapter if adapter in ("lora", "qlora") else "full"
    for source in (args, axolotl):
        for key in ("learning_rate", "max_grad_norm", "warmup_steps"):
            value = _number(source.get(key))
            if value is not None and key not in context:
                context[key] = int(value) if key == "warmup_steps" else value
    vocab = vocab_size(run_dir)
    if vocab:
        context["vocab_size"] = vocab
    return context


def vocab_size(run_dir: Path) -> int | None:
    """`vocab_size` from the model's config.json in the directory or its newest checkpoint."""
    newest = rundir.checkpoints(run_dir)
    for directory in [run_dir, *(newest[s] for s in sorted(newest, reverse=True)[:1])]:
        data = rundir.read_json_object(directory / "config.json")
        config = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
        value = config.get("vocab_size")
        if isinstance(value, int) and value > 1:
            return value
    return None


def _yaml_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    """A number written in a config or table ("2e-4" is a string to YAML); None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
