"""Sweeps on the tiny model: a real grid through the CLI, successive halving with a diverging trial,
resuming without re-running, and the Ray backend with a crashing trial."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import read_jsonl, tiny_overrides, write_subset

from tunewise import cli
from tunewise.config import load_config
from tunewise.errors import ConfigError
from tunewise.sweep import (
    SweepSpec,
    Trial,
    _record_invocation,
    halving_rungs,
    parse_grid,
    parse_resources,
    plan_trials,
    rank_trials,
    refresh_trial,
    run_sweep,
    split_values,
    validate_sweep,
)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # trial processes inherit it


def _base(model_dir: Path, data: dict[str, Path], tmp_path: Path, extra: dict | None = None) -> list[str]:
    # alpha 1e5 makes a large learning rate diverge for real on the tiny model
    more = {"adapter.alpha": 100000, "training.gradient_accumulation_steps": 1, **(extra or {})}
    return tiny_overrides(model_dir, data, tmp_path / "runs", more)


def _mtimes(sweep_dir: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sweep_dir.glob("trial-*/result.json")}


# ----------------------------------------------------------------------------- pure parts


def test_grid_values_split_outside_brackets():
    assert split_values("[q_proj,v_proj],all-linear") == ["[q_proj,v_proj]", "all-linear"]
    assert parse_grid(["training.learning_rate=1e-4,2e-4", "adapter.r=8"]) == {
        "training.learning_rate": ["1e-4", "2e-4"],
        "adapter.r": ["8"],
    }
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid(["training.learning_rate"])


def test_rungs_divide_the_budget_by_eta():
    assert halving_rungs(27, 9, 3) == [3, 9, 27]
    assert halving_rungs(100, 9, 3) == [11, 33, 100]
    assert halving_rungs(9, 3, 3) == [3, 9]
    assert halving_rungs(9, 2, 3) == [9]
    assert halving_rungs(9, 9, 3, first=2) == [2, 3, 9]  # no rung inside a 1-step warmup


def test_bad_grid_key_is_a_config_error_before_anything_runs(tmp_path):
    spec = SweepSpec(overrides=[f"output_dir={tmp_path}"], grid={"training.learnin_rate": ["1e-4", "2e-4"]})
    with pytest.raises(ConfigError) as info:
        validate_sweep(spec, plan_trials(spec, tmp_path))
    assert "trial-00" in str(info.value) and "learning_rate" in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "result, wrote, expected",
    [
        ({"status": "stopped", "paused_at": 3, "global_step": 3}, True, "stopped"),  # a pause at a rung
        ({"status": "stopped", "error": "no token is trained"}, True, "failed"),  # the doctor stopped it
        (
            {"status": "stopped", "paused_at": 3, "global_step": 3},
            False,
            "failed",
        ),  # killed before its result
    ],
)
def test_an_invocation_that_cannot_go_on_is_recorded_as_failed(tmp_path, result, wrote, expected):
    trial = Trial(0, {"k": "1"}, tmp_path / "trial-00-k1")
    trial.run_dir.mkdir()
    (trial.run_dir / "result.json").write_text(json.dumps(result))
    _record_invocation(trial, {"returncode": -9 if not wrote else 1, "wrote_result": wrote, "seconds": 2.0})
    refresh_trial(trial)
    assert trial.status == expected and trial.seconds == 2.0
    if expected == "failed":
        assert "killed" in trial.error or "doctor" in trial.error


def test_ranking_uses_the_last_common_eval_step_and_puts_failures_last(tmp_path):
    def trial(i: int, status: str, evals: dict[int, float]) -> Trial:
        return Trial(i, {"k": str(i)}, tmp_path / f"trial-{i:02d}", status=status, evals=evals)

    trials = [
        trial(0, "completed", {3: 2.0, 6: 1.5}),
        trial(1, "diverged", {3: 1.0}),
        trial(2, "completed", {3: 2.5, 6: 1.2}),
        trial(3, "stopped", {3: 1.1}),
    ]
    ranked, step = rank_trials(trials, "grid", [6])
    assert step == 3  # trial 3 stopped at step 3: the last step every survivor reached
    assert [t.index for t in ranked] == [3, 0, 2, 1]
    ranked, step = rank_trials(trials, "halving", [3, 6])
    assert step == 6 and [t.index for t in ranked] == [2, 0, 3, 1]  # the furthest rung first


# ----------------------------------------------------------------------------- real sweeps


def test_grid_sweep_ranks_records_divergence_and_resumes(narrow_model_dir, tmp_path, capsys):
    # 128 examples: --then-train runs the pre-flight check, which FAILs under 100 trainable examples
    base = _base(narrow_model_dir, write_subset(tmp_path / "data128", n_train=128), tmp_path)
    argv = [
        "sweep",
        *base,
        "--grid",
        "training.learning_rate=1e-3,2e-2,0.5",
        "--max-steps",
        "6",
        "--name",
        "g",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "runs" / "sweep-g"
    data = json.loads((sweep_dir / "sweep.json").read_text())
    trials = data["trials"]
    by_lr = {t["params"]["training.learning_rate"]: t for t in trials}
    assert by_lr["1e-3"]["status"] == by_lr["2e-2"]["status"] == "completed"
    diverged = by_lr["0.5"]
    assert diverged["status"] == "diverged" and diverged["verdict"] == "diverged"
    assert diverged["finding"] and diverged["val_loss"] is None
    assert trials[-1]["name"] == diverged["name"]
    assert data["compare_step"] == 6
    losses = [t["val_loss"] for t in trials[:2]]
    assert losses == sorted(losses)
    assert data["winner"]["name"] == trials[0]["name"]
    assert data["winner"]["val_loss"] == min(t["evals"]["6"] for t in trials if t["status"] == "completed")
    assert data["total_steps"] == 6 + 6 + diverged["global_step"]
    assert "<- winner" in out and "diverged" in out
    for name in ["sweep.json", "heatmap.png", "curves.png", "best.yaml"]:
        assert (sweep_dir / name).stat().st_size > 0, name
    best = load_config(sweep_dir / "best.yaml")
    assert best.training["learning_rate"] == float(data["winner"]["params"]["training.learning_rate"])
    assert best.name == "sweep-g-best" and "max_steps" in best.training  # from the base overrides

    before = _mtimes(sweep_dir)
    assert len(before) == 3
    assert cli.main([*argv, "--then-train"]) == 0
    out = capsys.readouterr().out
    assert "nothing was run again" in out
    assert _mtimes(sweep_dir) == before
    assert json.loads((sweep_dir / "sweep.json").read_text())["launched"] == 0
    trained = json.loads((tmp_path / "runs" / "sweep-g-best" / "result.json").read_text())
    assert trained["status"] == "completed" and trained["global_step"] == 6  # the base config's max_steps


@pytest.mark.xfail(
    strict=True,
    reason="open: the lr 0.99 trial no longer diverges before the first rung on the tiny model (it is pruned "
    "as 'stopped'): the #14 explosion rules judge a rise against the start, and a random tiny model starts "
    "at ln(vocab); this test needs a trial that reliably diverges at a rate validation accepts",
)
def test_halving_promotes_the_best_stops_divergence_and_spends_fewer_steps(
    narrow_model_dir, small_data, tmp_path
):
    extra = {"training.lr_scheduler_type": "constant", "training.warmup_steps": 0}
    spec = SweepSpec(
        overrides=_base(narrow_model_dir, small_data, tmp_path, extra),
        grid={"training.learning_rate": ["1e-3", "2e-2", "0.99"]},
        max_steps=9,
        strategy="halving",
        workers=2,
        name="h",
    )
    result = run_sweep(spec)
    assert result.rungs == [3, 9]
    by_lr = {t.params["training.learning_rate"]: t for t in result.trials}
    diverged = by_lr["0.99"]
    assert diverged.status == "diverged" and diverged.global_step < 3  # stopped at once, before the rung
    winner, pruned = result.trials[0], result.trials[1]
    assert winner is result.winner and winner.status == "completed" and winner.global_step == 9
    assert pruned.status == "stopped" and pruned.pruned_at == 3 and pruned.global_step == 3
    assert winner.evals[3] <= pruned.evals[3]  # the best at the rung was promoted
    assert winner.val_loss == winner.evals[9] and winner.rank_step == 9
    steps = [r["step"] for r in read_jsonl(winner.run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, 10))  # paused at 3, resumed from checkpoint-3: no step twice
    log = (winner.run_dir / "trial.log").read_text()
    assert "--stop-at-step=3" in log and "--resume" in log
    assert result.total_steps == 9 + 3 + diverged.global_step
    assert result.total_steps < len(result.trials) * spec.max_steps  # what the grid would spend
    assert result.launched == 4

    before = _mtimes(result.sweep_dir)
    again = run_sweep(spec)
    assert again.launched == 0 and _mtimes(result.sweep_dir) == before
    assert again.winner.name == winner.name


# ----------------------------------------------------------------------------- the Ray Tune backend


def test_ray_resources_parse_and_refuse_bad_items() -> None:
    assert parse_resources("cpu=2, gpu=0.5") == {"cpu": 2.0, "gpu": 0.5}
    assert parse_resources("") == {"cpu": 1.0}
    for bad in ("cpu", "gpu=many", "cpu=-1", "=2"):
        with pytest.raises(ConfigError, match="--ray-resources"):
            parse_resources(bad)


def test_ray_backend_without_ray_is_a_clear_error(tiny_model_dir, small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    argv = [
        "sweep",
        *_base(tiny_model_dir, small_data, tmp_path),
        "--grid",
        "training.learning_rate=1e-3",
        "--max-steps",
        "2",
        "--backend",
        "ray",
    ]
    assert cli.main(argv) == 2
    assert "pip install 'tunewise[ray]'" in capsys.readouterr().err


@pytest.fixture
def local_ray():
    import ray  # the `ray` extra is part of the dev install (make test): a missing Ray fails here, not skips

    yield ray
    ray.shutdown()


def test_ray_backend_runs_trials_as_tune_trials_records_a_crash_and_resumes(
    local_ray, tiny_model_dir, small_data, tmp_path, capfd
) -> None:
    spec = SweepSpec(
        overrides=_base(tiny_model_dir, small_data, tmp_path, {"adapter.alpha": 16}),
        grid={"adapter.target_modules": ["all-linear", "[nope_proj]"]},
        max_steps=2,
        backend="ray",
        name="ray",
    )
    events: list[tuple[str, str]] = []
    result = run_sweep(spec, on_trial=lambda event, trial: events.append((event, trial.name)))
    assert local_ray.is_initialized()  # the backend started a local Ray instance itself
    assert capfd.readouterr().out == ""  # Ray and Tune print nothing on stdout (`sweep --json` owns it)
    ok, crashed = result.trials
    assert ok.status == "completed" and ok.params["adapter.target_modules"] == "all-linear"
    assert ok.global_step == 2 and math.isfinite(ok.val_loss)
    assert crashed.status == "failed" and "nope_proj" in (crashed.error or "")
    assert result.winner is ok and result.launched == 2
    assert sorted(events) == sorted([(e, t.name) for t in result.trials for e in ("start", "end")])
    # Tune kept its own records of the trials next to the sweep's
    assert any((result.sweep_dir / "ray").rglob("experiment_state*.json"))
    before = _mtimes(result.sweep_dir)
    again = run_sweep(spec)
    assert again.launched == 0 and again.winner.name == ok.name
    assert _mtimes(result.sweep_dir) == before
