"""The commands: one function per verb, `args` in, exit status out.

Each command imports the stage it runs inside its function: those stages load torch, transformers
or matplotlib, and every `tunewise` command line starts by importing this module.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewise import rundir
from tunewise.cli.printers import Printer, console, fmt, say
from tunewise.config import Config, load_config, starter_config_text
from tunewise.doctor.diagnose import diagnose_path, render_diagnosis
from tunewise.errors import ConfigError

out = Printer()


@dataclass(frozen=True)
class Option:
    """One argument of a verb, as `ArgumentParser.add_argument` takes it."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")

    @property
    def is_switch(self) -> bool:
        return self.kwargs.get("action") == "store_true"

    @property
    def default(self) -> Any:
        return self.kwargs.get("default", False if self.is_switch else None)


def option(*flags: str, **kwargs: Any) -> Option:
    return Option(flags, kwargs)


# The train verb's flags; the `--nproc` relaunch rebuilds each process's command line from them.
TRAIN_OPTIONS = (
    option(
        "--resume",
        action="store_true",
        help="continue the run (config `name`, else the newest run) "
        "from its latest checkpoint: optimizer, scheduler and data position restored",
    ),
    option("--force", action="store_true", help="train even when the pre-flight check FAILs"),
    option(
        "--nproc", type=int, default=1, help="data-parallel processes (DDP through torchrun; gloo on CPU)"
    ),
    option("--quiet", action="store_true", help="no progress output"),
    option(
        "--stop-at-step",
        type=int,
        default=None,
        metavar="N",
        help="pause after step N is evaluated and checkpointed (status stopped); --resume goes on",
    ),
    option("--no-samples", action="store_true", help="skip the sample generations (samples.json)"),
)


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise ConfigError([f"`{path}` already exists; pass --force to overwrite it or choose another path"])
    path.write_text(starter_config_text(), encoding="utf-8")
    say(f"wrote {path} (every default, one comment each). Next: tunewise check {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tunewise.plan import plan_config

    plan = plan_config(load_config(args.config, args.overrides), processes=args.nproc or 1)
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
    else:
        out.plan(plan)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tunewise.check import run_check

    report = run_check(load_config(args.config, args.overrides), processes=args.nproc or 1)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        out.check(report)
        say("the loss falling by step 10 is watched live by the training monitor")
    return 1 if report.failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tunewise.data import inspect_examples
    from tunewise.model import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    text = inspect_examples(cfg, load_tokenizer(cfg), n=args.n, index=args.index, color=console.is_terminal)
    sys.stdout.write(text + "\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tunewise.check import run_check
    from tunewise.training.distributed import is_main_process
    from tunewise.training.run import TrainHooks, train

    cfg = load_config(args.config, args.overrides)
    child = bool(os.environ.get("TUNEWISE_CHILD"))  # a process torchrun started for `--nproc`
    if args.resume and not cfg.name:
        cfg.name = _latest_run_name(Path(cfg.output_dir))
    if args.nproc and args.nproc > 1 and not child:
        return _launch_distributed(args, cfg)
    check = None
    if not child:
        report = run_check(cfg)
        out.check(report, brief=True)
        check = report.to_dict()
        if report.failed and not args.force:
            say(
                "refusing to train: the check has FAIL items (fix them, or pass --force to train anyway)",
                style="bold red",
            )
            return 1
    progress = out.progress(args.quiet)
    hooks = TrainHooks(
        on_plan=out.plan,
        on_notice=out.notice,
        on_finding=out.finding,
        on_step=progress.step,
        on_start=progress.begin,
        stop_at_step=args.stop_at_step,
        samples=not args.no_samples,
    )
    try:
        result = train(cfg, resume=args.resume, hooks=hooks, force=args.force, check=check)
    finally:
        progress.end()
    if not is_main_process():
        return 0
    out.result(result)
    return 0 if result.status == "completed" else 1


def relaunch_argv(args: argparse.Namespace, cfg: Config) -> list[str]:
    """The `train` command line each torchrun process runs, built from the parsed arguments: the config,
    the overrides, the run's name and output directory, then every flag set (but `--nproc`).

    Args:
        args: the parsed `train` arguments.
        cfg: the loaded config; its name is already chosen (every process writes the same run).
    """
    argv = ["--debug"] if args.debug else []
    argv += ["train", *([args.config] if args.config else []), *args.overrides]
    argv += [f"name={cfg.name}", f"output_dir={cfg.output_dir}"]
    for opt in TRAIN_OPTIONS:
        value = getattr(args, opt.dest)
        if opt.dest != "nproc" and value != opt.default:
            argv += [opt.flags[0]] if opt.is_switch else [opt.flags[0], str(value)]
    return argv


def _launch_distributed(args: argparse.Namespace, cfg: Config) -> int:
    """Re-run this train command under torchrun with N data-parallel processes (gloo on the CPU)."""
    run_dir = rundir.make_run_dir(cfg)
    argv = relaunch_argv(args, cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd += ["-m", "tunewise.cli", *argv]
    say(f"launching {args.nproc} processes: {' '.join(cmd[2:])}")
    env = dict(os.environ, TUNEWISE_CHILD="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rc = subprocess.call(cmd, env=env)
    result = rundir.read_json_object(run_dir / rundir.RESULT)
    if result:
        say(f"run {run_dir}: {result['status']} at step {result['global_step']}")
    return rc


def _latest_run_name(output_dir: Path) -> str:
    runs = sorted(
        (p for p in output_dir.glob("*") if (p / rundir.CONFIG).is_file()), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ConfigError([f"--resume: no run directory under `{output_dir}`; name the run with `name=...`"])
    return runs[-1].name


def cmd_doctor(args: argparse.Namespace) -> int:
    # Fixes in the run's own words: tunewise overrides for `tunewise train`, a script's arguments otherwise.
    diagnosis = diagnose_path(Path(args.path)).in_run_words()
    if args.json:
        print(json.dumps(diagnosis.to_dict(), indent=2, default=str))
    else:
        sys.stdout.write(render_diagnosis(diagnosis, color=console.is_terminal) + "\n")
    return diagnosis.exit_code()


def _require_run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / rundir.CONFIG).is_file():
        raise ConfigError(
            [
                f"`{run_dir}` is not a run directory (no config.yaml); pass the directory that "
                "`tunewise train` printed"
            ]
        )
    return run_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from tunewise.cli.printers import EvalProgress
    from tunewise.evaluate import compare, evaluate

    if args.base:
        cfg = load_config(args.config, args.overrides)
        run_dir = None
    else:
        if not args.run_dir:
            raise ConfigError(["eval needs a RUN_DIR (a directory that `tunewise train` wrote) or --base"])
        run_dir = _require_run_dir(args.run_dir)
        cfg = load_config(run_dir / rundir.CONFIG, args.overrides)
    if args.memorization:
        return _eval_memorization(args, cfg, run_dir)
    progress = EvalProgress(args.json)
    try:
        if run_dir is None:
            result = evaluate(cfg, None, limit=args.limit, progress=progress)
        else:  # base and tuned; writes eval.json and eval.jsonl
            result = compare(cfg, run_dir, limit=args.limit, progress=progress)
    finally:
        progress.end()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif run_dir is None:
        out.eval(result)
    else:
        out.comparison(result, run_dir)
    return 0


def _eval_memorization(args: argparse.Namespace, cfg: Config, run_dir: Path | None) -> int:
    from tunewise.memorization import check_memorization

    if run_dir is None:
        raise ConfigError(["--memorization checks a trained run: pass its RUN_DIR instead of --base"])
    result = check_memorization(cfg, run_dir, n=args.limit or 20)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 1 if result["flagged"] else 0
    say(f"reworded prompts: {result['rephrasing']}")
    for name, label in [
        ("train", "training prompts"),
        ("rephrased", "same, reworded"),
        ("heldout", "held-out prompts"),
    ]:
        numbers = result["sets"][name]
        say(
            f"  {label:<24} near-verbatim {numbers['near_verbatim']:.0%}  "
            f"verbatim {numbers['verbatim']:.0%}  loss {fmt(numbers['loss'])}  (n={numbers['n']})"
        )
    say(result["message"], style="bold red" if result["flagged"] else "bold green")
    say(f"wrote {run_dir / rundir.MEMORIZATION}")
    return 1 if result["flagged"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from tunewise.report import write_report

    path = Path(args.run_dir)
    if not path.exists():
        raise ConfigError([f"`{path}` does not exist; pass a run directory or a Trainer output directory"])
    report = write_report(path)
    say(f"wrote {report} (and its charts as PNG files next to it)")
    if args.open:
        webbrowser.open(report.resolve().as_uri())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunewise.evaluate import conversations_from_file, generate, load_for_inference, prompt_conversations

    run_dir = _require_run_dir(args.run_dir)
    cfg = load_config(run_dir / rundir.CONFIG)
    if bool(args.prompt) == bool(args.file):
        raise ConfigError(["generate needs exactly one of --prompt TEXT or --file FILE"])
    conversations = (
        prompt_conversations(cfg, [args.prompt])
        if args.prompt
        else conversations_from_file(cfg, Path(args.file))
    )
    model, tokenizer = load_for_inference(cfg, run_dir)
    replies = generate(
        model,
        tokenizer,
        conversations,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
    )
    if args.json:
        pairs = zip(conversations, replies, strict=True)
        print(json.dumps([{"prompt": c[-1]["content"] if c else "", "reply": r} for c, r in pairs], indent=2))
        return 0
    for conversation, reply in zip(conversations, replies, strict=True):
        if len(conversations) > 1:
            say(f"> {conversation[-1]['content'] if conversation else ''}", style="dim")
        say(reply)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tunewise.export import merge_adapter

    result = merge_adapter(_require_run_dir(args.run_dir), Path(args.out), args.dtype)
    for note in result.notes:
        say(f"note: {note}", style="bold yellow")
    say(
        f"merged {args.run_dir}/adapter into {result.base} ({result.dtype}): {result.out_dir}\n"
        f"load it with AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})",
        style="bold",
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunewise.demo import run_demo

    return run_demo(out, overrides=args.overrides, quiet=args.quiet)


def cmd_sweep(args: argparse.Namespace) -> int:
    from tunewise.sweep import DEFAULT_GRID, SweepSpec, parse_grid, parse_resources, run_sweep, split_values

    # `--grid` takes every word up to the next flag: a `key=value` there with one value is an override
    items = [item for group in args.grid or [] for item in group]
    fixed = [item for item in items if len(split_values(item.partition("=")[2])) == 1]
    grid = parse_grid([item for item in items if item not in fixed]) or dict(DEFAULT_GRID)
    spec = SweepSpec(
        config=args.config,
        overrides=[*args.overrides, *fixed],
        grid=grid,
        max_steps=args.max_steps,
        strategy=args.strategy,
        eta=args.eta,
        workers=args.workers,
        backend=args.backend,
        ray_address=args.ray_address,
        ray_resources=parse_resources(args.ray_resources),
        name=args.name,
    )
    result = run_sweep(spec, on_trial=None if args.json else out.trial_event)
    if args.json:
        print(json.dumps(rundir.read_json(result.sweep_dir / "sweep.json"), indent=2))
    else:
        out.sweep(result)
    if args.then_train and result.winner is not None:
        from tunewise.cli import main  # the package's entry point; it imports this module

        say(f"training the winner {result.winner.name} with its resolved config", style="bold")
        return main(["train", result.files["best_config"]])
    return 0 if result.winner is not None else 1


def cmd_lr_find(args: argparse.Namespace) -> int:
    from tunewise.training.lrfind import find_learning_rate

    cfg = load_config(args.config, args.overrides)
    result = find_learning_rate(cfg, start=args.start, end=args.end, steps=args.steps)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    say(
        f"lr-find: {len(result.lrs)} steps from lr {args.start:.2g} to {result.lrs[-1]:.2g}; "
        f"stopped: {result.stop_reason}",
        style="bold",
    )
    if result.suggestion is None:
        say(f"no suggestion: {result.caution}", style="bold red")
    else:
        say(f"suggested: {result.sweep_override()}  ({result.rule})", style="bold green")
    if result.caution:
        say(f"caution: {result.caution}", style="yellow")
    else:
        say(f"note: {result.note}")
    say(f"curve: {result.out_dir / 'lr_find.png'}  data: {result.out_dir / 'lr_find.json'}")
    if result.suggestion is not None:
        words = ["tunewise sweep", args.config, *args.overrides, "--grid", result.sweep_grid()]
        say(f"next: {' '.join(w for w in words if w)}")
    return 0
