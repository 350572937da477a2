"""Keep real SmolLM2 runs as doctor corpus fixtures: tests/fixtures/real_runs/smollm2/<name>.json + manifest.

Each run directory's metrics.jsonl becomes the trainer_state.json Trainer would have written with
`logging_steps: 1`, labelled from its numbers with LABELS.md's rules (never from what the doctor said).
About 30% of each label goes to `holdout` (seeded, stratified); runs already in the manifest keep their split
and a run saved again replaces its line.

    python benchmarks/ladder/save_fixtures.py RUN_DIR [RUN_DIR ...] --code COMMIT [--prefix P] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml
from curves import label_run, read_jsonl, to_trainer_state, train_records

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "tests" / "fixtures" / "real_runs" / "smollm2"
HOLDOUT, SEED = 0.3, 2014


def describe(run_dir: Path, code: str) -> str:
    """How the run was made, from its resolved config.yaml and result.json; `code`: which tunewise."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    t, result = cfg["training"], json.loads((run_dir / "result.json").read_text())
    return (
        f"tunewise train, embedded SmolLM2-135M-Instruct ({cfg['model']['method']}), generated chat set "
        f"(benchmarks/ladder/make_chat.py, seed 0), {t['max_steps']} steps, batch "
        f"{t['per_device_train_batch_size']}x{t['gradient_accumulation_steps']}, lr {t['learning_rate']:g} "
        f"{t['lr_scheduler_type']}, warmup {t['warmup_steps']}, max_grad_norm {t['max_grad_norm']}, "
        f"optim {t['optim']}, CPU bf16; tunewise {code}, "
        f"doctor.on_divergence {cfg['doctor']['on_divergence']}; "
        f"status {result['status']} at step {result['global_step']}"
    )


def manifest_line(run_dir: Path, name: str, code: str) -> tuple[dict, dict]:
    """(the fixture's trainer_state, its manifest line without a split)."""
    records = train_records(run_dir)
    steps = [r["step"] for r in records]
    if steps != sorted(set(steps)):
        raise SystemExit(f"{run_dir}: steps go back (a recovered run); keep one attempt per fixture")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    state = to_trainer_state(records, cfg["training"]["per_device_train_batch_size"])
    label = label_run([r["loss"] for r in records], [r["grad_norm"] for r in records])
    numbers = ", ".join(f"{k}={v}" for k, v in label["numbers"].items())
    has_eval = any(r.get("type") == "eval" for r in read_jsonl(run_dir / "metrics.jsonl"))
    line = {
        "file": f"{name}.json",
        "format": "trainer_state",
        "source": {"made": describe(run_dir, code)},
        "task": "lora" if cfg["model"]["method"] == "lora" else "sft",
        "has_eval": has_eval,
        "label": label["label"],
        "cause": label["cause"],
        "note": f"{label['rule']}: ({numbers}, n_eval=0); one log per optimizer step, from metrics.jsonl",
    }
    return state, line


def assign_splits(lines: list[dict], kept: dict[str, str]) -> None:
    """Keep committed splits; put about HOLDOUT of each label's new runs in holdout (seeded)."""
    rng = random.Random(SEED)
    for label in sorted({line["label"] for line in lines}):
        group = [line for line in lines if line["label"] == label]
        held = sum(kept.get(line["file"]) == "holdout" for line in group)
        new = sorted((line for line in group if line["file"] not in kept), key=lambda line: line["file"])
        rng.shuffle(new)
        want = round(HOLDOUT * len(group)) if len(group) > 1 else 0
        for line in group:
            line["split"] = kept.get(line["file"], "dev")
        for line in new[: max(0, want - held)]:
            line["split"] = "holdout"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--prefix", default="", help="prepended to each run directory's name")
    parser.add_argument("--code", required=True, help="the tunewise commit that trained the runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "manifest.jsonl"
    old = read_jsonl(manifest)
    kept = {line["file"]: line["split"] for line in old}
    lines = {line["file"]: line for line in old}
    for run_dir in args.runs:
        name = args.prefix + run_dir.name
        state, line = manifest_line(run_dir, name, args.code)
        (args.out / line["file"]).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        lines[line["file"]] = line
    ordered = sorted(lines.values(), key=lambda line: line["file"])
    assign_splits(ordered, kept)
    manifest.write_text("".join(json.dumps(line) + "\n" for line in ordered), encoding="utf-8")


if __name__ == "__main__":
    main()
