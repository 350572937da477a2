"""Recovery (`doctor.on_divergence: recover`): after a divergence, restart from the last good checkpoint
with the next fix in the doctor's order (tunewise.doctor.advice.recovery_fixes).

The checkpoint is chosen here (`restart_checkpoint`): the newest one saved before the loss began to
climb, never one from the climb itself.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunewise import rundir
from tunewise.config import Config, parse_override
from tunewise.doctor.advice import recovery_fixes
from tunewise.doctor.findings import Finding, Fix, append_findings
from tunewise.training.distributed import is_main_process


@dataclass
class Recovery:
    """What the next attempt starts from."""

    cfg: Config  # the config with the fix applied
    checkpoint: Path | None  # None: from the initial weights
    fix: Fix
    finding: Finding  # the `recovery` finding, already written to findings.jsonl


def recover(
    cfg: Config,
    run_dir: Path,
    attempt: int,
    diverged_at: int,
    trouble_began: int,
    on_finding: Callable[[Finding], None] | None = None,
) -> Recovery:
    """Choose the restart checkpoint, drop the later ones, apply the next fix and record it."""
    fix = next_fix(cfg, attempt)
    good = restart_checkpoint(run_dir, trouble_began)
    drop_checkpoints_after(run_dir, good)
    finding = _record(run_dir, diverged_at, fix, good, on_finding)
    return Recovery(apply_change(cfg, fix.change), good, fix, finding)


def divergence_message(cfg: Config, step: int, finding: Finding | None, changes: list[str]) -> str:
    """Why a run ended as diverged at `step` and what to do next (result.json's `error`; train prints it)."""
    what = finding.title if finding else f"the run diverged at step {step}"
    if cfg.doctor.on_divergence == "recover":
        tried = f" after {len(changes)} recovery attempt(s) ({', '.join(changes)})" if changes else ""
        return (
            f"{what}; still diverging{tried}: stopped at step {step}, no recovery left "
            f"(doctor.max_recoveries={cfg.doctor.max_recoveries})"
        )
    fixes = [f.change for f in (finding.fixes if finding else []) if f.change] or [next_fix(cfg, 0).change]
    return (
        f"{what}; stopped at step {step} (doctor.on_divergence: stop). Next: train again with "
        f"`{fixes[0]}`, or with `doctor.on_divergence=recover` to roll back to the last good checkpoint and "
        "retry with the doctor's fixes"
    )


def next_fix(cfg: Config, attempt: int) -> Fix:
    """The next untried fix in the doctor's order: lr / 10, then clipping, then warmup."""
    order = recovery_fixes(cfg.training["learning_rate"], cfg.training.get("max_grad_norm"))
    return order[min(attempt, len(order) - 1)]


def restart_checkpoint(run_dir: Path, trouble_began: int, foreign: bool = False) -> Path | None:
    """The newest checkpoint from before the climb that ended in the divergence.

    Checkpoint N holds the weights that gave step N+1's loss, so it must come before step
    `trouble_began` - 1.
    """
    return rundir.resumable(run_dir, before=trouble_began - 1, foreign=foreign)[0]


def drop_checkpoints_after(run_dir: Path, good: Path | None) -> None:
    """Remove the abandoned attempt's checkpoints after the one recovery restarts from (all, without one),
    so that a later recovery or `--resume` never restarts from the weights that diverged."""
    keep = rundir.checkpoint_step(good) if good else 0
    for step, path in rundir.checkpoints(run_dir).items():
        if step > keep and is_main_process():
            shutil.rmtree(path)


def apply_change(cfg: Config, change: str) -> Config:
    """A copy of the config with one `training.key=value` fix applied."""
    new = copy.deepcopy(cfg)
    (_section, key), value = parse_override(change)
    new.training[key] = float(value) if key in ("learning_rate", "max_grad_norm") else value
    if key == "warmup_steps" and new.training.get("lr_scheduler_type") == "constant":
        new.training["lr_scheduler_type"] = "constant_with_warmup"  # "constant" ignores warmup
    return new


def _record(
    run_dir: Path,
    step: int,
    fix: Fix,
    good: Path | None,
    on_finding: Callable[[Finding], None] | None,
) -> Finding:
    where = (
        f"from {good.name}"
        if good
        else "from the initial weights (no checkpoint from before the loss went bad)"
    )
    finding = Finding(
        step=step,
        severity="info",
        code="recovery",
        title=f"recovering: restarting {where} with {fix.change}",
        evidence={"diverged_at": step, "checkpoint": good.name if good else None},
        causes=["the run diverged"],
        fixes=[fix],
    )
    if is_main_process():
        append_findings(run_dir / rundir.FINDINGS, [finding])
        if on_finding:
            on_finding(finding)
    return finding
