"""Printers: what the commands show people, on a terminal (colour, a progress bar) or as plain text.

The CLI is the only part of tunewise that prints. `Printer` gathers the printers the commands share;
the demo (tunewise.demo) is handed one, so it prints exactly as the commands do.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from tunewise import rundir
from tunewise.sharding import sharding_line

if TYPE_CHECKING:
    from tunewise.check import CheckReport
    from tunewise.doctor.findings import Finding
    from tunewise.rundir import RunResult
    from tunewise.sweep import SweepResult, Trial

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
GIB = 1024**3


def say(text: str = "", style: str | None = None) -> None:
    """One line to stdout, with an optional rich style (no markup is interpreted)."""
    console.print(text, style=style, markup=False)


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a one-line summary: NaN spelled out, `-` for None."""
    if isinstance(x, float):
        return "NaN" if math.isnan(x) else f"{x:.{digits}g}"
    return "-" if x is None else str(x)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def compact(x: float) -> str:
    """A rate in few characters: 950, 1.9k, 12k, 3.4M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            x /= scale
            return f"{x:.1f}{suffix}" if abs(x) < 10 else f"{x:.0f}{suffix}"
    return f"{x:.1f}" if abs(x) < 10 else f"{x:.0f}"


def share(x: float) -> str:
    """A fraction as a short percentage: 35%, 4.1%, 0.3%."""
    return f"{x:.0%}" if x == 0 or abs(x) >= 0.1 else f"{x:.1%}"


def speed_text(rec: dict) -> str:
    """A step's speed from its metrics record: `1.9k trained tok/s · pad 3% · MFU 4.1%`.

    Trained tokens/s (all tokens/s, said so, when the batches carry no labels), the padding share of the
    positions computed, and the model FLOPs utilisation; a number the record lacks (None, NaN) is left out.
    """
    parts = []
    if _finite(rec.get("trained_tokens_per_s")):
        parts.append(f"{compact(rec['trained_tokens_per_s'])} trained tok/s")
    elif _finite(rec.get("tokens_per_s")):
        parts.append(f"{compact(rec['tokens_per_s'])} tok/s")
    if _finite(rec.get("padding_fraction")):
        parts.append(f"pad {share(rec['padding_fraction'])}")
    if _finite(rec.get("mfu")):
        parts.append(f"MFU {share(rec['mfu'])}")
    return " · ".join(parts)


def step_info(rec: dict) -> str:
    """The progress line's numbers for one optimizer step: loss, learning rate, then its speed."""
    speed = speed_text(rec)
    return f"loss {fmt(rec['loss'])} lr {fmt(rec['learning_rate'], 3)}" + (f"  {speed}" if speed else "")


class Progress:
    """Progress during train: a rich bar on a terminal, a plain line every 15 s (and at steps 1 and 10)
    elsewhere; nothing when quiet."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task, self.total, self.last_print = quiet, None, None, 0, 0.0
        self.start = time.time()

    def begin(self, info: dict) -> None:
        self.total = int(info.get("max_steps") or 0)
        self.start = time.time()  # elapsed and ETA count from the first step, not from start-up
        if self.quiet or not console.is_terminal:
            return
        self.bar = RichProgress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=self.total, info="")

    def step(self, rec: dict) -> None:
        info = step_info(rec)
        if self.bar is not None:
            self.bar.update(self.task, completed=rec["step"], info=info)
        elif not self.quiet and (
            rec["step"] in (1, 10) or time.time() - self.last_print > 15 or rec["step"] == self.total
        ):
            elapsed = time.time() - self.start
            eta = elapsed / rec["step"] * (self.total - rec["step"]) if rec["step"] else 0
            say(f"step {rec['step']}/{self.total}  {info}  elapsed {elapsed:.0f}s  eta {eta:.0f}s")
            self.last_print = time.time()

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class EvalProgress:
    """Progress during eval, `progress(label, done, total)`: a rich bar with ETA on a terminal, a plain
    line every 15 s elsewhere; nothing when quiet."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task, self.label = quiet, None, None, ""
        self.start = self.last_print = 0.0

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if label != self.label:
            self.end()
            self.label, self.start = label, time.time()
            if console.is_terminal:
                self.bar = RichProgress(
                    TextColumn(label),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    console=console,
                )
                self.bar.start()
                self.task = self.bar.add_task(label, total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif done and (time.time() - self.last_print > 15 or done == total):
            elapsed = time.time() - self.start
            say(f"{label} {done}/{total}  elapsed {elapsed:.0f}s  eta {elapsed / done * (total - done):.0f}s")
            self.last_print = time.time()

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _eval_rows(result: dict) -> list[tuple[str, str]]:
    """(label, value) of one model's numbers: test and validation loss and perplexity, then each metric."""
    from tunewise.metrics import METRICS

    rows = []
    for split in ("test", "validation"):
        if f"{split}_loss" in result:
            rows.append((f"{split} loss", fmt(result[f"{split}_loss"])))
            rows.append((f"{split} perplexity", fmt(result[f"{split}_perplexity"])))
    skip = {"which", "n", "seconds", "generation_seconds", "examples", "metric_failures"}
    for key, value in result.items():
        if key not in skip and not key.startswith(("test_", "validation_")):
            shown = f"{value:.1%}" if key in METRICS and value is not None else fmt(value)  # theirs: any
            rows.append((key.replace("_", " "), shown))
    return rows


class Printer:
    """The printers the commands share; the demo gets one instead of a handful of callables."""

    say = staticmethod(say)

    def progress(self, quiet: bool) -> Progress:
        return Progress(quiet)

    def notice(self, text: str) -> None:
        say(f"notice: {text}", style="yellow")

    def plan(self, plan: dict) -> None:
        """Steps, warmup, cadence, hardware and memory of a plan (plan.json)."""
        s = plan["steps"]
        say(
            f"plan: {s['examples']} examples, effective batch {s['effective_batch']} "
            f"(per-device x accumulation x {s['processes']} process(es)), "
            f"{s['steps_per_epoch']} steps/epoch, "
            f"{s['total_steps']} optimizer steps in total, warmup {plan['warmup_steps']} steps",
            style="bold",
        )
        if s["rule_of_thumb"] != s["total_steps"] and s["epochs"] == int(s["epochs"]):
            say(
                "  note: the rule of thumb (examples // effective batch) x epochs gives "
                f"{s['rule_of_thumb']}; the Trainer also steps on the partial batch that ends each epoch, "
                f"so it runs {s['total_steps']}"
            )
        say(
            f"  evaluations: {plan['evaluations']} ({plan['evaluations_per_epoch']}/epoch); "
            f"saves: {plan['saves']}; "
            f"learning rate {fmt(plan['learning_rate'])} ({plan['method']})"
        )
        hw = plan.get("hardware")
        if hw:
            say(
                f"  hardware: {hw['device']} ({hw['device_name']}), precision {hw['precision']}, "
                f"optimizer {hw['optim']}"
            )
        mem = plan.get("memory")
        if mem:
            say(
                f"  memory (estimate): {mem['peak'] / GIB:.2f} GiB of {mem['device_bytes'] / GIB:.1f} GiB at "
                f"the run's peak, {mem.get('peak_step_1', mem['peak']) / GIB:.2f} at step 1 "
                f"(weights {mem['weights'] / GIB:.2f}, optimizer {mem['optimizer'] / GIB:.2f}, "
                f"evaluation {mem.get('evaluation', 0) / GIB:.2f}, activations "
                f"{mem['activations_with_checkpointing'] / GIB:.2f} with checkpointing / "
                f"{mem['activations_without_checkpointing'] / GIB:.2f} without); "
                f"{mem['trainable_parameters']:,} trainable of {mem['total_parameters']:,} parameters"
            )
            if mem.get("sharding"):
                say(f"  sharding: {sharding_line(mem['sharding'])}")
        quantization = plan.get("quantization")
        if quantization and quantization.get("problem"):
            say(f"  4-bit layers: {quantization['problem']}", style="bold red")

    def check(self, report: CheckReport, brief: bool = False) -> None:
        """The checklist, one line per item (brief: only what is not PASS), and the counts."""
        styles = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}
        for item in report.items:
            if brief and item.status == "PASS":
                continue
            say(f"{item.status:4}  {item.name}: {item.detail}", style=styles.get(item.status))
            if item.fix and item.status != "PASS":
                say(f"      fix: {item.fix}")
        counts = report.counts()
        say(f"check: {counts['PASS']} pass, {counts['WARN']} warn, {counts['FAIL']} fail")

    def finding(self, finding: Finding) -> None:
        """A live finding, with its first three config fixes."""
        style = {"error": "bold red", "warning": "yellow", "info": "cyan"}.get(finding.severity, None)
        where = f"step {finding.step}" if finding.step is not None else "run"
        say(f"[doctor] {finding.severity.upper()} at {where}: {finding.title}", style=style)
        for fix in finding.fixes[:3]:
            if fix.change:
                say(f"         fix: {fix.change}  ({fix.why})")

    def eval(self, result: dict) -> None:
        """One model's evaluation on one line: losses, then each generation metric."""
        numbers = ", ".join(f"{label} {value}" for label, value in _eval_rows(result))
        say(
            f"{result['which']} model on {result['n']} test examples: {numbers} ({result['seconds']}s)",
            style="bold",
        )

    def comparison(self, result: dict, run_dir: Path) -> None:
        """Base vs tuned (eval.json): the numbers side by side, then the worst regressions and best gains."""
        base, tuned = result["base"], result["tuned"]
        say(
            f"eval on {tuned['n']} test examples; metrics: {', '.join(result['metrics'])} "
            f"({result['metrics_chosen']}); max_new_tokens {result['max_new_tokens']} "
            f"({result['max_new_tokens_from']})"
        )
        say(f"  {'':<22}{'base':>10}{'tuned':>10}", style="bold")
        for (label, b), (_, t) in zip(_eval_rows(base), _eval_rows(tuned), strict=True):
            say(f"  {label:<22}{b:>10}{t:>10}")
        examples = run_dir / rundir.EVAL_EXAMPLES
        for which in ("base", "tuned"):
            if result[which].get("metric_failures"):
                say(
                    f"  {result['user_metric']} failed on {result[which]['metric_failures']} {which} "
                    f"example(s); their errors are in {examples}",
                    style="yellow",
                )
        for title, records in (("worst regressions", result["regressions"]), ("best gains", result["gains"])):
            if records:
                say(f"{title} ({result['primary_metric']}, tuned - base):", style="bold")
            for r in records:
                say(f"  {r['source']}  {r['change']:+.2f}  prompt: {r['prompt'][:70]!r}")
                for key in ("reference", "base", "tuned"):
                    say(f"      {key + ':':<10} {r[key][:70]!r}")
        say(f"wrote {run_dir / rundir.EVAL} and {examples} (every example: both answers, scores)")

    def result(self, result: RunResult) -> None:
        """How a training run ended, the doctor's findings, and where its directory is."""
        n = result.numbers
        style = "bold green" if result.status == "completed" else "bold red"
        say(
            f"{result.status}: {result.global_step} steps; "
            f"final train loss {fmt(n.get('final_train_loss'))}, "
            f"best eval loss {fmt(n.get('best_eval_loss'))} ({n.get('best_checkpoint') or 'no checkpoint'})",
            style=style,
        )
        if result.error:
            say(f"why: {result.error}", style=style)
        if n.get("recovery_changes"):
            say(f"recovered from divergence by changing: {', '.join(n['recovery_changes'])}")
        findings = n.get("findings") or []
        if findings:
            say(f"the doctor's findings ({len(findings)}):", style="bold")
            for f in findings:
                where = f"step {f['step']}" if f.get("step") is not None else "run"
                say(f"  {f['severity']:7} {where}: {f['title']}")
        else:
            say("the doctor found nothing to warn about")
        say(
            f"run directory: {result.run_dir}  (saved {n.get('saved', '-')}/, report.html; "
            f"next: tunewise doctor {result.run_dir})"
        )

    def trial_event(self, event: str, trial: Trial) -> None:
        """A sweep trial starting or ending."""
        params = " ".join(trial.overrides())
        if event == "start":
            say(f"{trial.name}: running ({params})")
            return
        evals = sorted(trial.evals.items())
        last = f"val loss {fmt(evals[-1][1])} at step {evals[-1][0]}" if evals else "no eval"
        style = "red" if trial.status in ("failed", "diverged") else None
        say(
            f"{trial.name}: {trial.status} at step {trial.global_step}, {last}, {trial.seconds:.0f}s",
            style=style,
        )

    def sweep(self, result: SweepResult) -> None:
        """The ranked trials of a sweep, the winner and what to run next."""
        spec = result.spec
        where = (
            f"at step {result.compare_step}"
            if spec.strategy == "grid"
            else f"at the highest rung each reached (rungs {', '.join(map(str, result.rungs))})"
        )
        say(
            f"sweep {result.sweep_dir}: {spec.strategy}, {len(result.trials)} trials, "
            f"up to {spec.max_steps} steps; ranked by validation loss {where}",
            style="bold",
        )
        if result.launched == 0:
            say("every trial was already done: nothing was run again (delete a trial directory to re-run it)")
        keys = list(spec.grid)
        head = f"{'#':>2}  {'trial':32} " + " ".join(f"{k.split('.')[-1][:13]:>13}" for k in keys)
        say(f"{head}  {'status':9} {'verdict':17} {'steps':>5} {'time':>6}  val loss")
        for rank, t in enumerate(result.trials, start=1):
            cells = " ".join(f"{t.params[k][:13]:>13}" for k in keys)
            loss = f"{fmt(t.val_loss)} @{t.rank_step}" if t.val_loss is not None else "-"
            mark = "  <- winner" if t is result.winner else ""
            status = f"pruned@{t.pruned_at}" if t.pruned_at and t.status == "stopped" else t.status
            style = "bold green" if mark else ("red" if t.status in ("failed", "diverged") else None)
            say(
                f"{rank:>2}  {t.name[:32]:32} {cells}  {status:9} {t.verdict or '-':17} {t.global_step:>5} "
                f"{t.seconds:>5.0f}s  {loss}{mark}",
                style=style,
            )
            if t.status in ("failed", "diverged"):
                say(f"      {t.finding or t.error or ''}"[:300])
        say(f"optimizer steps spent: {result.total_steps}; files: {', '.join(result.files.values())}")
        if result.winner is not None:
            say(
                f"winner: {' '.join(result.winner.overrides())}  (val loss {fmt(result.winner.val_loss)})",
                style="bold",
            )
            say(f"next: tunewise train {result.files['best_config']}   (or re-run with --then-train)")
        else:
            say("no trial finished with a validation loss: see the findings above", style="bold red")
