"""The command line: the command table, `key=value` overrides anywhere on the line for every verb, and
the `--nproc` relaunch built from the parsed arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tunewise import sweep
from tunewise.cli import commands, table
from tunewise.cli.table import COMMANDS, parse_args
from tunewise.config import load_config
from tunewise.sweep import SweepSpec

REPO = Path(__file__).parents[2]

# Each verb that reads overrides: its positional words, and two groups of flags to put around them.
VERBS = {
    "plan": (["run.yaml"], ["--json"], ["--nproc", "2"]),
    "check": (["run.yaml"], ["--json"], ["--nproc", "2"]),
    "inspect": (["run.yaml"], ["--n", "2"], ["--index", "1"]),
    "train": (["run.yaml"], ["--nproc", "2"], ["--quiet", "--force"]),
    "sweep": (["run.yaml"], ["--grid", "training.learning_rate=2e-4,1e-3"], ["--max-steps", "6"]),
    "lr-find": (["run.yaml"], ["--steps", "20"], ["--json"]),
    "eval": (["runs/x"], ["--limit", "5"], ["--json"]),
    "demo": ([], ["--quiet"], []),
}


def test_every_verb_has_a_function_and_help() -> None:
    assert set(VERBS) | {"init", "doctor", "report", "generate", "merge"} == set(COMMANDS)
    for name, command in COMMANDS.items():
        assert callable(command.func) and command.help, name
    parser, verbs = table.build_parser()
    assert set(verbs) == set(COMMANDS)
    assert all(name in parser.format_help() for name in COMMANDS)


@pytest.mark.parametrize("verb", sorted(set(VERBS) - {"sweep"}))
def test_overrides_anywhere_on_the_line(verb: str) -> None:
    head, first, second = VERBS[verb]
    for words in (
        [*head, "a.b=1", *first, *second, "c.d=2"],  # before and after the flags
        [*head, *first, "a.b=1", *second, "c.d=2"],  # between them too
        [*first, *second, *head, "a.b=1", "c.d=2"],  # flags first
        ["a.b=1", *first, *head, *second, "c.d=2"],  # the config (or run directory) after an override
    ):
        args = parse_args([verb, *words])
        assert args.overrides == ["a.b=1", "c.d=2"], words
        assert args.func is COMMANDS[verb].func
        dest = COMMANDS[verb].path_dest
        assert (getattr(args, dest) if dest else None) == (head[0] if head else None), words


def _sweep_spec(monkeypatch: pytest.MonkeyPatch, line: str) -> SweepSpec:
    """The SweepSpec `tunewise sweep` builds from a command line (the sweep itself is not run)."""
    specs = []

    def record(spec: SweepSpec, on_trial: object = None) -> None:
        specs.append(spec)
        raise SystemExit(0)

    monkeypatch.setattr(sweep, "run_sweep", record)
    args = parse_args(line.split())
    with pytest.raises(SystemExit):
        args.func(args)
    return specs[0]


def test_sweep_overrides_anywhere_even_after_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    line = "sweep run.yaml --grid training.learning_rate=2e-4,1e-3 --max-steps 6 training.eval_steps=3"
    spec = _sweep_spec(monkeypatch, line)  # the line from issue 18
    assert spec.config == "run.yaml" and spec.overrides == ["training.eval_steps=3"] and spec.max_steps == 6
    assert spec.grid == {"training.learning_rate": ["2e-4", "1e-3"]}
    for line in (
        "sweep a.b=1 run.yaml --grid adapter.r=4,8 c.d=2",  # after the grid: one value is an override
        "sweep run.yaml a.b=1 --max-steps 6 c.d=2 --grid adapter.r=4,8",
        "sweep --grid adapter.r=4,8 --max-steps 6 run.yaml a.b=1 c.d=2",
    ):
        spec = _sweep_spec(monkeypatch, line)
        assert spec.overrides == ["a.b=1", "c.d=2"] and spec.grid == {"adapter.r": ["4", "8"]}, line


def test_only_overrides_and_global_options() -> None:
    args = parse_args(["--debug", "plan", "training.learning_rate=1e-4", "--json"])
    assert args.debug and args.config is None and args.overrides == ["training.learning_rate=1e-4"]
    with pytest.raises(SystemExit):
        parse_args(["--bogus", "plan"])
    with pytest.raises(SystemExit):
        parse_args(["no-such-verb"])


def test_relaunch_argv_keeps_overrides_and_every_train_flag(tmp_path: Path) -> None:
    line = [
        "train",
        "run.yaml",
        "name=x",
        "--nproc",
        "2",
        "--quiet",
        "--resume",
        "--force",
        "--no-samples",
        "--stop-at-step",
        "4",
        "adapter.r=4",
    ]
    args = parse_args(line)
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=x"])
    argv = commands.relaunch_argv(args, cfg)
    again = parse_args(argv)
    assert "--nproc" not in argv and again.nproc == 1
    assert again.config == "run.yaml"
    assert again.overrides == ["name=x", "adapter.r=4", "name=x", f"output_dir={tmp_path}"]
    for option in commands.TRAIN_OPTIONS:
        if option.dest != "nproc":
            assert getattr(again, option.dest) == getattr(args, option.dest), option.dest
    assert not parse_args(commands.relaunch_argv(parse_args(["train", "--nproc", "2"]), cfg)).quiet


def test_module_entry_point_runs_a_verb(tmp_path: Path) -> None:
    out = tmp_path / "run.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "tunewise.cli", "init", str(out)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src")},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "wrote" in proc.stdout


def test_resume_with_nproc_relaunches_the_newest_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("older", "newer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("{}\n")
    launched = []
    monkeypatch.setattr(commands, "_launch_distributed", lambda args, cfg: launched.append(cfg.name) or 0)
    monkeypatch.delenv("TUNEWISE_CHILD", raising=False)
    args = parse_args(["train", f"output_dir={tmp_path}", "--resume", "--nproc", "2"])
    assert args.func(args) == 0
    assert launched == ["newer"]  # not a new, empty run directory
