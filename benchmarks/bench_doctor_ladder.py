"""The live doctor on a learning-rate ladder: the embedded SmolLM2, a chat set, 8 rates x 2 methods.

Issue #14 asks that the live doctor be calibrated on the real model: at each of 1e-6 ... 1e-1, for LoRA and
full fine-tuning, 20 steps at a constant rate without warmup (clipping 0.3) on a chat set, recording what
the doctor said. LoRA trains batches of 4 (the issue's set-up); full fine-tuning batches of 1, because a
full step (gradients and Adam for all 135M weights) is several times slower on a 2-core CPU. Expected:
flat / not learning at the bottom, healthy in the middle, diverged or unstable at the top, found within 3
steps of the loss leaving its starting level.

Every rung is one `tunewise train` process with the shipped default `doctor.on_divergence: stop` (what a
user gets), then `tunewise doctor --json` on its run directory. For each rung it records:

  - status (result.json), verdict (`tunewise doctor`), steps run;
  - the first live warning or error (findings.jsonl): step, code, title, and its top-ranked cause;
  - the step where the loss left its starting level, judged from the numbers alone: `rose_at`, the first
    step whose loss is above 2x the step-1 loss (or not finite); `fell_at`, the first step below half of
    it; and `delay`, the first error's step minus `rose_at`;
  - a label by the numbers (`by_numbers`, independent of the doctor): the verdict of the corpus's labelling
    rules (tests/fixtures/real_runs/LABELS.md, R1-R8) applied to the curve;
  - the curve (loss and grad_norm per step).

A run that the doctor stops early has a short curve. With `--full-curves DIR` the bench also diagnoses,
post hoc, the full curve of the same rung recorded in DIR as `ladder-<run name>.json` (the corpus
fixtures of tests/fixtures/real_runs/smollm2/, made by the baseline ladder, before the monitor stopped on
explosions), so both the live stop and the verdict on the whole curve are in the table.

    PYTHONPATH=src python benchmarks/bench_doctor_ladder.py [--steps 20] [--methods lora,full] \
        [--label baseline] [--full-curves tests/fixtures/real_runs/smollm2] [--keep-runs DIR]

Writes benchmarks/results/doctor_ladder.json (one entry per --label, others kept) and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "ladder"))

from curves import DEFINITIONS, finite, label_run, left_start, read_jsonl, train_records  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "doctor_ladder.json"
CONFIG = ROOT / "benchmarks" / "ladder" / "chat.yaml"
# The bundled chat set: one task (a sentence -> a JSON record), so the per-batch loss is steady enough for a
# 20-step run to show flat vs falling; make_chat.py's mixed tasks swing 0.75-3.0 from batch to batch.
DATA = ROOT / "src" / "tunewise" / "bundled" / "contacts" / "train.jsonl"
BATCH = {"lora": 4, "full": 1}
RATES = (1e-6, 1e-5, 1e-4, 2e-4, 1e-3, 1e-2, 3e-2, 1e-1)


def run_name(method: str, lr: float) -> str:
    return f"{method}-lr{lr:.0e}".replace("e-0", "e-")


def _cli(*args: str, log: Path) -> int:
    with open(log, "a", encoding="utf-8") as out:
        return subprocess.call([sys.executable, "-m", "tunewise.cli", *args], stdout=out, stderr=out)


def first_finding(findings: list[dict], severities: tuple[str, ...]) -> dict | None:
    found = [f for f in findings if f.get("severity") in severities and f.get("code") != "recovery"]
    return min(found, key=lambda f: f["step"]) if found else None


def _summary(finding: dict | None) -> dict | None:
    if finding is None:
        return None
    causes = finding.get("causes") or [None]
    return {
        "step": finding["step"],
        "severity": finding["severity"],
        "code": finding["code"],
        "title": finding["title"],
        "top_cause": causes[0],
    }


def diagnose(path: Path, log: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tunewise.cli", "doctor", str(path), "--json"], capture_output=True, text=True
    )
    if not out.stdout.strip():
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(out.stderr)
        return {"verdict": None, "findings": []}
    return json.loads(out.stdout)


def train_rung(method: str, lr: float, steps: int, data: Path, runs: Path) -> int:
    """One `tunewise train` process; its output goes to RUNS/<name>.log."""
    name = run_name(method, lr)
    overrides = [
        f"name={name}",
        f"output_dir={runs}",
        f"model.method={method}",
        f"training.learning_rate={lr}",
        f"training.max_steps={steps}",
        f"training.per_device_train_batch_size={BATCH[method]}",
        f"data.train={data}",
    ]
    return _cli(
        "train", str(CONFIG), *overrides, "--no-samples", "--quiet", "--force", log=runs / f"{name}.log"
    )


def run_rung(
    method: str, lr: float, steps: int, data: Path, runs: Path, full_curves: Path | None, reuse: bool
) -> dict:
    """Train one rung (or, with `reuse`, read the run already in RUNS) and record what the doctor said."""
    name = run_name(method, lr)
    log = runs / f"{name}.log"
    run_dir = runs / name
    started = time.perf_counter()
    rc = None if reuse and (run_dir / "result.json").is_file() else train_rung(method, lr, steps, data, runs)
    seconds = time.perf_counter() - started
    metrics = train_records(run_dir)
    losses = [(r["step"], r["loss"]) for r in metrics]
    result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else {}
    live = read_jsonl(run_dir / "findings.jsonl")
    diagnosis = diagnose(run_dir, log)
    where = left_start(losses)
    first_error = first_finding(live, ("error",))
    rung = {
        "method": method,
        "lr": lr,
        "rc": rc,
        "seconds": round(seconds if rc is not None else result.get("duration_s", 0), 1),
        "status": result.get("status"),
        "steps_run": len(metrics),
        "verdict": diagnosis.get("verdict"),
        "first_warning": _summary(first_finding(live, ("warning", "error"))),
        "first_error": _summary(first_error),
        **where,
        "delay": (first_error["step"] - where["rose_at"]) if first_error and where["rose_at"] else None,
        "by_numbers": label_run([x for _, x in losses], [r["grad_norm"] for r in metrics]),
        "recovery_changes": result.get("recovery_changes") or [],
        "loss_first": losses[0][1] if losses else None,
        "loss_max": max((x for _, x in losses if finite(x)), default=None),
        "loss_last": losses[-1][1] if losses else None,
        "curve": {"loss": [x for _, x in losses], "grad_norm": [r["grad_norm"] for r in metrics]},
    }
    fixture = full_curves / f"ladder-{name}.json" if full_curves else None  # save_fixtures --prefix ladder-
    if fixture and fixture.is_file() and len(metrics) < steps:
        full = json.loads(fixture.read_text())
        logs = [h for h in full["log_history"] if "loss" in h]
        full_losses = [(h["step"], h["loss"]) for h in logs]
        rung["full_curve"] = {
            "file": str(fixture.relative_to(ROOT)),
            "verdict": diagnose(fixture, log).get("verdict"),
            "by_numbers": label_run([x for _, x in full_losses], [h.get("grad_norm") for h in logs]),
            **left_start(full_losses),
        }
    return rung


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def table(rungs: list[dict]) -> str:
    head = (
        "| method | lr | by the numbers | status | verdict | steps | rose at | first warning | "
        "first error | top cause |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rungs:
        warn, err = r["first_warning"], r["first_error"]
        verdict, label = r["verdict"] or "-", r["by_numbers"]["label"]
        if r.get("full_curve"):
            verdict += f" (full curve: {r['full_curve']['verdict']})"
            label = r["full_curve"]["by_numbers"]["label"]
        first_warn = f"{warn['step']} {warn['code']}" if warn else "-"
        first_err = f"{err['step']} {err['code']}" if err else "-"
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {label} | {r['status']} | {verdict} "
            f"| {r['steps_run']} | {r['rose_at'] or '-'} | {first_warn} | {first_err} "
            f"| {(warn or {}).get('top_cause') or '-'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", type=Path, default=DATA, help="train file (messages format)")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES))
    parser.add_argument("--label", default="latest", help="key of this run in doctor_ladder.json")
    parser.add_argument("--full-curves", type=Path, default=None)
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep run directories here")
    parser.add_argument("--reuse-runs", action="store_true", help="read runs already in --keep-runs")
    parser.add_argument("--code", default=None, help="what code ran (default: git HEAD of this checkout)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.keep_runs or Path(tmp) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        data = args.data
        rungs = []
        for method in args.methods.split(","):
            for lr in (float(x) for x in args.rates.split(",")):
                rung = run_rung(method, lr, args.steps, data, runs, args.full_curves, args.reuse_runs)
                rungs.append(rung)
                print(
                    f"{method} lr {lr:g}: {rung['status']} in {rung['steps_run']} steps, verdict "
                    f"{rung['verdict']}, by numbers {rung['by_numbers']['label']}, rose {rung['rose_at']}, "
                    f"first error {(rung['first_error'] or {}).get('step')} ({rung['seconds']} s)",
                    file=sys.stderr,
                    flush=True,
                )
    commit = (
        args.code
        or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    entry = {
        "model": "SmolLM2-135M-Instruct (embedded)",
        "setup": (
            f"{args.steps} steps, batch {BATCH['lora']} (LoRA) or {BATCH['full']} (full), constant rate, no "
            "warmup, max_grad_norm 0.3, bf16, "
            f"max_seq_length 256, data {args.data.name}, LoRA r 8 all-linear or full, optim adamw_torch; "
            "doctor.on_divergence: stop (the default)"
        ),
        "definitions": DEFINITIONS,
        "code": commit,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rungs": rungs,
    }
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved[args.label] = entry
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    print(table(rungs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
