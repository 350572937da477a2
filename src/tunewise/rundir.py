"""The run directory as code: its file names, result.json, the JSONL logs and the checkpoints.

The run directory is the interface between stages (docs/architecture.md, "The run directory"):
training and sweeps write it, `doctor`, `report`, `eval` and `sweep` read it back. Every module
names its files through the constants here and reads and writes them through these functions, so
there is one tolerant reader of metrics.jsonl and findings.jsonl. No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunewise.errors import DoctorError

if TYPE_CHECKING:
    from tunewise.config import Config

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"  # the resolved config, every default filled in
PLAN = "plan.json"  # steps, warmup, cadence, memory estimate, hardware choices, data counts
CHECK = "check.json"  # the pre-flight checklist
METRICS = "metrics.jsonl"  # one object per optimizer step ("type": "train") and per evaluation ("eval")
FINDINGS = "findings.jsonl"  # one object per doctor finding, as they happened
RESULT = "result.json"  # status, final numbers, error text
SAMPLES = "samples.json"  # a few validation prompts: base vs tuned generations
EVAL = "eval.json"  # `tunewise eval` (and the demo): base and tuned numbers on the test split
EVAL_EXAMPLES = "eval.jsonl"  # `tunewise eval`: one line per test example, both answers and their scores
MEMORIZATION = "memorization.json"  # `tunewise eval --memorization`
REPORT = "report.html"
TENSORBOARD = "tensorboard"  # event files
ADAPTER, FULL_MODEL = "adapter", "model"  # the final adapter, or the model of a full fine-tune
CHECKPOINT_PREFIX = "checkpoint-"  # Trainer checkpoints: checkpoint-<step>/
MANIFEST = "tunewise-checkpoint.json"  # written last: its presence and sizes make a checkpoint complete
STAGING = ".saving"  # where a checkpoint is written before it is renamed into place
# Sharded checkpoints, as transformers' Trainer writes them (trainer.py `_save_checkpoint`; accelerate's
# `save_fsdp_model`/`save_fsdp_optimizer`; DeepSpeed's `save_checkpoint`):
FSDP_SHARDS = "pytorch_model_fsdp"  # FSDP SHARDED_STATE_DICT: pytorch_model_fsdp_0/, optimizer_0/ (DCP)
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint writes it once every rank's shard is written
DEEPSPEED_LATEST = "latest"  # DeepSpeed: a file naming its tag directory, global_step<N>/


@dataclass
class RunResult:
    """The outcome of a training run, written to result.json."""

    run_dir: Path
    status: str  # completed | stopped | failed | diverged
    global_step: int = 0
    error: str | None = None
    numbers: dict[str, Any] = field(default_factory=dict)


def make_run_dir(cfg: Config) -> Path:
    """runs/<name>/, created; the name defaults to <method>-<time> and is written back to `cfg.name`."""
    name = cfg.name or f"{cfg.model.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    cfg.name = name
    run_dir = Path(cfg.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_result(result: RunResult, started: float) -> None:
    """result.json: status, error, steps, start time and duration, then the run's final numbers."""
    data = {
        "status": result.status,
        "error": result.error,
        "global_step": result.global_step,
        "started": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 2),
        "run_dir": str(result.run_dir),
        **result.numbers,
    }
    write_json(result.run_dir / RESULT, data)


# ----------------------------------------------------------------------------- JSON files


def write_json(path: Path, data: Any) -> None:
    """Indented JSON with a final newline; values JSON cannot hold are written as their str()."""
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def read_json(path: Path, problems: list[str] | None = None) -> Any:
    """The JSON value in a file; None when the file is missing or not valid JSON.

    Args:
        path: the file.
        problems: when given, a file that exists but cannot be read is described here, in words.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if problems is not None:
            problems.append(f"{path.name} is not valid JSON ({exc})")
        return None


def read_json_object(path: Path) -> dict[str, Any]:
    """A small JSON object tunewise wrote (result.json, plan.json, ...); {} when missing or unreadable."""
    data = read_json(path)
    if data is not None and not isinstance(data, dict):
        logger.warning("%s: not a JSON object; ignoring it", path)
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------- JSONL logs


def _json_problem(exc: Exception) -> str:
    """What is wrong with a JSON line, in words."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return "nested too deep" if isinstance(exc, RecursionError) else str(exc)


def read_jsonl(path: Path, strict: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each JSON object line of a JSONL log; a missing file has none.

    A last line cut off mid-write (a killed process) is ignored with a warning. Other lines that are
    not JSON objects are skipped, or, with `strict`, raise DoctorError naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:  # also a line nested too deep or a 5000-digit number
            if lineno == len(lines) and not text.endswith("\n"):  # a writer stopped mid-line
                logger.warning("%s:%d: ignoring the cut-off last line", path, lineno)
                return
            if strict:
                raise DoctorError(
                    f"{path}:{lineno}: not valid JSON ({_json_problem(exc)}); "
                    "expected one JSON object per line"
                ) from None
            continue
        if isinstance(obj, dict):
            yield lineno, obj
        elif strict:
            raise DoctorError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append one JSON object per line (NaN stays NaN)."""
    with open(path, "a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, default=str) + "\n")


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace a JSONL log with these records."""
    Path(path).write_text("".join(json.dumps(r, default=str) + "\n" for r in records), encoding="utf-8")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl, in order; lines a killed process left unreadable are skipped."""
    return [record for _, record in read_jsonl(Path(run_dir) / METRICS)]


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-optimizer-step records among metrics.jsonl records."""
    return [r for r in records if r.get("type", "train") == "train" and "step" in r]


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    """N of a `checkpoint-N` directory name; None for any other name."""
    suffix = Path(path).name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if Path(path).name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Every checkpoint-N directory of a run (or Trainer output directory), by step."""
    found = {}
    for path in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = checkpoint_step(path)
        if step is not None and path.is_dir():
            found[step] = path
    return found


def sharded_layout(folder: Path) -> str | None:
    """Which sharded layout a checkpoint has ("FSDP", "DeepSpeed"), or None for a plain one."""
    folder = Path(folder)
    if any(p.is_dir() for p in folder.glob(f"{FSDP_SHARDS}*")) or (folder / f"{FSDP_SHARDS}.bin").is_file():
        return "FSDP"
    if (folder / DEEPSPEED_LATEST).is_file() or any(p.is_dir() for p in folder.glob("global_step*")):
        return "DeepSpeed"
    return None


def _sharded_problem(folder: Path) -> str | None:
    """What a sharded checkpoint lacks for the Trainer to resume from it, or None (also for a plain one).

    FSDP's sharded state (torch.distributed.checkpoint) is complete once its .metadata is written; a
    DeepSpeed checkpoint is the tag directory its `latest` file names, with the model states in it.
    """
    folder = Path(folder)
    for shards in sorted([*folder.glob(f"{FSDP_SHARDS}*"), *folder.glob("optimizer_*")]):
        if shards.is_dir() and not (shards / DCP_METADATA).is_file():
            return f"its FSDP shards {shards.name}/ have no {DCP_METADATA} (the sharded save never finished)"
    if sharded_layout(folder) != "DeepSpeed":
        return None
    latest = folder / DEEPSPEED_LATEST
    if not latest.is_file():
        return f"its DeepSpeed checkpoint has no `{DEEPSPEED_LATEST}` file naming its global_step directory"
    tag = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not tag or not (folder / tag).is_dir():
        return f"its DeepSpeed `{DEEPSPEED_LATEST}` names {tag or 'nothing'}/, which is not there"
    if not any((folder / tag).glob("*model_states.pt")):
        return f"its DeepSpeed {tag}/ has no *model_states.pt"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint directory does not count (in words), or None when it is complete.

    Complete means tunewise's manifest (written last, see tunewise/training/checkpoints.py) is there,
    is for this step, and every file it lists has the size it was saved with (the shards of an FSDP or
    DeepSpeed checkpoint too: they are in its subdirectories), and a sharded layout is whole.
    """
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return "it has no manifest (its save never finished, or tunewise did not write it)"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        step, files = int(data["step"]), dict(data["files"])
    except (ValueError, KeyError, TypeError, RecursionError, OSError):
        return f"its {MANIFEST} is unreadable"
    if step != checkpoint_step(folder):
        return f"its manifest is for step {step}"
    for name, size in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, not the {size} it was saved with (truncated)"
    return _sharded_problem(folder)


def resumable(
    run_dir: Path, before: int | None = None, foreign: bool = False
) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint (of a step below `before`, when given), and why newer ones were not.

    The one place that chooses a checkpoint to restart from: `--resume`, a recovery, a sweep's rerun.
    `foreign`: the checkpoints are a plain Trainer's (`tunewise.watch`), which writes no manifest: one
    without a manifest counts when its trainer_state.json (which the Trainer writes last) is there.

    Returns:
        (checkpoint or None, skipped lines like "checkpoint-12 skipped: optimizer.pt is missing").
    """
    skipped = [
        f"{STAGING}/{p.name} ignored: a save that was interrupted"
        for p in sorted((Path(run_dir) / STAGING).glob(f"{CHECKPOINT_PREFIX}*"))
    ]
    for step, path in sorted(checkpoints(run_dir).items(), reverse=True):
        if before is not None and step >= before:
            continue
        reason = checkpoint_problem(path)
        if foreign and not (path / MANIFEST).exists():
            has_state = (path / "trainer_state.json").is_file()
            reason = _sharded_problem(path) if has_state else "it has no trainer_state.json"
        if reason is None:
            return path, skipped
        skipped.append(f"{path.name} skipped: {reason}")
    return None, skipped


def drop_records_after(run_dir: Path, step: int) -> int:
    """Before resuming at `step`: remove the log lines of the steps after it, which will be run again.

    So metrics.jsonl and findings.jsonl keep exactly one line per step; a line cut off by the kill goes too.

    Returns:
        The number of lines removed.
    """
    removed = 0
    for name in (METRICS, FINDINGS):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
            except (ValueError, TypeError, RecursionError):
                keep = False
            if keep:
                kept.append(line)
            elif line.strip():
                removed += 1
        staged = path.with_name(path.name + ".tmp")
        staged.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(staged, path)
    return removed
