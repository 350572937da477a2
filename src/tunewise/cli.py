"""Command line: one verb per job. The only module that prints.

A user error exits 2 with one message that says what is wrong, where and how to fix it; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from tunewise.config import ConfigError, load_config

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

def _user_errors() -> tuple[type[BaseException], ...]:
    """Project errors that are the user's to fix (imported lazily: they live in heavier modules)."""
    errors: list[type[BaseException]] = [ConfigError]
    for module, name in [
        ("tunewise.formats", "DataError"),
        ("tunewise.model", "ModelError"),
        ("tunewise.logs", "DoctorError"),
    ]:
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _say(text: str = "", style: str | None = None) -> None:
    console.print(text, style=style, markup=False)


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return "NaN" if math.isnan(x) else f"{x:.{digits}g}"
    return "-" if x is None else str(x)


# ----------------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    from tunewise.config import starter_config_text

    path = Path(args.path)
    if path.exists() and not args.force:
        raise ConfigError([f"`{path}` already exists; pass --force to overwrite it or choose another path"])
    path.write_text(starter_config_text(), encoding="utf-8")
    _say(f"wrote {path} (every default, one comment each). Next: tunewise check {path}")
    return 0


def _print_plan(plan: dict) -> None:
    s = plan["steps"]
    _say(
        f"plan: {s['examples']} examples, effective batch {s['effective_batch']} "
        f"(per-device x accumulation x {s['processes']} process(es)), {s['steps_per_epoch']} steps/epoch, "
        f"{s['total_steps']} optimizer steps in total, warmup {plan['warmup_steps']} steps",
        style="bold",
    )
    if s["rule_of_thumb"] != s["total_steps"] and s["epochs"] == int(s["epochs"]):
        _say(
            f"  note: the rule of thumb (examples // effective batch) x epochs gives {s['rule_of_thumb']}; "
            f"the Trainer also steps on the partial batch that ends each epoch, so it runs {s['total_steps']}"
        )
    _say(
        f"  evaluations: {plan['evaluations']} ({plan['evaluations_per_epoch']}/epoch); "
        f"saves: {plan['saves']}; "
        f"learning rate {_fmt(plan['learning_rate'])} ({plan['method']})"
    )
    hw = plan.get("hardware")
    if hw:
        _say(f"  hardware: {hw['device']} ({hw['device_name']}), precision {hw['precision']}, "
             f"optimizer {hw['optim']}")
    mem = plan.get("memory")
    if mem:
        gib = 1024**3
        _say(
            f"  memory at step 1 (estimate): {mem['peak'] / gib:.2f} GiB "
            f"of {mem['device_bytes'] / gib:.1f} GiB "
            f"(weights {mem['weights'] / gib:.2f}, optimizer {mem['optimizer'] / gib:.2f}, activations "
            f"{mem['activations_with_checkpointing'] / gib:.2f} with checkpointing / "
            f"{mem['activations_without_checkpointing'] / gib:.2f} without); "
            f"{mem['trainable_parameters']:,} trainable of {mem['total_parameters']:,} parameters"
        )


def _print_finding(finding: Any) -> None:
    style = {"error": "bold red", "warning": "yellow", "info": "cyan"}.get(finding.severity, None)
    where = f"step {finding.step}" if finding.step is not None else "run"
    _say(f"[doctor] {finding.severity.upper()} at {where}: {finding.title}", style=style)
    for fix in finding.fixes[:3]:
        if fix.change:
            _say(f"         fix: {fix.change}  ({fix.why})")


class Progress:
    """Progress during train: a rich bar on a terminal, a plain line every N steps elsewhere."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task, self.total, self.last_print = quiet, None, None, 0, 0.0
        self.start = time.time()

    def begin(self, info: dict) -> None:
        self.total = int(info.get("max_steps") or 0)
        self.start = time.time()  # elapsed and ETA count from the first step, not from start-up
        if self.quiet or not console.is_terminal:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=self.total, info="")

    def step(self, rec: dict) -> None:
        info = (
            f"loss {_fmt(rec['loss'])} lr {_fmt(rec['learning_rate'], 3)} "
            f"{_fmt(rec.get('tokens_per_s') or 0.0, 4)} tok/s"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=rec["step"], info=info)
        elif not self.quiet and (
            rec["step"] in (1, 10) or time.time() - self.last_print > 15 or rec["step"] == self.total
        ):
            elapsed = time.time() - self.start
            eta = elapsed / rec["step"] * (self.total - rec["step"]) if rec["step"] else 0
            _say(f"step {rec['step']}/{self.total}  {info}  elapsed {elapsed:.0f}s  eta {eta:.0f}s")
            self.last_print = time.time()

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _launch_distributed(args: argparse.Namespace, cfg: Any) -> int:
    """Re-run this train command under torchrun with N data-parallel processes (gloo on the CPU)."""
    from tunewise.train import make_run_dir

    run_dir = make_run_dir(cfg)
    argv = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
    if "--nproc" in sys.argv:
        i = sys.argv.index("--nproc")
        argv = sys.argv[1:i] + sys.argv[i + 2 :]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "tunewise.cli",
        *argv,
        f"name={cfg.name}",
        f"output_dir={cfg.output_dir}",
    ]
    _say(f"launching {args.nproc} processes: {' '.join(cmd[2:])}")
    env = dict(os.environ, TUNEWISE_CHILD="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rc = subprocess.call(cmd, env=env)
    result = run_dir / "result.json"
    if result.is_file():
        data = json.loads(result.read_text())
        _say(f"run {run_dir}: {data['status']} at step {data['global_step']}")
    return rc


def cmd_train(args: argparse.Namespace) -> int:
    from tunewise.train import TrainHooks, train

    cfg = load_config(args.config, args.overrides)
    if args.nproc and args.nproc > 1 and not os.environ.get("TUNEWISE_CHILD"):
        return _launch_distributed(args, cfg)
    if args.resume and not cfg.name:
        cfg.name = _latest_run_name(Path(cfg.output_dir))
    check = None
    if not os.environ.get("TUNEWISE_CHILD"):
        report = _preflight(cfg)
        check = report.to_dict()
        if report.failed and not args.force:
            _say("refusing to train: the check has FAIL items (fix them, or pass --force to train anyway)",
                 style="bold red")
            return 1
    progress = Progress(args.quiet)
    hooks = TrainHooks(
        on_plan=_print_plan,
        on_notice=lambda n: _say(f"notice: {n}", style="yellow"),
        on_finding=_print_finding,
        on_step=progress.step,
        on_start=progress.begin,
        stop_at_step=args.stop_at_step,
        samples=not args.no_samples,
    )
    try:
        result = train(cfg, resume=args.resume, hooks=hooks, force=args.force, check=check)
    finally:
        progress.end()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    _print_result(result)
    return 0 if result.status == "completed" else 1


def _latest_run_name(output_dir: Path) -> str:
    runs = sorted(
        (p for p in output_dir.glob("*") if (p / "config.yaml").is_file()), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ConfigError([f"--resume: no run directory under `{output_dir}`; name the run with `name=...`"])
    return runs[-1].name


def _preflight(cfg: Any) -> Any:
    """Run the pre-flight check and print what is not PASS."""
    from tunewise.check import run_check

    report = run_check(cfg)
    _print_check(report, brief=True)
    return report


def _print_result(result: Any) -> None:
    n = result.numbers
    style = "bold green" if result.status == "completed" else "bold red"
    _say(
        f"{result.status}: {result.global_step} steps; final train loss {_fmt(n.get('final_train_loss'))}, "
        f"best eval loss {_fmt(n.get('best_eval_loss'))} ({n.get('best_checkpoint') or 'no checkpoint'})",
        style=style,
    )
    if result.error:
        _say(f"why: {result.error}", style=style)
    if n.get("recovery_changes"):
        _say(f"recovered from divergence by changing: {', '.join(n['recovery_changes'])}")
    findings = n.get("findings") or []
    if findings:
        _say(f"the doctor's findings ({len(findings)}):", style="bold")
        for f in findings:
            where = f"step {f['step']}" if f.get("step") is not None else "run"
            _say(f"  {f['severity']:7} {where}: {f['title']}")
    else:
        _say("the doctor found nothing to warn about")
    _say(
        f"run directory: {result.run_dir}  (saved {n.get('saved', '-')}/, report.html; "
        f"next: tunewise doctor {result.run_dir})"
    )


def _print_check(report: Any, brief: bool = False) -> None:
    styles = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}
    for item in report.items:
        if brief and item.status == "PASS":
            continue
        _say(f"{item.status:4}  {item.name}: {item.detail}", style=styles.get(item.status))
        if item.fix and item.status != "PASS":
            _say(f"      fix: {item.fix}")
    counts = report.counts()
    _say(f"check: {counts['PASS']} pass, {counts['WARN']} warn, {counts['FAIL']} fail")


def cmd_plan(args: argparse.Namespace) -> int:
    from tunewise.check import plan_config

    plan = plan_config(load_config(args.config, args.overrides), processes=args.nproc or 1)
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
    else:
        _print_plan(plan)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tunewise.check import run_check

    report = run_check(load_config(args.config, args.overrides), processes=args.nproc or 1)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _print_check(report)
        _say("the loss falling by step 10 is watched live by the training monitor")
    return 1 if report.failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tunewise.check import inspect_examples

    text = inspect_examples(
        load_config(args.config, args.overrides), n=args.n, index=args.index, color=console.is_terminal
    )
    sys.stdout.write(text + "\n")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from tunewise.diagnose import diagnose_path, render_diagnosis

    diagnosis = diagnose_path(Path(args.path))
    if args.json:
        print(json.dumps(diagnosis.to_dict(), indent=2, default=str))
    else:
        sys.stdout.write(render_diagnosis(diagnosis, color=console.is_terminal) + "\n")
    return diagnosis.exit_code()


def cmd_eval(args: argparse.Namespace) -> int:
    from tunewise.evaluate import evaluate

    if args.base:
        cfg = load_config(args.config, args.overrides)
        run_dir = None
    else:
        if not args.run_dir:
            raise ConfigError(["eval needs a RUN_DIR (a directory that `tunewise train` wrote) or --base"])
        run_dir = Path(args.run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                [
                    f"`{run_dir}` is not a run directory (no config.yaml); pass the directory that "
                    "`tunewise train` printed"
                ]
            )
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    if getattr(args, "memorization", False):
        return _eval_memorization(args, cfg, run_dir)
    result = evaluate(cfg, run_dir, limit=args.limit)

    if run_dir is not None:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_eval(result)
    return 0


def _print_eval(result: dict) -> None:
    extra = ""
    if "field_accuracy" in result:
        extra = f", valid JSON {result['valid_json']:.0%}, field accuracy {result['field_accuracy']:.1%}"
    _say(
        f"{result['which']} model: exact match {result['exact_match']:.1%} "
        f"on {result['n']} test examples{extra} "
        f"({result['seconds']}s)",
        style="bold",
    )


def _eval_memorization(args: argparse.Namespace, cfg: Any, run_dir: Path | None) -> int:
    from tunewise.evaluate import check_memorization

    if run_dir is None:
        raise ConfigError(["--memorization checks a trained run: pass its RUN_DIR instead of --base"])
    result = check_memorization(cfg, run_dir, n=args.limit or 20)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, label in [("train", "training prompts"), ("rephrased", "same, lightly rephrased"),
                        ("heldout", "held-out prompts")]:
        numbers = result["sets"][name]
        _say(f"  {label:<24} near-verbatim {numbers['near_verbatim']:.0%}  "
             f"verbatim {numbers['verbatim']:.0%}  (n={numbers['n']})")
    _say(result["message"], style="bold red" if result["flagged"] else "bold green")
    _say(f"wrote {run_dir / 'memorization.json'}")
    return 1 if result["flagged"] else 0


def _require_run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError([f"`{run_dir}` is not a run directory (no config.yaml); pass the directory that "
                           "`tunewise train` printed"])
    return run_dir


def cmd_report(args: argparse.Namespace) -> int:
    import webbrowser

    from tunewise.report import write_report

    path = Path(args.run_dir)
    if not path.exists():
        raise ConfigError([f"`{path}` does not exist; pass a run directory or a Trainer output directory"])
    out = write_report(path)
    _say(f"wrote {out} (and its charts as PNG files next to it)")
    if args.open:
        webbrowser.open(out.resolve().as_uri())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunewise.evaluate import conversations_from_file, generate, load_for_inference, prompt_conversations

    run_dir = _require_run_dir(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if bool(args.prompt) == bool(args.file):
        raise ConfigError(["generate needs exactly one of --prompt TEXT or --file FILE"])
    conversations = (prompt_conversations(cfg, [args.prompt]) if args.prompt
                     else conversations_from_file(cfg, Path(args.file)))
    model, tokenizer = load_for_inference(cfg, run_dir)
    replies = generate(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                       sample=args.sample, temperature=args.temperature)
    if args.json:
        print(json.dumps([{"prompt": c[-1]["content"] if c else "", "reply": r}
                          for c, r in zip(conversations, replies, strict=True)], indent=2))
        return 0
    for conversation, reply in zip(conversations, replies, strict=True):
        if len(conversations) > 1:
            _say(f"> {conversation[-1]['content'] if conversation else ''}", style="dim")
        _say(reply)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tunewise.export import merge_adapter

    result = merge_adapter(_require_run_dir(args.run_dir), Path(args.out), args.dtype)
    for note in result.notes:
        _say(f"note: {note}", style="bold yellow")
    _say(f"merged {args.run_dir}/adapter into {result.base} ({result.dtype}): {result.out_dir}\n"
         f"load it with AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})", style="bold")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunewise.demo import run_demo

    return run_demo(
        _say,
        _print_plan,
        _print_check,
        _print_finding,
        _print_eval,
        Progress(args.quiet),
        overrides=args.overrides,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from tunewise.sweep import DEFAULT_GRID, SweepSpec, parse_grid, parse_resources, run_sweep

    grid = parse_grid([item for group in args.grid or [] for item in group]) or dict(DEFAULT_GRID)
    spec = SweepSpec(config=args.config, overrides=args.overrides, grid=grid, max_steps=args.max_steps,
                     strategy=args.strategy, eta=args.eta, workers=args.workers, backend=args.backend,
                     ray_address=args.ray_address, ray_resources=parse_resources(args.ray_resources),
                     name=args.name)
    result = run_sweep(spec, on_trial=None if args.json else _print_trial_event)
    if args.json:
        print(json.dumps(json.loads((result.sweep_dir / "sweep.json").read_text()), indent=2))
    else:
        _print_sweep(result)
    if args.then_train and result.winner is not None:
        _say(f"training the winner {result.winner.name} with its resolved config", style="bold")
        return main(["train", result.files["best_config"]])
    return 0 if result.winner is not None else 1


def _print_trial_event(event: str, trial: Any) -> None:
    params = " ".join(trial.overrides())
    if event == "start":
        _say(f"{trial.name}: running ({params})")
        return
    evals = sorted(trial.evals.items())
    last = f"val loss {_fmt(evals[-1][1])} at step {evals[-1][0]}" if evals else "no eval"
    style = "red" if trial.status in ("failed", "diverged") else None
    _say(f"{trial.name}: {trial.status} at step {trial.global_step}, {last}, {trial.seconds:.0f}s",
         style=style)


def _print_sweep(result: Any) -> None:
    spec = result.spec
    where = (f"at step {result.compare_step}" if spec.strategy == "grid"
             else f"at the highest rung each reached (rungs {', '.join(map(str, result.rungs))})")
    _say(f"sweep {result.sweep_dir}: {spec.strategy}, {len(result.trials)} trials, "
         f"up to {spec.max_steps} steps; ranked by validation loss {where}", style="bold")
    if result.launched == 0:
        _say("every trial was already done: nothing was run again (delete a trial directory to re-run it)")
    keys = list(spec.grid)
    head = f"{'#':>2}  {'trial':32} " + " ".join(f"{k.split('.')[-1][:13]:>13}" for k in keys)
    _say(f"{head}  {'status':9} {'verdict':17} {'steps':>5} {'time':>6}  val loss")
    for rank, t in enumerate(result.trials, start=1):
        cells = " ".join(f"{t.params[k][:13]:>13}" for k in keys)
        loss = f"{_fmt(t.val_loss)} @{t.rank_step}" if t.val_loss is not None else "-"
        mark = "  <- winner" if t is result.winner else ""
        status = f"pruned@{t.pruned_at}" if t.pruned_at and t.status == "stopped" else t.status
        style = "bold green" if mark else ("red" if t.status in ("failed", "diverged") else None)
        _say(f"{rank:>2}  {t.name[:32]:32} {cells}  {status:9} {t.verdict or '-':17} {t.global_step:>5} "
             f"{t.seconds:>5.0f}s  {loss}{mark}", style=style)
        if t.status in ("failed", "diverged"):
            _say(f"      {t.finding or t.error or ''}"[:300])
    _say(f"optimizer steps spent: {result.total_steps}; files: {', '.join(result.files.values())}")
    if result.winner is not None:
        _say(f"winner: {' '.join(result.winner.overrides())}  (val loss {_fmt(result.winner.val_loss)})",
             style="bold")
        _say(f"next: tunewise train {result.files['best_config']}   (or re-run with --then-train)")
    else:
        _say("no trial finished with a validation loss: see the findings above", style="bold red")


def cmd_lr_find(args: argparse.Namespace) -> int:
    from tunewise.lrfind import find_learning_rate

    cfg = load_config(args.config, args.overrides)
    result = find_learning_rate(cfg, start=args.start, end=args.end, steps=args.steps)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    _say(f"lr-find: {len(result.lrs)} steps from lr {_fmt(args.start, 2)} to {_fmt(result.lrs[-1], 2)}; "
         f"stopped: {result.stop_reason}", style="bold")
    if result.suggestion is None:
        _say(f"no suggestion: {result.caution}", style="bold red")
    else:
        _say(f"suggested: {result.sweep_override()}  ({result.rule})", style="bold green")
    if result.caution:
        _say(f"caution: {result.caution}", style="yellow")
    else:
        _say(f"note: {result.note}")
    _say(f"curve: {result.out_dir / 'lr_find.png'}  data: {result.out_dir / 'lr_find.json'}")
    if result.suggestion is not None:
        words = ["tunewise sweep", args.config, *args.overrides, "--grid", result.sweep_grid()]
        words = [w for w in words if w]
        _say(f"next: {' '.join(words)}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunewise",
        description="Fine-tune causal language models (LoRA, QLoRA, full) with the training loop "
        "and hyperparameters planned, checked, watched and diagnosed.",
        epilog="Every command that reads a config accepts key=value overrides, "
        "e.g. training.learning_rate=1e-4.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Any, help_: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if config:
            p.add_argument(
                "config",
                nargs="?",
                help="YAML config (default: every default, the embedded model and the bundled dataset)",
            )
            p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. adapter.r=16")
        return p

    p = add("init", cmd_init, "write a starter config with every default and a one-line comment each", False)
    p.add_argument(
        "path", nargs="?", default="tunewise.yaml", help="where to write it (default tunewise.yaml)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = add("plan", cmd_plan, "steps, warmup, cadence and memory of a run, before loading any weights")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes the run will use")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("check", cmd_check, "the pre-flight checklist: PASS/WARN/FAIL per item with numbers and fixes")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes the run will use")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("inspect", cmd_inspect, "show examples as the model sees them: trained vs masked tokens")
    p.add_argument("--n", type=int, default=3, help="how many examples")
    p.add_argument("--index", type=int, default=None, help="show the example at this index")
    p = add("train", cmd_train, "fine-tune: check, load, train with the live doctor, save the run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run (config `name`, else the newest run) "
        "from its latest checkpoint: optimizer, scheduler and data position restored",
    )
    p.add_argument("--force", action="store_true", help="train even when the pre-flight check FAILs")
    p.add_argument(
        "--nproc", type=int, default=1, help="data-parallel processes (DDP through torchrun; gloo on CPU)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                   help="pause after step N is evaluated and checkpointed (status stopped); --resume goes on")
    p.add_argument("--no-samples", action="store_true", help="skip the sample generations (samples.json)")
    p = add(
        "doctor",
        cmd_doctor,
        "diagnose a run: tunewise run dir, HF Trainer output dir, trainer_state.json or TensorBoard events",
        False,
    )
    p.add_argument("path", help="run directory, output directory, trainer_state.json or event files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "eval",
        help="exact-match accuracy on the test split, base model or tuned run",
        description="Generate greedily for the test split and score exact match.",
    )
    p.set_defaults(func=cmd_eval)
    p.add_argument("run_dir", nargs="?", help="run directory to evaluate")
    p.add_argument("--base", action="store_true", help="evaluate the base model of --config instead of a run")
    p.add_argument("--config", default=None, help="config for --base (default: defaults)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test examples")
    p.add_argument("--memorization", action="store_true",
                   help="memorization check: training vs rephrased vs held-out prompts (--limit N each, "
                   "default 20); writes memorization.json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p = add("sweep", cmd_sweep, "hyperparameter search: one short training per grid point, ranked by "
            "validation loss, with the doctor's verdict per trial; re-running resumes")
    p.add_argument("--grid", nargs="+", action="append", metavar="KEY=V1,V2",
                   help="values to try, e.g. --grid training.learning_rate=1e-4,2e-4 adapter.r=8,16 "
                   "(default: learning_rate 1e-4,2e-4,5e-4 x adapter.r 4,8,16); put overrides before --grid")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps per trial (default 100)")
    p.add_argument("--strategy", choices=["grid", "halving"], default="grid",
                   help="grid: every trial runs max-steps; halving: successive halving, keep the best 1/eta "
                   "at each rung")
    p.add_argument("--eta", type=int, default=3, help="halving: keep the best 1/eta at each rung (default 3)")
    p.add_argument("--workers", type=int, default=1,
                   help="trials run in parallel on this machine (with --backend ray: at most this many at "
                   "once when above 1; default: as many as the cluster's resources allow)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local processes, or Ray Tune trials on a Ray cluster (pip install 'tunewise[ray]')")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--ray-resources", default="cpu=1", metavar="cpu=N,gpu=N",
                   help="what each Ray trial holds (default cpu=1); e.g. cpu=4,gpu=1")
    p.add_argument("--name", default=None, help="sweep name (default: config name + a hash of the sweep)")
    p.add_argument("--then-train", action="store_true", help="then train the winner with its resolved config")
    p.add_argument("--json", action="store_true", help="machine-readable output (sweep.json)")
    p = add("lr-find", cmd_lr_find, "learning-rate range test: ramp the lr exponentially, plot the loss, "
            "suggest a rate and a sweep grid around it")
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=float, default=1.0, help="last learning rate (default 1)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in the ramp (default 100)")
    p.add_argument("--json", action="store_true", help="machine-readable output (lr_find.json)")
    p = add("report", cmd_report, "one self-contained report.html: curves, findings, eval, samples, config",
            False)
    p.add_argument("run_dir", help="run directory, Trainer output directory or trainer_state.json")
    p.add_argument("--open", action="store_true", help="open the report in the default browser")
    p = add("generate", cmd_generate, "generate with a trained run (adapter applied, chat template; greedy)",
            False)
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--prompt", default=None, help="one prompt (a user message)")
    p.add_argument("--file", default=None,
                   help="prompts: a text file (one per line) or a data file (JSONL, ...)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens to generate per reply (default 128)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("merge", cmd_merge, "merge the LoRA adapter into the base weights: a plain Transformers "
            "model directory", False)
    p.add_argument("run_dir", help="run directory of a lora or qlora run")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of the merged weights (default fp32); a qlora base is reloaded "
                   "unquantized in it")
    p = add(
        "demo", cmd_demo, "the embedded model on the bundled dataset: check, train, evaluate, diagnose", False
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tunewise` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "torch", "accelerate", "peft", "bitsandbytes", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # tunewise reports progress itself
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. the one-off GGUF conversion bar
    # bitsandbytes says this on every CPU step; tunewise says it once as a hardware notice
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # renames announced for transformers 6 (gradient_ -> activation_checkpointing): noise for our users
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = build_parser().parse_args(argv)
    config = getattr(args, "config", None)
    if config and "=" in config and not Path(config).exists():
        args.overrides, args.config = [config, *args.overrides], None  # only overrides were given
    try:
        return args.func(args)
    except _user_errors() as exc:
        if args.debug:
            traceback.print_exc()
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
