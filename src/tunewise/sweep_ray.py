"""The sweep's Ray backend: each trial a Ray Tune trial running the same trial function as the local pool.

Imported only for `tunewise sweep --backend ray` (Ray is an optional dependency: tunewise[ray]).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial as TuneTrial

from tunewise.sweep import SweepSpec, TrialJob, run_trial


def run_ray(
    jobs: list[TrialJob],
    spec: SweepSpec,
    on_start: Callable[[int], None],
    on_done: Callable[[int, dict[str, Any]], None],
) -> None:
    """The same trial function as Ray Tune trials, on the cluster at `spec.ray_address` or a local Ray.

    One Tune trial per job (a grid over the job index), each holding `spec.ray_resources`; Tune's own
    records go to `<sweep dir>/ray/`. On a multi-machine cluster the sweep directory and this Python
    environment must be at the same paths on every node (a shared filesystem).
    """
    if not ray.is_initialized():
        ray.init(
            address=spec.ray_address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False
        )
    sweep_dir = Path(jobs[0].run_dir).resolve().parent
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, jobs=jobs), dict(spec.ray_resources)),
        param_space={"job": tune.grid_search(list(range(len(jobs))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.workers if spec.workers > 1 else None),
        run_config=tune.RunConfig(
            name=f"advance-{int(time.time() * 1000)}",
            storage_path=str(sweep_dir / "ray"),
            callbacks=[Reporter(on_start, on_done)],
            verbose=0,
        ),
    )
    with contextlib.redirect_stdout(sys.stderr):  # Tune prints its tables; stdout is for `sweep --json`
        tuner.fit()


def tune_trial(config: dict[str, Any], jobs: list[TrialJob]) -> dict[str, Any]:
    """A Tune function trainable: run the job's `tunewise train` process; its outcome is the final result."""
    return run_trial(jobs[config["job"]])


class Reporter(Callback):
    """A Tune callback (runs in the sweep's process) that reports trials starting and ending to the sweep."""

    def __init__(
        self, on_start: Callable[[int], None], on_done: Callable[[int, dict[str, Any]], None]
    ) -> None:
        self.on_start, self.on_done = on_start, on_done

    def on_trial_start(self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any) -> None:
        self.on_start(trial.config["job"])

    def on_trial_complete(
        self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any
    ) -> None:
        result = trial.last_result or {}
        self.on_done(
            trial.config["job"],
            {k: result.get(k) for k in ("run_dir", "returncode", "wrote_result", "seconds")},
        )

    def on_trial_error(self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any) -> None:
        # the Ray worker itself died (node lost, killed): the trial's own files say what they can
        self.on_done(
            trial.config["job"],
            {
                "returncode": -1,
                "wrote_result": False,
                "seconds": None,
                "error": "the Ray worker running this trial failed",
            },
        )
