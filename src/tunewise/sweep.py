"""Sweeps: many short trainings of the same flow, spending as few steps as they can.

A sweep is a grid of `key=value` overrides over one config. Each trial is its own `tunewise train`
subprocess with its own run directory under `runs/sweep-<name>/trial-XX-<params>/`, so a trial that
diverges, crashes or runs out of memory is recorded with its status and the doctor's verdict while the
sweep goes on, and re-running the same sweep skips every trial that already reached a final status.
`halving` is successive halving: every trial runs to the first rung, the best 1/eta continue from their
checkpoint to the next rung, and so on; diverged trials drop out at once.

Trials run `--workers` at a time as local processes, or (`backend="ray"`) as Ray Tune trials on a Ray
cluster: the same trial function, one Tune trial per trial process, with the resources each holds.

The sweep directory holds sweep.json, heatmap.png (validation loss over the two main axes),
curves.png (every trial's curves) and best.yaml (the winner's resolved config, for `tunewise train`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunewise import charts, rundir
from tunewise.config import Config, load_config, run_name_problem
from tunewise.doctor.diagnose import diagnose_path
from tunewise.errors import ConfigError, DoctorError
from tunewise.plan import warmup_steps

logger = logging.getLogger(__name__)

DEFAULT_GRID = {"training.learning_rate": ["1e-4", "2e-4", "5e-4"], "adapter.r": ["4", "8", "16"]}
TRIAL_BOOK = "sweep_trial.json"  # in each trial's run directory: its status and time over every invocation
FINAL_STATUSES = frozenset({"completed", "diverged", "failed"})
BAD_STATUSES = frozenset({"diverged", "failed"})
SHORT_KEYS = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "bs",
    "gradient_accumulation_steps": "ga",
    "weight_decay": "wd",
    "lr_scheduler_type": "sched",
    "warmup_steps": "warm",
    "max_grad_norm": "clip",
    "num_train_epochs": "ep",
    "max_seq_length": "len",
}


@dataclass
class SweepSpec:
    """What to sweep: a config, its overrides, the grid, and how to spend the steps."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_GRID))  # values as written
    max_steps: int = 100
    strategy: Literal["grid", "halving"] = "grid"
    eta: int = 3  # halving keeps the best 1/eta at each rung
    workers: int = 1
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1})  # per trial, Ray backend
    name: str | None = None  # default: <config stem>-<hash of everything above>


@dataclass
class Trial:
    """One point of the grid and what became of it."""

    index: int
    params: dict[str, str]
    run_dir: Path
    status: str = "pending"  # pending | stopped (paused) | completed | diverged | failed
    global_step: int = 0
    steps_spent: int = 0  # optimizer steps this trial ran, over every invocation
    seconds: float = 0.0
    evals: dict[int, float] = field(default_factory=dict)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    verdict: str | None = None
    finding: str | None = None  # the doctor's summary, or its worst finding and first fix
    pruned_at: int | None = None  # halving: the rung at which it was not promoted
    rank_step: int | None = None  # the step its validation loss is compared at
    val_loss: float | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name

    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.params.items()]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("train_losses")
        data.update(
            name=self.name, run_dir=str(self.run_dir), evals={str(k): v for k, v in self.evals.items()}
        )
        return data


@dataclass
class SweepResult:
    """The ranked trials and where everything was written."""

    sweep_dir: Path
    spec: SweepSpec
    trials: list[Trial]  # ranked: best validation loss at the compared step first
    compare_step: int | None
    rungs: list[int]
    winner: Trial | None
    total_steps: int
    launched: int  # trial invocations this call ran (0 when everything was already done)
    files: dict[str, str]


@dataclass
class TrialJob:
    """One invocation of one trial: plain data, so a Ray task or a pool thread can run it."""

    command: list[str]
    run_dir: str
    env: dict[str, str]


# ----------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """Split `V1,V2,...` on the commas outside brackets (so `[q_proj,v_proj]` stays one value)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return [v for v in values if v]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`KEY=V1,V2,...` items -> {key: [values as written]}; raises ConfigError listing every bad item."""
    grid: dict[str, list[str]] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = split_values(raw)
        if not sep or not key.strip() or not values:
            problems.append(
                f"--grid `{item}` is not KEY=V1,V2,...; write e.g. `training.learning_rate=1e-4,2e-4`"
            )
        elif key.strip() in grid:
            problems.append(f"--grid `{key.strip()}` is given twice; put all its values in one item")
        else:
            grid[key.strip()] = values
    if problems:
        raise ConfigError(problems)
    return grid


def parse_resources(text: str) -> dict[str, float]:
    """`cpu=2,gpu=1` (what each Ray trial holds) -> {"cpu": 2.0, "gpu": 1.0}.

    Raises:
        ConfigError: an item that is not NAME=NUMBER with a number >= 0.
    """
    resources: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not name.strip() or amount < 0:
            raise ConfigError(
                [f"--ray-resources: `{item}` is not NAME=NUMBER; write e.g. --ray-resources cpu=2,gpu=1"]
            )
        resources[name.strip().lower()] = amount
    return resources or {"cpu": 1.0}


def _short(key: str, value: str) -> str:
    name = key.split(".")[-1]
    text = re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_")[:16]
    return f"{SHORT_KEYS.get(name, name)}{text}"


def plan_trials(spec: SweepSpec, sweep_dir: Path) -> list[Trial]:
    """Every combination of the grid, in order, each with its run directory name."""
    keys = list(spec.grid)
    trials = []
    for index, combo in enumerate(itertools.product(*(spec.grid[k] for k in keys))):
        params = dict(zip(keys, combo, strict=True))
        label = "-".join(_short(k, v) for k, v in params.items())
        trials.append(Trial(index, params, sweep_dir / f"trial-{index:02d}-{label}"))
    return trials


def sweep_name(spec: SweepSpec) -> str:
    """The sweep's name: given, or the config's stem plus a hash of the spec (same sweep, same name)."""
    if spec.name:
        if problem := run_name_problem(spec.name):
            raise ConfigError([f"--name {spec.name!r}: {problem}"])
        return spec.name
    stem = Path(spec.config).stem if spec.config else "defaults"
    key = json.dumps([spec.config, spec.overrides, spec.grid, spec.max_steps, spec.strategy, spec.eta])
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def halving_rungs(max_steps: int, n_trials: int, eta: int, first: int = 1) -> list[int]:
    """Rung steps max/eta^k, ..., max/eta, max: as many rungs as halvings that leave one trial.

    No rung comes before step `first`: an evaluation during warmup tells the trials apart by noise only.
    """
    levels = 1
    while eta**levels <= n_trials:
        levels += 1
    rungs = {min(max_steps, max(first, round(max_steps / eta**k))) for k in range(levels)}
    return sorted(rungs)


def validate_sweep(spec: SweepSpec, trials: list[Trial]) -> tuple[Config, int]:
    """Load every trial's config before anything runs: (the base config, the longest warmup in steps).

    Raises:
        ConfigError: naming the trial of every problem.
    """
    problems: list[str] = []
    if spec.max_steps < 1:
        problems.append(f"--max-steps is {spec.max_steps}; must be >= 1")
    if spec.eta < 2:
        problems.append(f"--eta is {spec.eta}; must be >= 2 (3 keeps the best third)")
    base = load_config(spec.config, spec.overrides)
    if base.data.train and not (base.data.validation or base.data.validation_split):
        problems.append(
            "a sweep ranks trials by validation loss: set `data.validation` or "
            "`data.validation_split` (e.g. data.validation_split=0.1)"
        )
    warmup = 0
    for trial in trials:
        try:
            cfg = load_config(spec.config, [*spec.overrides, *trial.overrides()])
            warmup = max(warmup, warmup_steps(float(cfg.training["warmup_steps"]), spec.max_steps))
        except ConfigError as exc:
            problems.extend(f"{trial.name}: {p}" for p in exc.problems)
    if problems:
        raise ConfigError(problems)
    return base, warmup


# ----------------------------------------------------------------------------- running trials


def trial_command(
    spec: SweepSpec, trial: Trial, eval_every: int, stop_at: int | None, resume: bool
) -> list[str]:
    """`python -m tunewise.cli train ...` for one trial: its overrides, the step budget and its run dir."""
    cmd = [sys.executable, "-m", "tunewise.cli", "train"]
    if spec.config:
        cmd.append(spec.config)
    cmd += [
        *spec.overrides,
        *trial.overrides(),
        f"training.max_steps={spec.max_steps}",
        "training.eval_strategy=steps",
        "training.save_strategy=steps",
        f"training.eval_steps={eval_every}",
        f"training.save_steps={eval_every}",
        f"name={trial.name}",
        f"output_dir={trial.run_dir.parent}",
        "--force",
        "--quiet",
        "--no-samples",
    ]
    if stop_at is not None and stop_at < spec.max_steps:
        cmd.append(f"--stop-at-step={stop_at}")
    if resume:
        cmd.append("--resume")
    return cmd


def run_trial(job: TrialJob) -> dict[str, Any]:
    """The trial function (local pool or Ray task): run one `tunewise train` process, log to trial.log."""
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(run_dir / "trial.log", "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(job.command)}\n")
        log.flush()
        proc = subprocess.run(job.command, stdout=log, stderr=subprocess.STDOUT, env=job.env, check=False)
    result = run_dir / rundir.RESULT
    wrote = result.is_file() and result.stat().st_mtime >= started
    return {
        "run_dir": job.run_dir,
        "returncode": proc.returncode,
        "wrote_result": wrote,
        "seconds": round(time.time() - started, 2),
    }


def _trial_env(spec: SweepSpec) -> dict[str, str]:
    """The parent's environment with the trial's threads: the CPUs a Ray trial holds, or this machine's
    CPUs split between the parallel local trials (unless OMP_NUM_THREADS is set)."""
    if spec.backend == "ray":
        threads = str(max(1, int(spec.ray_resources.get("cpu", 1))))
    else:
        split = max(1, (os.cpu_count() or 1) // max(spec.workers, 1))
        threads = os.environ.get("OMP_NUM_THREADS") or str(split)
    return dict(os.environ, OMP_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")


def run_jobs(
    jobs: list[TrialJob],
    spec: SweepSpec,
    on_start: Callable[[int], None],
    on_done: Callable[[int, dict[str, Any]], None],
) -> None:
    """Run the jobs `workers` at a time as local processes, or as Ray Tune trials; report each as it ends."""
    if not jobs:
        return
    if spec.backend == "ray":
        try:
            from tunewise.sweep_ray import run_ray  # Ray is optional: only this backend needs it
        except ImportError:
            raise ConfigError(["--backend ray needs Ray Tune: pip install 'tunewise[ray]'"]) from None
        run_ray(jobs, spec, on_start, on_done)
        return

    def work(index: int) -> dict[str, Any]:
        on_start(index)
        return run_trial(jobs[index])  # this thread only waits on its own trial process

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, spec.workers)) as pool:
        futures = {pool.submit(work, i): i for i in range(len(jobs))}
        for future in concurrent.futures.as_completed(futures):
            on_done(futures[future], future.result())


# ----------------------------------------------------------------------------- reading a trial back


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def refresh_trial(trial: Trial) -> None:
    """Read status, steps, losses and the doctor's verdict back from the trial's run directory."""
    result = rundir.read_json_object(trial.run_dir / rundir.RESULT)
    book = rundir.read_json_object(trial.run_dir / TRIAL_BOOK)
    records = rundir.read_metrics(trial.run_dir)
    train = [r for r in records if r.get("type") == "train"]
    trial.status = book.get("status") or result.get("status") or "pending"
    trial.error = book.get("error") or result.get("error")
    trial.global_step = int(result.get("global_step") or (train[-1]["step"] if train else 0))
    trial.steps_spent = len(train)
    trial.seconds = float(book.get("seconds", 0.0))
    trial.train_losses = [(r["step"], r["loss"]) for r in train]
    trial.evals = {r["step"]: r["eval_loss"] for r in records if r.get("type") == "eval" and "eval_loss" in r}
    if trial.status != "pending":
        _diagnose(trial)


def _diagnose(trial: Trial) -> None:
    try:
        diagnosis = diagnose_path(trial.run_dir)
    except (DoctorError, OSError, ValueError) as exc:
        trial.verdict, trial.finding = None, f"no diagnosis: {exc}"
        return
    trial.verdict = diagnosis.verdict
    worst = sorted(diagnosis.findings, key=lambda f: {"error": 0, "warning": 1}.get(f.severity, 2))
    if trial.status in BAD_STATUSES and worst:
        fix = next((f.change for f in worst[0].fixes if f.change), None)
        trial.finding = worst[0].title + (f" (fix: {fix})" if fix else "")
    else:
        trial.finding = diagnosis.summary


def _record_invocation(trial: Trial, outcome: dict[str, Any]) -> None:
    """Keep the trial's total time; a process that died without its result, or that the doctor stopped
    (nothing to learn), is recorded as failed so that re-running the sweep does not run it again."""
    path = trial.run_dir / TRIAL_BOOK
    book = rundir.read_json_object(path)
    book["seconds"] = round(book.get("seconds", 0.0) + (outcome.get("seconds") or 0.0), 2)
    book["invocations"] = book.get("invocations", 0) + 1
    book["params"] = trial.params
    result = rundir.read_json_object(trial.run_dir / rundir.RESULT)
    if not outcome["wrote_result"]:
        book["status"] = "failed"
        book["error"] = outcome.get("error") or (
            f"the trial process ended with code {outcome['returncode']} before writing its result "
            "(killed: out of memory?); see trial.log"
        )
    elif result.get("status") == "stopped" and "paused_at" not in result:  # not a pause at a rung
        book["status"] = "failed"
        book["error"] = f"the doctor stopped it: {result.get('error')}"
    rundir.write_json(path, book)


def _prepare_rerun(trial: Trial) -> bool:
    """Before running a trial again: resume from its checkpoint (True), or start clean (False)."""
    checkpoint, _skipped = rundir.resumable(trial.run_dir)  # the one `train --resume` will take
    rundir.drop_records_after(trial.run_dir, rundir.checkpoint_step(checkpoint) if checkpoint else 0)
    if not checkpoint:
        (trial.run_dir / rundir.FINDINGS).unlink(missing_ok=True)
    return checkpoint is not None


def advance(
    spec: SweepSpec,
    trials: list[Trial],
    target: int,
    eval_every: int,
    on_trial: Callable[[str, Trial], None] | None = None,
) -> int:
    """Bring every trial that is not final to step `target` (pausing there when below max_steps).

    Returns the number of trial processes launched.
    """
    todo = [
        t
        for t in trials
        if t.status not in FINAL_STATUSES and not (t.status == "stopped" and t.global_step >= target)
    ]
    env, jobs = _trial_env(spec), []
    for trial in todo:
        resume = _prepare_rerun(trial) if trial.run_dir.exists() else False
        command = trial_command(spec, trial, eval_every, target, resume)
        jobs.append(TrialJob(command, str(trial.run_dir), env))

    def started(index: int) -> None:
        if on_trial:
            on_trial("start", todo[index])

    def done(index: int, outcome: dict[str, Any]) -> None:
        _record_invocation(todo[index], outcome)
        refresh_trial(todo[index])
        if on_trial:
            on_trial("end", todo[index])

    run_jobs(jobs, spec, started, done)
    return len(jobs)


# ----------------------------------------------------------------------------- the sweep


def run_sweep(spec: SweepSpec, on_trial: Callable[[str, Trial], None] | None = None) -> SweepResult:
    """Run (or resume) a sweep; write sweep.json, the plots and best.yaml; return the ranked trials.

    Args:
        spec: the config, the grid and the strategy.
        on_trial: called with ("start" | "end", trial) around each trial process.

    Raises:
        ConfigError: a bad grid or a trial config that cannot load, before any trial runs.
    """
    base, warmup = validate_sweep(spec, plan_trials(spec, Path(".")))
    sweep_dir = Path(base.output_dir) / f"sweep-{sweep_name(spec)}"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trials = plan_trials(spec, sweep_dir)
    for trial in trials:
        refresh_trial(trial)
    halving = halving_rungs(spec.max_steps, len(trials), spec.eta, first=warmup + 1)
    eval_every = max(1, round(spec.max_steps / spec.eta))  # a trial pausing at a lower rung evaluates there
    launched = 0
    if spec.strategy == "grid":
        rungs = [spec.max_steps]
        launched += advance(spec, trials, spec.max_steps, eval_every, on_trial)
    else:
        rungs, alive = halving, trials
        for i, rung in enumerate(rungs):
            launched += advance(spec, alive, rung, eval_every, on_trial)
            if i < len(rungs) - 1:
                alive = promote(alive, rung, spec.eta)
    ranked, compare_step = rank_trials(trials, spec.strategy, rungs)
    winner = ranked[0] if ranked and ranked[0].val_loss is not None else None
    result = SweepResult(
        sweep_dir, spec, ranked, compare_step, rungs, winner, sum(t.steps_spent for t in trials), launched, {}
    )
    write_outputs(result, base)
    return result


def promote(trials: list[Trial], rung: int, eta: int) -> list[Trial]:
    """Keep the best 1/eta (at least one) by validation loss at `rung`; mark the rest pruned there."""
    scored = [t for t in trials if t.status not in BAD_STATUSES and _finite(t.evals.get(rung))]
    scored.sort(key=lambda t: t.evals[rung])
    keep = scored[: max(1, math.ceil(len(scored) / eta))] if scored else []
    for trial in trials:
        if trial not in keep and trial.status not in BAD_STATUSES:
            trial.pruned_at = rung
    return keep


def rank_trials(trials: list[Trial], strategy: str, rungs: list[int]) -> tuple[list[Trial], int | None]:
    """Sort by validation loss at the compared step; failed trials last.

    Grid: the compared step is the last eval step every surviving trial reached. Halving: each trial is
    compared at the highest rung it reached, trials that got further first.
    """
    survivors = [t for t in trials if t.status not in BAD_STATUSES and t.evals]
    if strategy == "grid":
        common = set.intersection(*(set(t.evals) for t in survivors)) if survivors else set()
        ladder = [max(common)] if common else []
    else:
        ladder = rungs
    for trial in trials:
        reached = [s for s in ladder if s in trial.evals and _finite(trial.evals[s])]
        ok = trial.status not in BAD_STATUSES and reached
        trial.rank_step = max(reached) if ok else None
        trial.val_loss = trial.evals[trial.rank_step] if ok else None
    ranked = sorted(
        trials, key=lambda t: (t.val_loss is None, -(t.rank_step or 0), t.val_loss or 0.0, t.index)
    )
    compare = ladder[-1] if ladder else None
    return ranked, compare


# ----------------------------------------------------------------------------- outputs


def write_outputs(result: SweepResult, base: Config) -> None:
    """sweep.json, heatmap.png, curves.png and the winner's best.yaml in the sweep directory."""
    out = result.sweep_dir
    files = {"sweep": str(out / "sweep.json")}
    if plot_heatmap(result.trials, result.spec.grid, out / "heatmap.png"):
        files["heatmap"] = str(out / "heatmap.png")
    plot_curves(result.trials, out / "curves.png")
    files["curves"] = str(out / "curves.png")
    if result.winner is not None:
        files["best_config"] = str(write_best_config(result, base))
    result.files = files
    data = {
        "name": out.name.removeprefix("sweep-"),
        "spec": asdict(result.spec),
        "strategy": result.spec.strategy,
        "rungs": result.rungs,
        "compare_step": result.compare_step,
        "total_steps": result.total_steps,
        "launched": result.launched,
        "winner": result.winner.to_dict() if result.winner else None,
        "trials": [t.to_dict() for t in result.trials],
        "files": files,
    }
    rundir.write_json(out / "sweep.json", data)


def write_best_config(result: SweepResult, base: Config) -> Path:
    """The winner's resolved config (every default filled in) with its own run name: best.yaml."""
    spec, winner = result.spec, result.winner
    assert winner is not None
    cfg = load_config(spec.config, [*spec.overrides, *winner.overrides()])
    cfg.name = f"{result.sweep_dir.name}-best"
    cfg.output_dir = base.output_dir
    path = result.sweep_dir / "best.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


def plot_heatmap(trials: list[Trial], grid: dict[str, list[str]], path: Path) -> bool:
    """Validation loss over the two axes with the most values (best over any other axis); False: no axes."""
    axes = sorted((k for k in grid if len(grid[k]) > 1), key=lambda k: -len(grid[k]))[:2]
    if not axes:
        return False
    rows_key, cols_key = (axes[1], axes[0]) if len(axes) == 2 else (None, axes[0])
    row_values = grid[rows_key] if rows_key else [""]
    col_values = grid[cols_key]
    cells: list[list[float]] = [[math.nan] * len(col_values) for _ in row_values]
    labels: list[list[str]] = [[""] * len(col_values) for _ in row_values]
    for t in trials:
        r = row_values.index(t.params[rows_key]) if rows_key else 0
        c = col_values.index(t.params[cols_key])
        if t.val_loss is not None and not (cells[r][c] <= t.val_loss):
            cells[r][c] = t.val_loss
            labels[r][c] = f"{t.val_loss:.4g}\n@{t.rank_step}"
        elif t.val_loss is None and not labels[r][c]:
            labels[r][c] = t.status if t.status in BAD_STATUSES else "-"
    charts.plot_heatmap(cells, labels, (rows_key or "", row_values), (cols_key, col_values), path)
    return True


def plot_curves(trials: list[Trial], path: Path) -> None:
    """Train loss (left) and validation loss (right) of every trial in one figure."""
    series = [
        charts.Series(
            f"{t.name.split('-', 2)[-1]} ({t.status})",
            [(s, loss) for s, loss in t.train_losses if _finite(loss)],
            sorted((s, v) for s, v in t.evals.items() if _finite(v)),
        )
        for t in trials
    ]
    charts.plot_runs(series, path)
