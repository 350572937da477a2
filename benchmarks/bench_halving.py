"""Successive halving against the full grid: the best configuration each finds and the steps each spends.

Both sweeps run for real on the bundled dataset and the embedded SmolLM2-135M-Instruct (LoRA, no gradient
checkpointing), each trial its own `tunewise train` process, one trial at a time. The goal: halving finds
the grid's best configuration (or one within 2% of its validation loss) with at most 40% of its steps.
Validation uses the first `--val-rows` rows of the bundled validation split to keep evaluations cheap.

    PYTHONPATH=src python benchmarks/bench_halving.py [--steps 9] [--batch 2] \
        [--grid training.learning_rate=1e-4,5e-4,2e-3 adapter.r=4,8,16]

Writes benchmarks/results/halving.json (with the scale used).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # trial processes inherit it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "halving.json"
DEFAULT_GRID = ["training.learning_rate=1e-4,5e-4,2e-3", "adapter.r=4,8,16"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=9, help="max optimizer steps per trial")
    parser.add_argument("--grid", nargs="+", default=DEFAULT_GRID, metavar="KEY=V1,V2")
    parser.add_argument("--batch", type=int, default=2, help="per-device train batch (accumulation 1)")
    parser.add_argument("--val-rows", type=int, default=8, help="validation rows (one eval batch)")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where the sweeps run (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--note", default=None, help="free text kept in the results (interruptions, load)")
    return parser.parse_args()


def base_overrides(args: argparse.Namespace, workdir: Path) -> list[str]:
    from tunewise.task import bundled_data_dir

    rows = (bundled_data_dir() / "validation.jsonl").read_text().splitlines()[: args.val_rows]
    validation = workdir / "validation.jsonl"
    validation.write_text("\n".join(rows) + "\n")
    return [
        "model.name=smollm2-135m-instruct",
        "model.method=lora",
        "training.gradient_checkpointing=false",
        f"training.per_device_train_batch_size={args.batch}",
        "training.gradient_accumulation_steps=1",
        f"training.per_device_eval_batch_size={args.val_rows}",
        f"data.validation={validation}",
        f"output_dir={workdir}",
    ]


def run_one(strategy: str, args: argparse.Namespace, overrides: list[str]) -> dict:
    from tunewise.sweep import SweepSpec, parse_grid, run_sweep

    spec = SweepSpec(
        overrides=overrides,
        grid=parse_grid(args.grid),
        max_steps=args.steps,
        strategy=strategy,
        eta=args.eta,
        workers=args.workers,
        name=f"bench-{strategy}",
    )

    def report(event: str, trial) -> None:
        if event == "end":
            last = max(trial.evals) if trial.evals else None
            print(
                f"  [{strategy}] {trial.name}: {trial.status} step {trial.global_step} "
                f"val {trial.evals.get(last)} ({trial.seconds:.0f}s)",
                flush=True,
            )

    started = time.time()
    result = run_sweep(spec, on_trial=report)
    winner = result.winner
    return {
        "wall_s_this_invocation": round(time.time() - started, 1),  # ~0 when the sweep was already done
        "trial_seconds": round(sum(t.seconds for t in result.trials), 1),
        "rungs": result.rungs,
        "total_steps": result.total_steps,
        "winner": dict(winner.params) if winner else None,
        "winner_val_loss": winner.val_loss if winner else None,
        "winner_step": winner.rank_step if winner else None,
        "trials": [
            {
                "params": t.params,
                "status": t.status,
                "steps": t.steps_spent,
                "val_loss": t.val_loss,
                "at_step": t.rank_step,
                "evals": {str(k): v for k, v in t.evals.items()},
                "seconds": t.seconds,
            }
            for t in result.trials
        ],
        "sweep_dir": str(result.sweep_dir),
    }


def compare(grid: dict, halving: dict) -> dict:
    """Is halving's winner the grid's best, or within 2% of it, for at most 40% of the steps?"""
    grid_loss = {json.dumps(t["params"], sort_keys=True): t["val_loss"] for t in grid["trials"]}
    chosen = grid_loss.get(json.dumps(halving["winner"], sort_keys=True))
    best = grid["winner_val_loss"]
    gap = (chosen - best) / best if chosen is not None and best else None
    ratio = halving["total_steps"] / grid["total_steps"]
    own = halving["winner_val_loss"]
    return {
        "same_winner": halving["winner"] == grid["winner"],
        "grid_val_loss_of_halving_winner": chosen,
        "relative_gap": gap,
        # the same config trained twice (grid run vs the paused/resumed halving run): run-to-run noise
        "halving_winner_val_loss_own_run": own,
        "same_config_relative_difference": (own - chosen) / chosen if own and chosen else None,
        "steps_ratio": round(ratio, 3),
        "goal_met": gap is not None and gap <= 0.02 and ratio <= 0.40,
    }


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-halving-"))
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = base_overrides(args, workdir)
    print(f"workdir {workdir}; grid {args.grid}; {args.steps} steps; batch {args.batch}", flush=True)
    results = {strategy: run_one(strategy, args, overrides) for strategy in ("grid", "halving")}
    summary = compare(results["grid"], results["halving"])
    data = {
        "scale": {
            "steps": args.steps,
            "grid": args.grid,
            "batch": args.batch,
            "gradient_accumulation": 1,
            "val_rows": args.val_rows,
            "eta": args.eta,
            "workers": args.workers,
            "model": "smollm2-135m-instruct (LoRA, fp32, CPU)",
            "data": "bundled, 800 train",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        **summary,
        "note": args.note,
        "grid": results["grid"],
        "halving": results["halving"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    for strategy in ("grid", "halving"):
        r = results[strategy]
        print(
            f"{strategy}: best {r['winner']} val {r['winner_val_loss']} at step {r['winner_step']}; "
            f"{r['total_steps']} optimizer steps; {r['trial_seconds']}s in trials"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
