"""lr-find on the real model: SmolLM2-135M-Instruct + the bundled data, then train at the suggested rate.

Issue #5 asks that `tunewise lr-find` on SmolLM2 and the bundled data produce a plot and a suggestion, and
that the suggested rate train without a doctor warning. This runs exactly that, with the demo's config
(LoRA r 8, all-linear) and one batch size for both halves (8 examples per step, no accumulation, so a
CPU gets through it in minutes):

  1. `find_learning_rate` from 1e-7 to 1 over at most 100 steps (stops when the smoothed loss diverges);
  2. `train` with the demo config at the suggested rate (34 steps, eval every 17);
  3. the doctor on the run directory: verdict and every finding with its severity.

    PYTHONPATH=src python benchmarks/bench_lr_find.py

Writes benchmarks/results/lr_find.json and benchmarks/results/lr_find.png (the range test's curve).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BATCH = ["training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1"]


def main() -> int:
    from tunewise.config import load_config
    from tunewise.demo import DEMO_CONFIG
    from tunewise.doctor.diagnose import diagnose_path
    from tunewise.training.lrfind import find_learning_rate
    from tunewise.training.run import train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*BATCH, f"output_dir={tmp}"]
        started = time.perf_counter()
        found = find_learning_rate(load_config(DEMO_CONFIG, overrides), start=1e-7, end=1.0, steps=100)
        find_s = time.perf_counter() - started
        print(
            f"lr-find: {len(found.lrs)} steps in {find_s:.0f} s; suggestion {found.suggestion} "
            f"({found.rule}); caution: {found.caution}",
            file=sys.stderr,
        )
        shutil.copy(found.out_dir / "lr_find.png", RESULTS / "lr_find.png")
        curve = {"lrs": found.lrs, "losses": found.losses, "smoothed": found.smoothed}
        if found.suggestion is None:
            print("no suggestion: nothing to train", file=sys.stderr)
            return 1
        started = time.perf_counter()
        run = train(load_config(DEMO_CONFIG, [*overrides, found.sweep_override(), "name=lr-find-check"]))
        train_s = time.perf_counter() - started
        diagnosis = diagnose_path(run.run_dir)
        findings = [
            {"step": f.step, "severity": f.severity, "code": f.code, "title": f.title}
            for f in diagnosis.findings
        ]
        metrics = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        train_loss = [(m["step"], m["loss"]) for m in metrics if m.get("type") == "train"]
        eval_loss = [(m["step"], m["eval_loss"]) for m in metrics if m.get("type") == "eval"]
    result = {
        "model": "SmolLM2-135M-Instruct (embedded), LoRA r 8 all-linear, demo config",
        "batch": "8 examples per step, no accumulation (both halves)",
        "lr_find": {
            "steps": len(found.lrs),
            "seconds": round(find_s),
            "stop_reason": found.stop_reason,
            "minimum": found.minimum,
            "steepest": found.steepest,
            "suggestion": found.suggestion,
            "rule": found.rule,
            "caution": found.caution,
            "plot": "benchmarks/results/lr_find.png",
            "curve": curve,
        },
        "train_at_suggestion": {
            "override": found.sweep_override(),
            "status": run.status,
            "steps": run.global_step,
            "seconds": round(train_s),
            "first_loss": train_loss[0][1],
            "last_loss": train_loss[-1][1],
            "eval_loss": eval_loss,
            "doctor_verdict": diagnosis.verdict,
            "findings": findings,
            "warnings_or_errors": sum(f["severity"] in ("warning", "error") for f in findings),
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    (RESULTS / "lr_find.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0 if result["train_at_suggestion"]["warnings_or_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
